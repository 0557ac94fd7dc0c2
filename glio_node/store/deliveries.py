"""Deliveries of result objects to destinations, and the spool purge that waits for them.

Like :mod:`glio_node.store.queue`, every function runs in the caller's transaction, writes the
audit row of the change it makes into the same transaction, and takes ``now`` (aware UTC).

A delivery is one result object to one destination.  ``pending`` rows are *claimed* before they
are sent: one statement moves their ``next_attempt_at`` a lease into the future (with
``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two nodes sharing the queue never send the same
object at once.  The claim records the claiming node (``claimed_by``): the claims of a node that
is gone (:func:`glio_node.store.nodes.gone_owners`) are made due again at once
(:func:`release_claims_of`); a claimer without a node row waits for the lease to pass.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from glio_node.store import audit
from glio_node.store.audit import Event
from glio_node.store.db import dialect_insert
from glio_node.store.models import Delivery, DeliveryState, Job, JobState, Series
from glio_node.store.queue import RetryPolicy


@dataclass(frozen=True)
class ResultObject:
    """One written result file, as the sender needs it."""

    sop_instance_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class DeliveryRecord:
    """A claimed delivery (a snapshot)."""

    id: int
    job_id: int
    destination: str  # [[destinations]] name
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    attempts: int  # sends so far, not counting the one about to happen
    study_instance_uid: str
    series_instance_uid: str  # of the analysed slide (the audit trail's key)


def add_deliveries(
    session: Session,
    job_id: int,
    destinations: Sequence[str],
    objects: Sequence[ResultObject],
    now: datetime,
) -> int:
    """One ``pending`` delivery per destination and object; existing pairs are kept as they are
    (a job run again after a crash rewrites the same UIDs).  Returns the rows added."""
    if not destinations or not objects:
        return 0
    insert = dialect_insert(session)
    added = 0
    for name in destinations:
        for obj in objects:
            result = session.execute(
                insert(Delivery)
                .values(
                    job_id=job_id,
                    destination=name,
                    sop_instance_uid=obj.sop_instance_uid,
                    sop_class_uid=obj.sop_class_uid,
                    path=obj.path,
                    state=DeliveryState.PENDING,
                    attempts=0,
                    created_at=now,
                )
                .on_conflict_do_nothing(
                    index_elements=[Delivery.job_id, Delivery.destination, Delivery.sop_instance_uid]
                )
            )
            added += result.rowcount or 0
    return added


def claim_deliveries(
    session: Session, now: datetime, lease_seconds: float, limit: int = 64, owner: str | None = None
) -> list[DeliveryRecord]:
    """Take up to ``limit`` due ``pending`` deliveries (oldest first) for ``lease_seconds``,
    for ``owner`` (the node's queue owner; None: no one may take them back before the lease)."""
    due = (
        select(Delivery.id)
        .where(Delivery.state == DeliveryState.PENDING)
        .where(or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now))
        .order_by(Delivery.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    ids = [
        row.id
        for row in session.execute(
            update(Delivery)
            .where(Delivery.id.in_(due.scalar_subquery()), Delivery.state == DeliveryState.PENDING)
            .values(next_attempt_at=now + timedelta(seconds=lease_seconds), claimed_by=owner)
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        )
    ]
    if not ids:
        return []
    rows = session.execute(
        select(Delivery, Series.study_instance_uid, Series.series_instance_uid)
        .join(Job, Job.id == Delivery.job_id)
        .join(Series, Series.id == Job.series_id)
        .where(Delivery.id.in_(ids))
        .order_by(Delivery.id)
    ).all()
    return [
        DeliveryRecord(
            id=d.id,
            job_id=d.job_id,
            destination=d.destination,
            sop_instance_uid=d.sop_instance_uid,
            sop_class_uid=d.sop_class_uid,
            path=d.path,
            attempts=d.attempts,
            study_instance_uid=study,
            series_instance_uid=series,
        )
        for d, study, series in rows
    ]


def record_attempt(
    session: Session,
    delivery: DeliveryRecord,
    *,
    ok: bool,
    status: str,
    transient: bool,
    now: datetime,
    policy: RetryPolicy,
    max_attempts: int,
    committed: bool = False,
) -> DeliveryState:
    """Record one send of ``delivery``: ``sent`` (or ``committed``) on success; on failure
    ``pending`` again after the backoff when ``transient`` and attempts are left, else
    ``failed``.  Audit ``delivery_attempt``.  Returns the new state."""
    attempts = delivery.attempts + 1
    values: dict[str, Any] = {"attempts": attempts, "last_status": status[:64], "claimed_by": None}
    if ok:
        state = DeliveryState.COMMITTED if committed else DeliveryState.SENT
        values.update(state=state, delivered_at=now, next_attempt_at=None)
    elif transient and attempts < max_attempts:
        state = DeliveryState.PENDING
        values.update(state=state, next_attempt_at=now + policy.delay(attempts))
    else:
        state = DeliveryState.FAILED
        values.update(state=state, next_attempt_at=None)
    session.execute(
        update(Delivery)
        .where(Delivery.id == delivery.id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    details: dict[str, Any] = {
        "destination": delivery.destination,
        "status": status,
        "attempt": attempts,
        "state": state.value,
        "sop_class_uid": delivery.sop_class_uid,
    }
    if state == DeliveryState.PENDING:
        details["next_attempt_at"] = values["next_attempt_at"].isoformat()
    audit.record(
        session,
        Event.DELIVERY_ATTEMPT,
        at=now,
        job_id=delivery.job_id,
        study_instance_uid=delivery.study_instance_uid,
        series_instance_uid=delivery.series_instance_uid,
        sop_instance_uid=delivery.sop_instance_uid,
        details=details,
    )
    return state


def release_claims_of(session: Session, gone: Mapping[str, str], now: datetime) -> int:
    """Make the claimed, unsent deliveries of the ``gone`` owners (owner -> why) due at once
    rather than when their claim's lease passes.  Audit ``delivery_reclaimed`` per delivery,
    naming the owner and why.  Returns how many.  Of two nodes doing this at once, one does."""
    if not gone:
        return 0
    claimed = and_(
        Delivery.state == DeliveryState.PENDING,
        Delivery.claimed_by.in_(list(gone)),
        Delivery.next_attempt_at > now,
    )
    # The claimers are read first for the audit rows; the UPDATE repeats the condition.
    before = {
        row.id: row
        for row in session.execute(
            select(
                Delivery.id, Delivery.claimed_by, Delivery.job_id, Delivery.destination,
                Delivery.sop_instance_uid, Series.study_instance_uid, Series.series_instance_uid,
            )
            .join(Job, Job.id == Delivery.job_id)
            .join(Series, Series.id == Job.series_id)
            .where(claimed)
        )
    }
    if not before:
        return 0
    released = session.execute(
        update(Delivery)
        .where(claimed, Delivery.id.in_(list(before)))
        .values(next_attempt_at=now, claimed_by=None)
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    ).scalars().all()
    for delivery_id in sorted(released):
        row = before[delivery_id]
        audit.record(
            session,
            Event.DELIVERY_RECLAIMED,
            at=now,
            job_id=row.job_id,
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            sop_instance_uid=row.sop_instance_uid,
            details={
                "destination": row.destination,
                "owner": row.claimed_by,
                "reason": gone[row.claimed_by],
            },
        )
    return len(released)


@dataclass(frozen=True)
class Purgeable:
    job_id: int
    study_instance_uid: str
    series_instance_uid: str


def purgeable_jobs(
    session: Session, finished_before: datetime, needs_commitment: Collection[str] = ()
) -> list[Purgeable]:
    """Done jobs, finished before ``finished_before``, not purged yet, whose every delivery has
    arrived: ``sent``, or ``committed`` for the destinations in ``needs_commitment``."""
    undelivered = or_(
        Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]),
        and_(
            Delivery.state == DeliveryState.SENT,
            Delivery.destination.in_(list(needs_commitment)),
        ),
    )
    rows = session.execute(
        select(Job.id, Series.study_instance_uid, Series.series_instance_uid)
        .join(Series, Series.id == Job.series_id)
        .where(Job.state == JobState.DONE, Job.purged_at.is_(None))
        .where(Job.finished_at <= finished_before)
        .where(~exists().where(Delivery.job_id == Job.id, undelivered))
        .order_by(Job.id)
    ).all()
    return [Purgeable(*row) for row in rows]


def mark_purged(session: Session, job: Purgeable, files_removed: int, now: datetime) -> None:
    """Record that the slide and results of ``job`` left the spool; audit ``purge``."""
    session.execute(
        update(Job)
        .where(Job.id == job.job_id)
        .values(purged_at=now)
        .execution_options(synchronize_session=False)
    )
    audit.record(
        session,
        Event.PURGE,
        at=now,
        job_id=job.job_id,
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=job.series_instance_uid,
        details={"files_removed": files_removed},
    )


def delivery_states(session: Session, job_id: int) -> dict[str, int]:
    """How many deliveries of a job are in each state (for logs and tests)."""
    counts: dict[str, int] = {}
    for (state,) in session.execute(select(Delivery.state).where(Delivery.job_id == job_id)):
        key = DeliveryState(state).value
        counts[key] = counts.get(key, 0) + 1
    return counts

