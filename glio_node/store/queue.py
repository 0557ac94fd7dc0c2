"""The job queue in SQL: one job per series, claimed with a lease, retried with capped backoff.

Every function runs inside the caller's transaction and writes the audit row of the state change
it makes into the same transaction; the caller commits (``with sessions.begin() as s: ...``).
Times are passed in (``now``) so tests and the scheduler agree on one clock; they must be
timezone-aware.

Claiming is one statement: ``UPDATE job ... WHERE id = (SELECT id ... LIMIT 1) RETURNING``; on
PostgreSQL the sub-select takes ``FOR UPDATE SKIP LOCKED``, so nodes sharing the queue never
claim the same job and never wait on each other.  On SQLite (one node) the write lock taken by
``BEGIN IMMEDIATE`` (see :mod:`glio_node.store.db`) serialises claimers.

States: ``waiting`` --claim--> ``running`` --finish--> ``done``
                                   |--fail(transient, attempts left)--> ``waiting`` (not_before)
                                   |--fail(permanent or attempts exhausted)--> ``failed``
                                   |--lease expired or owner gone (requeue_expired)--> ``waiting`` or ``failed``
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, and_, or_, select, update
from sqlalchemy.orm import Session

from glio_node.store import audit
from glio_node.store.audit import Event
from glio_node.store.db import dialect_insert
from glio_node.store.models import Job, JobState, Series, SeriesState

MAX_ERROR_CHARS = 2000  # last_error is for an operator, not a full traceback


@dataclass(frozen=True)
class JobRecord:
    """A job as the worker sees it after a claim (a snapshot, not a live row)."""

    id: int
    series_instance_uid: str
    study_instance_uid: str
    state: JobState
    attempts: int  # including the current one, once claimed
    max_attempts: int
    lease_owner: str | None  # the worker holding it while running
    lease_expires_at: datetime | None  # renew before this or another worker may take it
    not_before: datetime | None  # backoff: not claimable before this
    last_error: str | None
    created_at: datetime


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff: attempt n waits base * 2**(n-1), at most max."""

    backoff_base_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.backoff_base_seconds <= self.backoff_max_seconds:
            raise ValueError(
                f"backoff base {self.backoff_base_seconds} s must be > 0 and at most the cap "
                f"{self.backoff_max_seconds} s"
            )

    def delay(self, attempts: int) -> timedelta:
        """The wait after the ``attempts``-th failed attempt (1-based)."""
        exponent = min(max(attempts - 1, 0), 62)
        return timedelta(
            seconds=min(self.backoff_base_seconds * 2.0**exponent, self.backoff_max_seconds)
        )


@dataclass(frozen=True)
class BundleInfo:
    """Which model bundle a job ran with (recorded on the job and in the audit trail)."""

    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class Enqueued:
    job_id: int
    created: bool  # False: the series already had a job (re-sent series)


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError(f"now = {now!r} is naive: pass a timezone-aware UTC time")
    return now


def enqueue_series(
    session: Session, series_instance_uid: str, *, max_attempts: int, now: datetime
) -> Enqueued:
    """Make the job of a received series, once: a second call returns the existing job.

    The series must exist (it is created by the receiver).  A new job is ``waiting``; the
    series becomes ``queued``; audit ``job_queued``.  Raises ``LookupError`` for an unknown
    series and ``ValueError`` for ``max_attempts`` below 1.
    """
    _aware(now)
    if max_attempts < 1:
        raise ValueError(f"max_attempts {max_attempts} must be at least 1")
    series = session.scalars(
        select(Series).where(Series.series_instance_uid == series_instance_uid)
    ).one_or_none()
    if series is None:
        raise LookupError(f"series {series_instance_uid} was never received")
    insert = dialect_insert(session)
    stmt = (
        insert(Job)
        .values(
            series_id=series.id,
            state=JobState.WAITING,
            attempts=0,
            max_attempts=max_attempts,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=[Job.series_id])
        .returning(Job.id)
    )
    job_id = session.execute(stmt).scalar_one_or_none()
    if job_id is None:
        existing = session.execute(select(Job.id).where(Job.series_id == series.id)).scalar_one()
        return Enqueued(existing, created=False)
    series.state = SeriesState.QUEUED
    audit.record(
        session,
        Event.JOB_QUEUED,
        at=now,
        job_id=job_id,
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        details={"max_attempts": max_attempts, "instance_count": series.instance_count},
    )
    return Enqueued(job_id, created=True)


