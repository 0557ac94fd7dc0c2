"""The spool emptied of what every destination has.

A job is purgeable once it is done, every delivery is sent (committed, on destinations with
Storage Commitment) and ``[storage] retention_seconds`` have passed
(:func:`glio_node.store.deliveries.purgeable_jobs`); its slide and results are removed from the
spool and the job row says so (audit ``purge``).
"""

from __future__ import annotations

from datetime import timedelta

from glio_node.redact import redacted_logger, series_tag
from glio_node.store import deliveries
from glio_node.worker.context import SpoolFolders, WorkContext

log = redacted_logger(__name__)


def purge(work: WorkContext, spool: SpoolFolders) -> None:
    """Remove delivered slides and results older than the retention period."""
    now = work.now()
    before = now - timedelta(seconds=work.settings.storage.retention_seconds)
    with work.sessions.begin() as session:
        jobs = deliveries.purgeable_jobs(session, before, work.commitment_destinations())
    for job in jobs:
        removed = spool.purge_series(job.study_instance_uid, job.series_instance_uid)
        with work.sessions.begin() as session:
            deliveries.mark_purged(session, job, removed, work.now())
        log.info(
            "job %d series %s purged from the spool: %d files",
            job.job_id, series_tag(job.series_instance_uid), removed,
        )
