"""Received instances and their series, written by the receiver.

:func:`record_instance` adds the instance row, creates or touches its series and writes the
``instance_received`` audit row, all in the caller's transaction; the receiver commits it and
only then answers success to the sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from glio_node.store import audit
from glio_node.store.audit import Event
from glio_node.store.db import dialect_insert
from glio_node.store.models import Instance, Series, SeriesState


@dataclass(frozen=True)
class ReceivedInstance:
    """What the receiver knows about one durable instance file."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str  # the file in the spool
    size_bytes: int
    sha256: str  # hex digest of the stored file
    calling_ae: str
    address: str  # the sender, "host:port"
    accession_number: str | None = None  # for the status page's audit search; never logged


def instance_exists(session: Session, sop_instance_uid: str) -> bool:
    """Whether an instance with this SOP Instance UID was already stored."""
    return (
        session.execute(
            select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
        ).first()
        is not None
    )


def record_instance(session: Session, received: ReceivedInstance, now: datetime) -> None:
    """Insert the instance, create or touch its series, audit ``instance_received``.

    Raises ``sqlalchemy.exc.IntegrityError`` (at flush or commit) when the SOP Instance UID is
    already stored: a concurrent re-send that won the race.
    """
    insert = dialect_insert(session)
    session.execute(
        insert(Series)
        .values(
            series_instance_uid=received.series_instance_uid,
            study_instance_uid=received.study_instance_uid,
            first_received_at=now,
            last_received_at=now,
            instance_count=0,
            state=SeriesState.RECEIVING,
            accession_number=received.accession_number,
        )
        .on_conflict_do_nothing(index_elements=[Series.series_instance_uid])
    )
    session.execute(
        update(Series)
        .where(Series.series_instance_uid == received.series_instance_uid)
        .values(instance_count=Series.instance_count + 1, last_received_at=now)
        .execution_options(synchronize_session=False)
    )
    session.add(
        Instance(
            sop_instance_uid=received.sop_instance_uid,
            series_instance_uid=received.series_instance_uid,
            study_instance_uid=received.study_instance_uid,
            sop_class_uid=received.sop_class_uid,
            transfer_syntax_uid=received.transfer_syntax_uid,
            path=received.path,
            size_bytes=received.size_bytes,
            sha256=received.sha256,
            received_at=now,
            calling_ae=received.calling_ae,
        )
    )
    details: dict[str, Any] = {
        "sop_class_uid": received.sop_class_uid,
        "transfer_syntax_uid": received.transfer_syntax_uid,
        "size_bytes": received.size_bytes,
        "sha256": received.sha256,
    }
    audit.record(
        session,
        Event.INSTANCE_RECEIVED,
        at=now,
        calling_ae=received.calling_ae,
        address=received.address,
        study_instance_uid=received.study_instance_uid,
        series_instance_uid=received.series_instance_uid,
        sop_instance_uid=received.sop_instance_uid,
        details=details,
    )
    session.flush()
