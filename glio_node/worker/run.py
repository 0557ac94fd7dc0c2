"""Running jobs: claim, a worker thread per job, lease renewal, finish or fail / retry.

One job, top to bottom (:meth:`JobRunner.run_claimed`): the series' spooled files ->
``run_job`` (which returns the objects it wrote: nothing reads them back) -> the QuPath GeoJSON
into ``[geojson] folder`` when one is set (atomic write) -> ``finish_job`` with the bundle and
stage times, ``objects_created`` (naming the GeoJSON) and one delivery per destination and DICOM
object (the GeoJSON to ``type = "geojson"`` destinations, by HTTP POST), in one transaction.  ``BadInput``, ``BundleError`` and ``PermanentError`` fail the job with their
message; any other error is transient and retried with capped backoff until ``max_attempts``.
A job whose lease was lost meanwhile (another node took it back) drops its result.

Log lines name jobs by id and series by a short hash of the UID, never patient data.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glio_node.errors import BadInput, BundleError, PermanentError, TransientError
from glio_node.job import BundleCache
from glio_node.pipeline.analyze import AnalysisOptions
from glio_node.redact import redacted_logger, series_tag, without_uids
from glio_node.store import audit, deliveries, queue, series
from glio_node.store.audit import Event
from glio_node.worker.context import SpoolFolders, WorkContext

log = redacted_logger(__name__)

RunJob = Callable[..., Any]  # glio_node.job.run_job's signature

PROGRESS_SECONDS = 2.0  # a running job's progress is written at most this often


class JobRunner:
    """This node's running jobs: at most ``[worker] concurrency`` threads, each one job.

    ``bundle_dir``: the model bundle every job runs with; ``run_job`` defaults to
    :func:`glio_node.job.run_job` (tests pass it with fakes bound); ``bundles`` keeps the models
    loaded between jobs.
    """

    def __init__(
        self,
        work: WorkContext,
        spool: SpoolFolders,
        bundle_dir: Path,
        *,
        run_job: RunJob | None = None,
        bundles: BundleCache | None = None,
    ):
        self.work = work
        self.spool = spool
        self.bundle_dir = Path(bundle_dir)
        self.bundles = bundles or BundleCache()
        self._run_job = run_job
        self._running: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()

    def running_jobs(self) -> list[int]:
        with self._lock:
            return [job_id for job_id, t in self._running.items() if t.is_alive()]

    def dispatch(self) -> None:
        """Claim jobs while this node has free worker slots; run each in a thread."""
        work = self.work
        while not work.stopping.is_set():
            with self._lock:
                self._running = {k: t for k, t in self._running.items() if t.is_alive()}
                if len(self._running) >= work.settings.worker.concurrency:
                    return
                with work.sessions.begin() as session:
                    job = queue.claim_job(
                        session, work.owner, work.settings.worker.lease_seconds, work.now()
                    )
                if job is None:
                    return
                thread = threading.Thread(
                    target=self.run_claimed, args=(job,), name=f"glio-job-{job.id}", daemon=True
                )
                self._running[job.id] = thread
            thread.start()

    def renew_leases(self) -> None:
        """Keep the leases of this node's running jobs (the scheduler calls this every third of
        a lease)."""
        work = self.work
        for job_id in self.running_jobs():
            with work.sessions.begin() as session:
                kept = queue.renew_lease(
                    session, job_id, work.owner, work.settings.worker.lease_seconds, work.now()
                )
            if not kept:
                log.warning("job %d: lease lost (another node may run it); its result is dropped", job_id)

    def release_unfinished(self) -> list[int]:
        """Give the jobs still running back to the queue (the node stops); their ids."""
        left = self.running_jobs()
        for job_id in left:
            with self.work.sessions.begin() as session:
                queue.release_job(
                    session, job_id, self.work.owner, self.work.now(),
                    "node stopped before the job finished",
                )
            log.warning("job %d released: the node stopped before it finished", job_id)
        return left

    def run_claimed(self, job: queue.JobRecord) -> None:
        """Run one claimed job to its end state (module docstring)."""
        work = self.work
        started = time.monotonic()
        tag = series_tag(job.series_instance_uid)
        attempt = f"attempt {job.attempts}/{job.max_attempts}"
        log.info("job %d series %s started (%s)", job.id, tag, attempt)
        try:
            with work.sessions.begin() as session:
                paths = [Path(p) for p in series.series_files(session, job.series_instance_uid)]
            out_dir = self.spool.results_dir(job.study_instance_uid, job.series_instance_uid)
            if out_dir.exists():  # left by an attempt that died; the rerun writes the same UIDs
                shutil.rmtree(out_dir)
            run = self._run_job
            if run is None:
                from glio_node.job import run_job as run
            summary = run(
                paths, out_dir, self.bundle_dir, device=work.settings.worker.device,
                bundles=self.bundles, progress=self._progress_writer(job.id),
                options=AnalysisOptions(qc=work.settings.qc.thresholds()),
                # The sweep queued this series whole, or incomplete past incomplete_wait_seconds
                # (with its warning audited): analyse what arrived; the SR says what did not.
                allow_gaps=True,
            )
            objects = [
                deliveries.ResultObject(o.sop_instance_uid, o.sop_class_uid, str(Path(o.path).absolute()))
                for o in summary.objects
            ]
            geojson = self._deliver_geojson(summary)
            geojson_object = _geojson_object(summary)
        except (BadInput, BundleError, PermanentError) as exc:
            self._fail(job, str(exc), transient=False, started=started)
            return
        except Exception as exc:  # noqa: BLE001 - any other failure of one job is retried, not fatal to the node
            log.exception("job %d series %s: unexpected error", job.id, tag)
            self._fail(job, f"{type(exc).__name__}: {exc}", transient=True, started=started)
            return
        bundle = queue.BundleInfo(summary.bundle_name, summary.bundle_version, summary.bundle_sha256)
        destinations = list(work.destinations)
        now = work.now()
        with work.sessions.begin() as session:
            done = queue.finish_job(
                session,
                job.id,
                work.owner,
                now,
                bundle=bundle,
                stage_seconds={k: round(v, 3) for k, v in summary.stage_seconds.items()},
                qc=summary.qc,
                details={
                    "objects": len(objects), "device": summary.device,
                    **({"notes": list(summary.notes)} if summary.notes else {}),
                    # the OOD gate's verdict, shown in the status page's event details
                    **({"ood": summary.ood} if summary.ood else {}),
                },
            )
            if done:
                audit.record(
                    session,
                    Event.OBJECTS_CREATED,
                    at=now,
                    job_id=job.id,
                    study_instance_uid=job.study_instance_uid,
                    series_instance_uid=job.series_instance_uid,
                    details={
                        "objects": [
                            {"sop_instance_uid": o.sop_instance_uid, "sop_class_uid": o.sop_class_uid}
                            for o in objects
                        ],
                        "bundle": bundle.name,
                        "bundle_version": bundle.version,
                        **({"geojson": geojson.name} if geojson else {}),
                    },
                )
                # DICOM objects to DICOM destinations; the GeoJSON to "geojson" (HTTP) ones.
                by_type: dict[bool, list[str]] = defaultdict(list)
                for d in work.destinations.values():
                    by_type[d.type == "geojson"].append(d.name)
                deliveries.add_deliveries(session, job.id, by_type[False], objects, now)
                if geojson_object is not None:
                    deliveries.add_deliveries(session, job.id, by_type[True], [geojson_object], now)
        if not done:
            log.warning("job %d series %s finished after its lease was lost; result dropped", job.id, tag)
            return
        log.info(
            "job %d series %s done in %.1f s (%s): %d objects, bundle %s %s on %s, "
            "%d destination(s) to deliver",
            job.id, tag, time.monotonic() - started, attempt, len(objects),
            bundle.name, bundle.version, summary.device, len(destinations),
        )

    def _deliver_geojson(self, summary: Any) -> Path | None:
        """The job's QuPath GeoJSON into ``[geojson] folder`` (atomic write), if one is set.

        Before the job is finished, so a folder that cannot be written fails the attempt and
        it is retried like any transient error; a re-run replaces the file.
        """
        folder = self.work.settings.geojson.folder_path
        if folder is None or not getattr(summary, "geojson", None):
            return None
        from glio_node.writers.geojson import atomic_write_bytes

        written = Path(summary.geojson)
        target = folder / written.name
        try:
            atomic_write_bytes(target, written.read_bytes())
        except OSError as exc:
            raise TransientError(
                f"[geojson] folder {folder} cannot be written ({exc.strerror or exc}): check that "
                "it is a folder the service may write to; the job is retried"
            ) from exc
        return target

    def _fail(self, job: queue.JobRecord, error: str, *, transient: bool, started: float) -> None:
        work = self.work
        with work.sessions.begin() as session:
            state = queue.fail_job(
                session, job.id, work.owner, error,
                transient=transient, now=work.now(), policy=work.policy,
            )
        how = {"waiting": "will be retried", "failed": "failed"}.get(
            state.value if state else "", "lease lost"
        )
        log.error(
            "job %d series %s %s after %.1f s (attempt %d/%d): %s",
            job.id, series_tag(job.series_instance_uid), how,
            time.monotonic() - started, job.attempts, job.max_attempts, without_uids(error),
        )

    def _progress_writer(self, job_id: int) -> Callable[[int, int], None]:
        """The pipeline's progress callback: tiles done / total into the job row (for the
        status page's % and ETA), at most every PROGRESS_SECONDS, and always the last call."""
        work = self.work
        last = [0.0]

        def write(done: int, total: int) -> None:
            t = time.monotonic()
            if done < total and t - last[0] < PROGRESS_SECONDS:
                return
            last[0] = t
            with work.sessions.begin() as session:
                queue.record_progress(session, job_id, work.owner, done, total, work.now())

        return write


def _geojson_object(summary: Any) -> deliveries.ResultObject | None:
    """The job's GeoJSON as a delivery object: not DICOM, so its "SOP Instance UID" is derived
    from the file name (the same on a re-run) and its class is ``GEOJSON_CLASS``."""
    from glio_node.send.geojson_http import GEOJSON_CLASS

    path = getattr(summary, "geojson", None)
    if not path:
        return None
    name = Path(path).name
    return deliveries.ResultObject(
        sop_instance_uid=f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f'glio-node/geojson/{name}').int}",
        sop_class_uid=GEOJSON_CLASS,
        path=str(Path(path).absolute()),
    )