def claim_job(
    session: Session, owner: str, lease_seconds: float, now: datetime
) -> JobRecord | None:
    """Take the oldest claimable job for ``owner`` with a lease of ``lease_seconds``, or None.

    Claimable: ``waiting`` and ``not_before`` unset or passed.  The claim counts as an attempt;
    audit ``job_started``.
    """
    _aware(now)
    candidate = (
        select(Job.id)
        .where(Job.state == JobState.WAITING)
        .where(or_(Job.not_before.is_(None), Job.not_before <= now))
        .order_by(Job.id)
        .limit(1)
    )
    if session.get_bind().dialect.name == "postgresql":
        candidate = candidate.with_for_update(skip_locked=True)
    stmt = (
        update(Job)
        .where(and_(Job.id == candidate.scalar_subquery(), Job.state == JobState.WAITING))
        .values(
            state=JobState.RUNNING,
            attempts=Job.attempts + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
            tiles_done=None,  # progress of this attempt, written by record_progress
            tiles_total=None,
            progress_at=None,
        )
        .returning(*_JOB_COLUMNS)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).one_or_none()
    if row is None:
        return None
    job = _record(session, row)
    audit.record(
        session,
        Event.JOB_STARTED,
        at=now,
        job_id=job.id,
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=job.series_instance_uid,
        details={"owner": owner, "attempt": job.attempts, "max_attempts": job.max_attempts},
    )
    return job


def renew_lease(
    session: Session, job_id: int, owner: str, lease_seconds: float, now: datetime
) -> bool:
    """Extend ``owner``'s lease on a running job; False when the lease was lost (stop working)."""
    _aware(now)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def finish_job(
    session: Session,
    job_id: int,
    owner: str,
    now: datetime,
    *,
    bundle: BundleInfo | None = None,
    stage_seconds: dict[str, float] | None = None,
    details: dict[str, Any] | None = None,
    qc: dict[str, Any] | None = None,
) -> bool:
    """Mark ``owner``'s running job done; audit ``job_finished`` with bundle and stage times
    (and the slide-QC verdict ``qc``, stored on the job for the status page).

    Returns False (and changes nothing) when ``owner`` no longer holds the lease.
    """
    _aware(now)
    values: dict[str, Any] = {
        "state": JobState.DONE,
        "finished_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
        "last_error": None,
        "stage_seconds": stage_seconds,
        "qc": qc,
    }
    values.update(_bundle_values(bundle))
    row = _transition(session, job_id, owner, values)
    if row is None:
        return False
    job = _record(session, row)
    audit.record(
        session,
        Event.JOB_FINISHED,
        at=now,
        job_id=job.id,
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=job.series_instance_uid,
        details={
            "attempt": job.attempts,
            **_bundle_details(bundle),
            "stage_seconds": stage_seconds or {},
            **({"qc_verdict": qc["verdict"]} if qc else {}),
            **(details or {}),
        },
    )
    return True


def fail_job(
    session: Session,
    job_id: int,
    owner: str,
    error: str,
    *,
    transient: bool,
    now: datetime,
    policy: RetryPolicy,
    bundle: BundleInfo | None = None,
    stage_seconds: dict[str, float] | None = None,
) -> JobState | None:
    """Record a failed attempt of ``owner``'s running job.

    Transient with attempts left: back to ``waiting`` with ``not_before = now + backoff``
    (audit ``job_retry``).  Permanent, or the last attempt: ``failed`` (audit ``job_failed``).
    Returns the new state, or None when ``owner`` no longer holds the lease.
    """
    _aware(now)
    current = session.execute(
        select(Job.attempts, Job.max_attempts).where(
            Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner
        )
    ).one_or_none()
    if current is None:
        return None
    attempts, max_attempts = current
    retry = transient and attempts < max_attempts
    message = error[:MAX_ERROR_CHARS]
    values: dict[str, Any] = {
        "lease_owner": None,
        "lease_expires_at": None,
        "last_error": message,
        "stage_seconds": stage_seconds,
    }
    values.update(_bundle_values(bundle))
    if retry:
        not_before = now + policy.delay(attempts)
        values.update(state=JobState.WAITING, not_before=not_before)
    else:
        values.update(state=JobState.FAILED, finished_at=now)
    row = _transition(session, job_id, owner, values)
    if row is None:
        return None
    job = _record(session, row)
    details: dict[str, Any] = {
        "error": message,
        "transient": transient,
        "attempt": attempts,
        "max_attempts": max_attempts,
        **_bundle_details(bundle),
    }
    if retry:
        details["not_before"] = not_before.isoformat()
    elif transient:
        details["reason"] = "attempts exhausted"
    audit.record(
        session,
        Event.JOB_RETRY if retry else Event.JOB_FAILED,
        at=now,
        job_id=job.id,
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=job.series_instance_uid,
        details=details,
    )
    return job.state


def release_job(session: Session, job_id: int, owner: str, now: datetime, reason: str) -> bool:
    """Give ``owner``'s running job back to the queue unfinished (the node is shutting down).

    The job is ``waiting`` again and claimable at once; the interrupted attempt is not counted.
    Audit ``job_released``.  False when ``owner`` no longer holds the lease.
    """
    _aware(now)
    row = _transition(
        session,
        job_id,
        owner,
        {
            "state": JobState.WAITING,
            "lease_owner": None,
            "lease_expires_at": None,
            "not_before": None,
            "attempts": Job.attempts - 1,
        },
    )
    if row is None:
        return False
    job = _record(session, row)
    audit.record(
        session,
        Event.JOB_RELEASED,
        at=now,
        job_id=job.id,
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=job.series_instance_uid,
        details={"owner": owner, "reason": reason},
    )
    return True


