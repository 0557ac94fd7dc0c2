"""Quiet series become jobs.

A series quiet for ``[series] quiet_seconds`` whose headers say it is whole
(:mod:`glio_node.pipeline.series`) becomes a job (audit ``series_complete``); a quiet but
incomplete one is marked incomplete and waits ``incomplete_wait_seconds`` more, then becomes a
job with a warning in the audit trail (``series_incomplete``, with the job's id, so the job's own
trail carries it).  One guarded UPDATE per series decides which node queues it
(:func:`glio_node.store.series.take_for_queue`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pydicom

from glio_node.pipeline.series import series_gaps
from glio_node.redact import redacted_logger, series_tag
from glio_node.store import audit, queue, series
from glio_node.store.audit import Event
from glio_node.store.models import SeriesState
from glio_node.worker.context import WorkContext

log = redacted_logger(__name__)


def sweep_series(work: WorkContext) -> None:
    """Turn quiet series into jobs (module docstring)."""
    now = work.now()
    quiet = timedelta(seconds=work.settings.series.quiet_seconds)
    wait = timedelta(seconds=work.settings.series.incomplete_wait_seconds)
    with work.sessions.begin() as session:
        candidates = series.quiet_series(session, now - quiet)
    for candidate in candidates:
        if work.stopping.is_set():
            return
        gaps = series_gaps_on_disk(work, candidate.series_instance_uid)
        overdue = candidate.last_received_at <= now - quiet - wait
        if not gaps or overdue:
            _queue(work, candidate, gaps, now)
        elif candidate.state == SeriesState.RECEIVING:
            _wait_for_the_rest(work, candidate, gaps, now, until=candidate.last_received_at + quiet + wait)


def series_gaps_on_disk(work: WorkContext, series_instance_uid: str) -> list[str]:
    """What is missing from a series, read from its spooled files' headers (no pixel data); an
    unreadable file is a gap."""
    with work.sessions.begin() as session:
        paths = series.series_files(session, series_instance_uid)
    headers = []
    for p in paths:
        try:
            headers.append(pydicom.dcmread(p, stop_before_pixels=True))
        except (OSError, ValueError, EOFError, pydicom.errors.InvalidDicomError) as exc:
            return [f"instance file unreadable: {type(exc).__name__}"]
    return [g.message for g in series_gaps(headers)]


def _queue(work: WorkContext, candidate: series.QuietSeries, gaps: list[str], now: datetime) -> None:
    uid = candidate.series_instance_uid
    with work.sessions.begin() as session:
        if not series.take_for_queue(session, candidate):
            return  # another node queued it, or an instance arrived since
        details: dict[str, Any] = {"quiet_seconds": work.settings.series.quiet_seconds}
        if gaps:
            details.update(
                gaps=gaps[:10],
                warning="quiet and still incomplete after incomplete_wait_seconds; analysed as it is",
            )
        queued = queue.enqueue_series(
            session, uid, max_attempts=work.settings.worker.max_attempts, now=now
        )
        audit.record(
            session, Event.SERIES_INCOMPLETE if gaps else Event.SERIES_COMPLETE, at=now,
            series_instance_uid=uid, job_id=queued.job_id, details=details,
        )
    if gaps:
        log.warning("series %s queued incomplete as job %d: %s", series_tag(uid), queued.job_id, gaps[0])
    else:
        log.info("series %s complete: job %d queued", series_tag(uid), queued.job_id)


def _wait_for_the_rest(
    work: WorkContext, candidate: series.QuietSeries, gaps: list[str], now: datetime, *, until: datetime
) -> None:
    uid = candidate.series_instance_uid
    with work.sessions.begin() as session:
        if not series.mark_incomplete(session, candidate):
            return  # another node marked it first (and audited it)
        audit.record(
            session, Event.SERIES_INCOMPLETE, at=now, series_instance_uid=uid,
            details={"gaps": gaps[:10], "waiting_until": until.isoformat()},
        )
    log.info("series %s quiet but incomplete, waiting: %s", series_tag(uid), gaps[0])
