"""Storage Commitment requests for what was delivered (destinations with ``storage_commitment``).

Every second: requests that got no N-EVENT-REPORT within ``commitment_timeout_seconds`` are
expired (asked again after a backoff); every job whose results on such a destination are all
sent gets a request (:func:`glio_node.store.commitments.open_requests`: a row with its
Transaction UID and the audit row ``commitment_requested``), then the N-ACTION
(:func:`glio_node.send.commitment.request_commitment`).  A refused or unreachable request is
asked again after a backoff.  The report itself usually comes on a new association to the
receiver; one sent on the request's own association goes to ``on_report``, the receiver's
handler, which the scheduler passes in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import IntegrityError

from glio_node.redact import redacted_logger
from glio_node.send.commitment import request_commitment
from glio_node.store import commitments
from glio_node.worker.context import WorkContext

log = redacted_logger(__name__)

ReportHandler = Callable[[Any], Any]  # a pynetdicom EVT_N_EVENT_REPORT handler


def request_commitments(work: WorkContext, on_report: ReportHandler) -> None:
    """Expire unanswered commitment requests, then send an N-ACTION for every job whose
    results on a commitment destination are all sent (module docstring)."""
    names = work.commitment_destinations()
    if not names or work.stopping.is_set():
        return
    destinations = work.destinations
    max_requests = work.settings.worker.delivery_max_attempts
    timeouts = {n: destinations[n].commitment_timeout_seconds for n in names}
    with work.sessions.begin() as session:
        expired = commitments.expire_requests(
            session, timeouts, work.now(), work.policy, max_requests=max_requests
        )
    for job_id, name in expired:
        log.warning(
            "destination %s sent no Storage Commitment report for job %d within %.0f s; "
            "asking again after a backoff", name, job_id, timeouts[name],
        )
    try:
        with work.sessions.begin() as session:
            opened = commitments.open_requests(session, names, work.now(), max_requests=max_requests)
    except IntegrityError:  # another node opened the same request first
        return
    for request in opened:
        answer = request_commitment(
            destinations[request.destination], work.settings.node.ae_title,
            request.transaction_uid, request.references, on_report=on_report,
        )
        if answer.ok:
            log.info(
                "destination %s asked to commit %d object(s) of job %d (request %d)",
                request.destination, len(request.references), request.job_id, request.attempt,
            )
            continue
        with work.sessions.begin() as session:
            retry_at = commitments.record_refusal(
                session, request, answer.status, work.now(), work.policy, max_requests=max_requests
            )
        log.warning(
            "destination %s refused the Storage Commitment request for job %d: %s; the "
            "spool keeps the job until it is confirmed (%s). If this destination does not "
            "support Storage Commitment, set storage_commitment = false for it",
            request.destination, request.job_id, answer.status,
            f"asking again at {retry_at:%H:%M:%S} UTC" if retry_at else "gave up asking",
        )