def requeue_expired(
    session: Session, now: datetime, gone: Mapping[str, str] | None = None
) -> list[JobRecord]:
    """Take back running jobs whose worker died or hung: their lease expired before ``now``, or
    their owner is one of ``gone`` (owner -> why, from :func:`glio_node.store.nodes.gone_owners`),
    which takes them back without waiting for the lease.

    A job with attempts left goes back to ``waiting`` (claimable at once); one that used its
    last attempt becomes ``failed``.  Audit per job: ``node_gone`` (naming the owner and why) or
    ``lease_expired``, and ``job_failed`` for the exhausted ones.  Safe to run on several nodes
    at once: each job is taken back by one of them.
    """
    _aware(now)
    gone = dict(gone or {})
    lapsed = and_(Job.lease_expires_at.is_not(None), Job.lease_expires_at < now)
    abandoned = or_(lapsed, Job.lease_owner.in_(list(gone))) if gone else lapsed
    taken = and_(Job.state == JobState.RUNNING, abandoned)
    # Two passes (attempts left / exhausted).  The owners are read first for the audit rows;
    # the UPDATE repeats the condition, so of two nodes sweeping at once only one takes a job.
    records: list[JobRecord] = []
    for exhausted in (False, True):
        attempts_cond = (
            Job.attempts >= Job.max_attempts if exhausted else Job.attempts < Job.max_attempts
        )
        old: dict[int, str | None] = {
            job_id: owner
            for job_id, owner in session.execute(
                select(Job.id, Job.lease_owner).where(taken, attempts_cond)
            )
        }
        if not old:
            continue
        values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
        if exhausted:
            values.update(
                state=JobState.FAILED,
                finished_at=now,
                last_error="the worker died or hung on the last attempt (its node gone or its lease expired)",
            )
        else:
            values.update(state=JobState.WAITING, not_before=None)
        rows = session.execute(
            update(Job)
            .where(taken, attempts_cond, Job.id.in_(list(old)))
            .values(**values)
            .returning(*_JOB_COLUMNS)
            .execution_options(synchronize_session=False)
        ).all()
        for row in rows:
            job = _record(session, row)
            records.append(job)
            owner = old.get(job.id)
            common = dict(
                at=now,
                job_id=job.id,
                study_instance_uid=job.study_instance_uid,
                series_instance_uid=job.series_instance_uid,
            )
            details: dict[str, Any] = {
                "owner": owner,
                "attempt": job.attempts,
                "requeued": not exhausted,
            }
            if owner in gone:
                audit.record(
                    session, Event.NODE_GONE, details={**details, "reason": gone[owner]}, **common
                )
            else:
                audit.record(session, Event.LEASE_EXPIRED, details=details, **common)
            if exhausted:
                audit.record(
                    session,
                    Event.JOB_FAILED,
                    details={
                        "error": job.last_error,
                        "transient": True,
                        "attempt": job.attempts,
                        "max_attempts": job.max_attempts,
                        "reason": "attempts exhausted",
                    },
                    **common,
                )
    return records


def record_progress(
    session: Session, job_id: int, owner: str, tiles_done: int, tiles_total: int, now: datetime
) -> bool:
    """Store how far ``owner``'s running job is (the status page's % and ETA); no audit row.

    False when ``owner`` no longer holds the job.  Callers throttle this to every few seconds.
    """
    _aware(now)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner)
        .values(tiles_done=tiles_done, tiles_total=tiles_total, progress_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def get_job(session: Session, job_id: int) -> JobRecord | None:
    """A snapshot of one job, or None."""
    row = session.execute(select(*_JOB_COLUMNS).where(Job.id == job_id)).one_or_none()
    return None if row is None else _record(session, row)


# ------------------------------------------------------------------------------------------

_JOB_COLUMNS = (
    Job.id,
    Job.series_id,
    Job.state,
    Job.attempts,
    Job.max_attempts,
    Job.lease_owner,
    Job.lease_expires_at,
    Job.not_before,
    Job.last_error,
    Job.created_at,
)


def _record(session: Session, row: Row[Any]) -> JobRecord:
    series_uid, study_uid = session.execute(
        select(Series.series_instance_uid, Series.study_instance_uid).where(
            Series.id == row.series_id
        )
    ).one()
    return JobRecord(
        id=row.id,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        state=JobState(row.state),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        lease_owner=row.lease_owner,
        lease_expires_at=row.lease_expires_at,
        not_before=row.not_before,
        last_error=row.last_error,
        created_at=row.created_at,
    )


def _transition(session: Session, job_id: int, owner: str, values: dict[str, Any]) -> Row | None:
    return session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner)
        .values(**values)
        .returning(*_JOB_COLUMNS)
        .execution_options(synchronize_session=False)
    ).one_or_none()


def _bundle_values(bundle: BundleInfo | None) -> dict[str, Any]:
    if bundle is None:
        return {}
    return {
        "bundle_name": bundle.name,
        "bundle_version": bundle.version,
        "bundle_sha256": bundle.sha256,
    }


def _bundle_details(bundle: BundleInfo | None) -> dict[str, Any]:
    if bundle is None:
        return {}
    return {"bundle": bundle.name, "bundle_version": bundle.version, "bundle_sha256": bundle.sha256}
