"""Which ``glio-node`` processes use this database, and their heartbeats.

``glio-node serve`` registers itself at start (:func:`register`), beats every few seconds
(:func:`heartbeat`) and marks a clean stop (:func:`mark_stopped`).  The status page lists every
row; with several nodes on one PostgreSQL each appears with its heartbeat, and a node whose
heartbeat is older than :data:`SILENT_AFTER_SECONDS` is shown as silent.

Crash recovery (:func:`gone_owners`): a node takes back the running jobs and claimed deliveries
of another node as soon as it knows that node is gone, instead of waiting for the lease:

- on the same host (same boot, same PID namespace), at once: the row's PID no longer exists, or
  now belongs to a process that started at another time (PIDs are reused);
- anywhere, after ``[worker] node_silent_seconds`` without a heartbeat (a few heartbeats; the
  nodes' clocks must agree to well within that, as they must for leases);
- a row marked stopped that still holds work (its release did not reach the database).

A holder without a node row (not a ``serve`` process) keeps its work until the lease passes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import and_, select, union, update
from sqlalchemy.orm import Session

from glio_node.store.models import Delivery, DeliveryState, Job, JobState, NodeRow

HEARTBEAT_SECONDS = 5.0  # how often serve writes its heartbeat
SILENT_AFTER_SECONDS = 30.0  # a heartbeat older than this: the node is shown as silent


@dataclass(frozen=True)
class ProcessId:
    """What names one process on one host for as long as the host runs: a PID alone is reused.

    ``boot_id`` (``/proc/sys/kernel/random/boot_id``, new at every boot) and ``pid_namespace``
    (``/proc/self/ns/pid``; containers on one host have their own) say whether two processes
    see the same PIDs; ``start_ticks`` (field 22 of ``/proc/<pid>/stat``, clock ticks after
    boot) tells the process from a later one that got the same PID.
    """

    pid: int
    boot_id: str
    pid_namespace: str
    start_ticks: int

    @property
    def key(self) -> str:
        """What the node row stores in ``process_key``."""
        return f"{self.boot_id}/{self.pid_namespace}/{self.start_ticks}"


def this_process() -> ProcessId | None:
    """This process's :class:`ProcessId`, or None where there is no Linux ``/proc`` (then only
    the heartbeat tells other nodes that this one is gone)."""
    return process_id(os.getpid())


def process_id(pid: int) -> ProcessId | None:
    """The :class:`ProcessId` of process ``pid`` on this host, or None (no such process, no
    ``/proc``)."""
    host = _host_key()
    ticks = _start_ticks(pid)
    if host is None or ticks is None:
        return None
    boot_id, pid_namespace = host
    return ProcessId(pid, boot_id, pid_namespace, ticks)


def process_gone(pid: int, process_key: str) -> bool | None:
    """Whether the process a node row names is gone, seen from this host.

    True: it ran here (same boot and PID namespace) and its PID is free, names a process
    started at another time, or a zombie.  False: it still runs.  None: it ran elsewhere, or
    this host cannot tell (no ``/proc``, a malformed key, a process of another user hidden by
    ``hidepid``).  The host name is not compared: cloned machines and containers share names,
    while the boot id is random per boot and the PID namespace is the container's own.
    """
    host = _host_key()
    parts = process_key.rsplit("/", 1)
    if host is None or len(parts) != 2 or parts[0] != "/".join(host) or not parts[1].isdigit():
        return None
    if pid <= 0:  # kill(0 or -n) would signal a process group, not ask about one process
        return None
    try:
        os.kill(pid, 0)  # ESRCH: no such process, whatever /proc shows to this user
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, another user's
    except OverflowError:
        return None
    ticks = _start_ticks(pid)
    if ticks is None:
        return None
    return ticks != int(parts[1]) or _is_zombie(pid)


def _host_key() -> tuple[str, str] | None:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return boot_id, pid_namespace


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    # fields[0] is field 3 (state), so field 22 (starttime) is fields[19]
    return int(fields[19]) if fields and len(fields) > 19 else None


def _is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] in ("Z", "X")


@dataclass(frozen=True)
class NodeInfo:
    """What a node says about itself when it starts."""

    owner: str  # the scheduler's queue owner (host:pid:random); a job's lease_owner
    hostname: str
    version: str  # glio-node's version
    device: str | None  # where the networks run ("cpu", "gpu")
    bundle_name: str | None
    bundle_version: str | None
    process: ProcessId | None = None  # :func:`this_process` for serve; None: heartbeat only


def register(session: Session, info: NodeInfo, now: datetime) -> None:
    """Insert this node's row (a fresh owner per process, so never a conflict)."""
    process = info.process
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
            pid=process.pid if process else None,
            process_key=process.key if process else None,
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


def gone_owners(
    session: Session, now: datetime, *, silent_after_seconds: float, exclude: Iterable[str] = ()
) -> dict[str, str]:
    """The nodes that hold work (a running job, a claimed delivery) but are gone, each with why,
    in words for the audit trail and the log (the module docstring says when a node is gone).

    ``exclude``: owners never taken to be gone (the caller itself).
    """
    holders = union(
        select(Job.lease_owner.label("owner")).where(
            Job.state == JobState.RUNNING, Job.lease_owner.is_not(None)
        ),
        select(Delivery.claimed_by.label("owner")).where(
            and_(
                Delivery.state == DeliveryState.PENDING,
                Delivery.claimed_by.is_not(None),
                Delivery.next_attempt_at > now,
            )
        ),
    ).subquery()
    rows = session.execute(
        select(
            NodeRow.owner, NodeRow.pid, NodeRow.process_key, NodeRow.heartbeat_at, NodeRow.stopped_at
        ).where(NodeRow.owner.in_(select(holders.c.owner)))
    ).all()
    skip = set(exclude)
    gone: dict[str, str] = {}
    for owner, pid, process_key, heartbeat_at, stopped_at in rows:
        if owner in skip:
            continue
        silent = (now - heartbeat_at).total_seconds()
        if stopped_at is not None:
            gone[owner] = "the node stopped without giving its work back"
        elif pid is not None and process_key and process_gone(pid, process_key):
            gone[owner] = f"process {pid} on this host is gone"
        elif silent > silent_after_seconds:
            gone[owner] = (
                f"no heartbeat for {silent:.0f} s (node_silent_seconds = {silent_after_seconds:g})"
            )
    return gone
