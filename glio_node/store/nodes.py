"""Which ``glio-node`` processes use this database, and their heartbeats.

``glio-node serve`` registers itself at start (:func:`register`), beats every few seconds
(:func:`heartbeat`) and marks a clean stop (:func:`mark_stopped`).  The status page lists every
row; with several nodes on one PostgreSQL each appears with its heartbeat, and a node whose
heartbeat is older than :data:`SILENT_AFTER_SECONDS` is shown as silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from glio_node.store.models import NodeRow

HEARTBEAT_SECONDS = 5.0  # how often serve writes its heartbeat
SILENT_AFTER_SECONDS = 30.0  # a heartbeat older than this: the node is shown as silent


@dataclass(frozen=True)
class NodeInfo:
    """What a node says about itself when it starts."""

    owner: str  # the scheduler's queue owner (host:pid:random); a job's lease_owner
    hostname: str
    version: str  # glio-node's version
    device: str | None  # where the networks run ("cpu", "gpu")
    bundle_name: str | None
    bundle_version: str | None


def register(session: Session, info: NodeInfo, now: datetime) -> None:
    """Insert this node's row (a fresh owner per process, so never a conflict)."""
    session.add(
        NodeRow(
            owner=info.owner,
            hostname=info.hostname,
            version=info.version,
            started_at=now,
            heartbeat_at=now,
            device=info.device,
            bundle_name=info.bundle_name,
            bundle_version=info.bundle_version,
        )
    )


def heartbeat(session: Session, owner: str, now: datetime) -> None:
    session.execute(
        update(NodeRow)
        .where(NodeRow.owner == owner)
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )


def mark_stopped(session: Session, owner: str, now: datetime) -> None:
    session.execute(
        update(NodeRow)
        .where(NodeRow.owner == owner)
        .values(heartbeat_at=now, stopped_at=now)
        .execution_options(synchronize_session=False)
    )


def all_nodes(session: Session) -> list[NodeRow]:
    """Every node that ever used this database, latest heartbeat first."""
    return list(session.scalars(select(NodeRow).order_by(NodeRow.heartbeat_at.desc()).limit(50)))
