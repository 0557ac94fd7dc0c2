"""Storage Commitment requests: which results to ask a destination to commit, and its answers.

A destination with ``storage_commitment = true`` keeps a job's deliveries ``sent`` (not enough
to purge the spool) until it confirms them: the node sends an N-ACTION naming the ``sent``
objects under a fresh Transaction UID (one :class:`~glio_node.store.models.StorageCommitment`
row per request), and the destination answers later with an N-EVENT-REPORT carrying the same
Transaction UID.  Then

- every object it lists as committed becomes ``committed`` (with ``committed_at``);
- every object it lists as failed goes back to ``pending`` and is sent again, until the
  delivery has used ``max_attempts`` sends, then it is ``failed``;
- an N-ACTION that is refused, or a report that never comes (``commitment_timeout_seconds``),
  is asked again after a capped backoff, at most ``max_requests`` times per job and destination.

Like the other store modules, every function runs in the caller's transaction, writes its audit
row into it, and takes ``now`` (aware UTC).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from glio_node.store import audit
from glio_node.store.audit import Event
from glio_node.store.models import (
    CommitmentState,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Series,
    StorageCommitment,
)
from glio_node.store.queue import RetryPolicy


@dataclass(frozen=True)
class CommitmentRequest:
    """A request just opened: what the N-ACTION must carry."""

    id: int
    job_id: int
    destination: str
    attempt: int  # 1 for the first request of this job on this destination
    transaction_uid: str
    references: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID) of each object
    study_instance_uid: str
    series_instance_uid: str  # of the analysed slide (the audit trail's key)


@dataclass(frozen=True)
class ReportOutcome:
    """What one N-EVENT-REPORT changed."""

    job_id: int
    destination: str
    committed: int  # deliveries now ``committed``
    resend: int  # failed objects to be sent again
    given_up: int  # failed objects whose deliveries have used every attempt
    unknown: int  # UIDs in the report that this request did not reference


NOT_COMMITTED = "not committed"  # last_status of deliveries given up by _give_up


def open_requests(
    session: Session,
    destinations: Collection[str],
    now: datetime,
    *,
    max_requests: int,
    limit: int = 16,
) -> list[CommitmentRequest]:
    """Open one request for each done, unpurged job whose results on one of ``destinations``
    are all sent (none pending) and not yet committed, unless a request is already waiting for
    its answer, the last one's ``retry_at`` has not come, or ``max_requests`` were made.

    The rows are ``requested`` once the caller commits; the N-ACTION is sent after that, so the
    answer always finds its row.  Audit ``commitment_requested``.
    """
    if not destinations:
        return []
    rows = session.execute(
        select(
            Delivery.job_id,
            Delivery.destination,
            Delivery.state,
            Delivery.sop_class_uid,
            Delivery.sop_instance_uid,
            Delivery.delivered_at,
        )
        .join(Job, Job.id == Delivery.job_id)
        .where(Job.state == JobState.DONE, Job.purged_at.is_(None))
        .where(Delivery.destination.in_(list(destinations)))
        .where(  # only jobs with something still to commit: committed jobs cost nothing here
            Delivery.job_id.in_(
                select(Delivery.job_id)
                .where(Delivery.state == DeliveryState.SENT)
                .where(Delivery.destination.in_(list(destinations)))
            )
        )
        .order_by(Delivery.job_id, Delivery.id)
    ).all()
    by_pair: dict[tuple[int, str], list[Any]] = defaultdict(list)
    for row in rows:
        by_pair[(row.job_id, row.destination)].append(row)
    ready = {
        pair: [(r.sop_class_uid, r.sop_instance_uid) for r in items if r.state == DeliveryState.SENT]
        for pair, items in by_pair.items()
        if not any(r.state == DeliveryState.PENDING for r in items)
        and any(r.state == DeliveryState.SENT for r in items)
    }
    if not ready:
        return []
    history: dict[tuple[int, str], list[StorageCommitment]] = defaultdict(list)
    for request in session.scalars(
        select(StorageCommitment)
        .where(StorageCommitment.job_id.in_({job_id for job_id, _ in ready}))
        .order_by(StorageCommitment.attempt)
    ):
        history[(request.job_id, request.destination)].append(request)
    uids = {
        job_id: (study, series)
        for job_id, study, series in session.execute(
            select(Job.id, Series.study_instance_uid, Series.series_instance_uid)
            .join(Series, Series.id == Job.series_id)
            .where(Job.id.in_({job_id for job_id, _ in ready}))
        )
    }
    opened: list[CommitmentRequest] = []
    for (job_id, destination), references in sorted(ready.items()):
        past = history[(job_id, destination)]
        if any(r.state == CommitmentState.REQUESTED for r in past):
            continue
        # Only unanswered, refused or failed requests made since the objects were last sent
        # count: a re-send (an operator's, or of objects a report named failed) starts afresh.
        sent_at = [r.delivered_at for r in by_pair[(job_id, destination)] if r.delivered_at]
        last_sent = max(sent_at) if sent_at else None
        misses = [
            r for r in past
            if r.state != CommitmentState.CONFIRMED
            and (last_sent is None or r.requested_at >= last_sent)
        ]
        if len(misses) >= max_requests:
            _give_up(session, job_id, destination, len(misses), uids[job_id], now)
            continue
        if past and past[-1].retry_at is not None and past[-1].retry_at > now:
            continue
        attempt = len(past) + 1
        row = StorageCommitment(
            job_id=job_id,
            destination=destination,
            attempt=attempt,
            transaction_uid=generate_uid(),
            state=CommitmentState.REQUESTED,
            sop_instance_uids=[uid for _, uid in references],
            requested_at=now,
        )
        session.add(row)
        session.flush()
        study, series = uids[job_id]
        audit.record(
            session,
            Event.COMMITMENT_REQUESTED,
            at=now,
            job_id=job_id,
            study_instance_uid=study,
            series_instance_uid=series,
            details={
                "destination": destination,
                "transaction_uid": row.transaction_uid,
                "objects": len(references),
                "attempt": attempt,
            },
        )
        opened.append(
            CommitmentRequest(
                row.id, job_id, destination, attempt, row.transaction_uid,
                tuple(references), study, series,
            )
        )
        if len(opened) >= limit:
            break
    return opened


def record_refusal(
    session: Session,
    request: CommitmentRequest,
    status: str,
    now: datetime,
    policy: RetryPolicy,
    *,
    max_requests: int,
) -> datetime | None:
    """The N-ACTION of ``request`` was refused or could not be sent: ``refused``, asked again
    after the backoff (None when ``max_requests`` are used up).  Audit ``commitment_failed``."""
    misses = _misses_this_round(session, request.job_id, request.destination)
    give_up = misses >= max_requests
    retry_at = None if give_up else now + policy.delay(misses)
    _close(session, request.id, CommitmentState.REFUSED, now, status, retry_at)
    details: dict[str, Any] = {
        "destination": request.destination,
        "transaction_uid": request.transaction_uid,
        "reason": "n_action_refused",
        "status": status,
        "attempt": request.attempt,
    }
    details.update({"gave_up": True} if give_up else {"retry_at": retry_at.isoformat()})
    audit.record(
        session,
        Event.COMMITMENT_FAILED,
        at=now,
        job_id=request.job_id,
        study_instance_uid=request.study_instance_uid,
        series_instance_uid=request.series_instance_uid,
        details=details,
    )
    return retry_at


def expire_requests(
    session: Session,
    timeouts: Mapping[str, float],
    now: datetime,
    policy: RetryPolicy,
    *,
    max_requests: int,
) -> list[tuple[int, str]]:
    """Requests still waiting ``timeouts[destination]`` seconds after they were sent become
    ``expired`` and are asked again after the backoff.  Audit ``commitment_failed``.  Returns
    the (job id, destination) pairs expired.  A report that arrives later still counts."""
    expired: list[tuple[int, str]] = []
    for name, seconds in timeouts.items():
        rows = session.execute(
            select(StorageCommitment, Series.study_instance_uid, Series.series_instance_uid)
            .join(Job, Job.id == StorageCommitment.job_id)
            .join(Series, Series.id == Job.series_id)
            .where(
                StorageCommitment.destination == name,
                StorageCommitment.state == CommitmentState.REQUESTED,
                StorageCommitment.requested_at <= now - timedelta(seconds=seconds),
            )
        ).all()
        for row, study, series in rows:
            misses = _misses_this_round(session, row.job_id, name)
            give_up = misses >= max_requests
            retry_at = None if give_up else now + policy.delay(misses)
            taken = _close(
                session, row.id, CommitmentState.EXPIRED, None,
                f"no N-EVENT-REPORT within {seconds:g} s", retry_at,
                only_if=CommitmentState.REQUESTED,
            )
            if not taken:
                continue
            details: dict[str, Any] = {
                "destination": name,
                "transaction_uid": row.transaction_uid,
                "reason": "no_report",
                "timeout_seconds": seconds,
                "attempt": row.attempt,
            }
            details.update({"gave_up": True} if give_up else {"retry_at": retry_at.isoformat()})
            audit.record(
                session, Event.COMMITMENT_FAILED, at=now, job_id=row.job_id,
                study_instance_uid=study, series_instance_uid=series, details=details,
            )
            expired.append((row.job_id, name))
    return expired


def record_report(
    session: Session,
    transaction_uid: str,
    committed: Collection[str],
    failed: Mapping[str, int | None],
    now: datetime,
    *,
    max_attempts: int,
    calling_ae: str | None = None,
    address: str | None = None,
    reporters: Mapping[str, str] | None = None,
) -> ReportOutcome | None:
    """Apply an N-EVENT-REPORT: ``committed`` SOP Instance UIDs become ``committed``; ``failed``
    ones (UID -> Failure Reason) are sent again, or ``failed`` once the delivery has had
    ``max_attempts`` sends.  Audit ``commitment_confirmed`` and/or ``commitment_failed``.

    Returns None when no request has ``transaction_uid``, or when ``reporters`` names the AE
    title of the request's destination and the report came from another (nothing changes):
    a Transaction UID travels in clear, and a confirmation lets the spool be purged.
    """
    found = session.execute(
        select(StorageCommitment, Series.study_instance_uid, Series.series_instance_uid)
        .join(Job, Job.id == StorageCommitment.job_id)
        .join(Series, Series.id == Job.series_id)
        .where(StorageCommitment.transaction_uid == transaction_uid)
    ).first()
    if found is None:
        return None
    request, study, series = found
    expected = (reporters or {}).get(request.destination)
    if expected and calling_ae != expected:
        return None
    referenced = set(request.sop_instance_uids)
    deliveries = {
        d.sop_instance_uid: d
        for d in session.scalars(
            select(Delivery).where(
                Delivery.job_id == request.job_id,
                Delivery.destination == request.destination,
                Delivery.sop_instance_uid.in_(referenced),
            )
        )
    }
    unknown = [uid for uid in (*committed, *failed) if uid not in deliveries]
    n_committed = 0
    for uid in committed:
        d = deliveries.get(uid)
        given_up_waiting = d is not None and d.state == DeliveryState.FAILED and d.last_status == NOT_COMMITTED
        if d is not None and (d.state == DeliveryState.SENT or given_up_waiting):
            # A late report still counts, even after the node stopped asking (_give_up).
            d.state = DeliveryState.COMMITTED
            d.committed_at = now
            n_committed += 1
    resend = given_up = 0
    for uid in failed:
        d = deliveries.get(uid)
        if d is None or d.state != DeliveryState.SENT:
            continue
        if d.attempts < max_attempts:
            d.state, d.next_attempt_at = DeliveryState.PENDING, now
            resend += 1
        else:
            d.state, d.next_attempt_at = DeliveryState.FAILED, None
            given_up += 1
        d.last_status = f"commitment failed: {_reason(failed[uid])}"[:64]
    failures = [
        {"sop_instance_uid": uid, "failure_reason": reason} for uid, reason in failed.items()
    ]
    state = CommitmentState.FAILED if failed else CommitmentState.CONFIRMED
    # A late report for an expired request still counts: the destination has the objects.
    # Its retry_at (from the expiry) is kept so a new request waits as it would have.
    request.state = state
    request.answered_at = now
    request.failures = failures or None
    request.last_status = "event type 2" if failed else "event type 1"
    if failed:
        request.retry_at = now  # ask again as soon as the re-sent objects are stored
    common: dict[str, Any] = {
        "at": now,
        "job_id": request.job_id,
        "study_instance_uid": study,
        "series_instance_uid": series,
        "calling_ae": calling_ae,
        "address": address,
    }
    base = {"destination": request.destination, "transaction_uid": transaction_uid}
    if committed:
        audit.record(
            session, Event.COMMITMENT_CONFIRMED,
            details={**base, "committed": n_committed, "referenced": len(referenced)}, **common,
        )
    if failed or unknown:
        audit.record(
            session, Event.COMMITMENT_FAILED,
            details={
                **base, "reason": "failed_objects" if failed else "unknown_objects",
                "failures": failures[:50], "resend": resend, "gave_up": given_up,
                "unknown": unknown[:10],
            },
            **common,
        )
    return ReportOutcome(
        request.job_id, request.destination, n_committed, resend, given_up, len(unknown)
    )


def requests_of(session: Session, job_id: int) -> list[StorageCommitment]:
    """The commitment requests of a job, oldest first (for logs, the status page and tests)."""
    return list(
        session.scalars(
            select(StorageCommitment)
            .where(StorageCommitment.job_id == job_id)
            .order_by(StorageCommitment.id)
        )
    )


# Failure Reason (0008,1197), PS3.3 C.14.1.1 / PS3.4 J.3.2.1.1
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0xA770: "resource limitation",
}


def _reason(code: int | None) -> str:
    if code is None:
        return "no reason given"
    return f"0x{code:04X} {FAILURE_REASONS.get(code, '')}".strip()


def _close(
    session: Session,
    request_id: int,
    state: CommitmentState,
    answered_at: datetime | None,
    status: str,
    retry_at: datetime | None,
    *,
    only_if: CommitmentState | None = None,
) -> bool:
    stmt = update(StorageCommitment).where(StorageCommitment.id == request_id)
    if only_if is not None:
        stmt = stmt.where(StorageCommitment.state == only_if)
    return bool(
        session.execute(
            stmt.values(
                state=state, answered_at=answered_at, last_status=status[:64], retry_at=retry_at
            ).execution_options(synchronize_session=False)
        ).rowcount
    )


def _misses_this_round(session: Session, job_id: int, destination: str) -> int:
    """Requests for this job and destination, not confirmed, made since its objects were last
    sent (the one being closed included): the count that ``max_requests`` and the backoff
    apply to, the same as :func:`open_requests` counts.  A re-send starts a new round."""
    last_sent = session.scalar(
        select(func.max(Delivery.delivered_at)).where(
            Delivery.job_id == job_id, Delivery.destination == destination
        )
    )
    query = select(func.count()).select_from(StorageCommitment).where(
        StorageCommitment.job_id == job_id,
        StorageCommitment.destination == destination,
        StorageCommitment.state != CommitmentState.CONFIRMED,
    )
    if last_sent is not None:
        query = query.where(StorageCommitment.requested_at >= last_sent)
    return int(session.scalar(query) or 0)


def _give_up(
    session: Session, job_id: int, destination: str, misses: int, uids: tuple[str, str], now: datetime
) -> None:
    """No commitment after ``misses`` requests: the sent-but-uncommitted deliveries become
    ``failed``, so the status page and /metrics show them and an operator can re-send;
    without this the slide would stay on the spool, unpurgeable, with nobody told."""
    changed = session.execute(
        update(Delivery)
        .where(
            Delivery.job_id == job_id,
            Delivery.destination == destination,
            Delivery.state == DeliveryState.SENT,
        )
        .values(state=DeliveryState.FAILED, last_status=NOT_COMMITTED, next_attempt_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if changed:
        audit.record(
            session,
            Event.COMMITMENT_FAILED,
            at=now,
            job_id=job_id,
            study_instance_uid=uids[0],
            series_instance_uid=uids[1],
            details={
                "destination": destination,
                "objects": changed,
                "given_up_after_requests": misses,
                "reason": "no storage commitment after the maximum number of requests; "
                "re-send the job's results once the destination is fixed",
            },
        )
