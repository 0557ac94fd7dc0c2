"""The node's background work, run by APScheduler in-process (``glio-node serve``).

Periodic jobs, each a method of :class:`NodeScheduler` that tests may also call directly:

- ``sweep_series``: a series quiet for ``[series] quiet_seconds`` whose headers say it is whole
  (:mod:`glio_node.pipeline.series`) becomes a job; a quiet but incomplete one waits
  ``incomplete_wait_seconds`` more, then becomes a job with a warning in the audit trail;
- ``dispatch``: claim up to ``[worker] concurrency`` jobs and run each in a worker thread;
- ``renew_leases``: keep the leases of this node's running jobs (every third of a lease);
- ``requeue_expired``: take back the jobs and claimed deliveries of a node that is gone (its
  process on this host has exited, or its heartbeat is ``node_silent_seconds`` old), and jobs
  whose lease passed (:func:`glio_node.store.nodes.gone_owners`);
- ``deliver``: send pending result objects, one association / request per destination;
- ``request_commitments``: for destinations with ``storage_commitment = true``, ask for Storage
  Commitment of a job's sent results (N-ACTION), and ask again when it was refused or no
  N-EVENT-REPORT came within ``commitment_timeout_seconds`` (:mod:`glio_node.store.commitments`);
- ``purge``: remove a slide and its results from the spool once every destination has them
  (committed, on destinations with Storage Commitment) and ``[storage] retention_seconds`` have
  passed;
- ``poll-<name>``, one per ``[[sources]]`` entry, every ``poll_seconds``: take new series from a
  DICOMweb server into the spool (:mod:`glio_node.pull.poller`); from there they are swept like
  C-STORE'd ones.  A node without sources has no such job.

One job, top to bottom (:meth:`NodeScheduler.run_claimed`): the series' spooled files ->
``run_job`` -> the QuPath GeoJSON into ``[geojson] folder`` when one is set (atomic write) ->
``finish_job`` with the bundle and stage times, ``objects_created`` (naming the GeoJSON) and one
delivery per destination and DICOM object (the GeoJSON to ``type = "geojson"`` destinations, by
HTTP POST), in one transaction.  ``BadInput``, ``BundleError`` and
``PermanentError`` fail the job with their message; any other error is transient and retried
with capped backoff until ``max_attempts``.

Log lines name jobs by id and series by a short hash of the UID, never patient data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import Destination, Settings
from glio_node.errors import BadInput, BundleError, PermanentError, TransientError
from glio_node.job import BundleCache
from glio_node.pipeline.series import series_gaps
from glio_node.pull.poller import SourcePoller
from glio_node.receive.spool import Spool
from glio_node.redact import redacted_logger, without_uids
from glio_node.send import ResultSender, SendResult, make_sender
from glio_node.store import audit, commitments, deliveries, nodes, queue
from glio_node.store.audit import Event
from glio_node.store.models import Instance, Series, SeriesState

log = redacted_logger(__name__)

Sessions = sessionmaker[Session]
RunJob = Callable[..., Any]  # glio_node.job.run_job's signature

DELIVERY_LEASE_SECONDS = 300.0  # a claimed delivery is not sent by another node for this long
DELIVERY_BATCH = 64  # objects per association / STOW-RS request
PROGRESS_SECONDS = 2.0  # a running job's progress is written at most this often


def series_tag(series_instance_uid: str) -> str:
    """A short, stable, non-identifying name for a series in log lines."""
    return "s-" + hashlib.sha256(series_instance_uid.encode()).hexdigest()[:10]


def default_owner() -> str:
    """This process's name on the queue: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class NodeScheduler:
    """Sweeps series into jobs, runs jobs, delivers and purges; see the module docstring.

    ``bundle_dir``: the model bundle every job runs with.  ``run_job`` and ``sender_factory``
    default to the real pipeline and senders; tests may pass their own.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: Sessions,
        spool: Spool,
        bundle_dir: Path,
        *,
        owner: str | None = None,
        run_job: RunJob | None = None,
        sender_factory: Callable[[Destination, str], ResultSender] = make_sender,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.settings = settings
        self.sessions = sessions
        self.spool = spool
        self.bundle_dir = Path(bundle_dir)
        self.owner = owner or default_owner()
        self._run_job = run_job
        self._bundles = BundleCache()
        self._sender_factory = sender_factory
        self.now = clock
        w = settings.worker
        self.policy = queue.RetryPolicy(w.backoff_base_seconds, w.backoff_max_seconds)
        self.destinations = {d.name: d for d in settings.destinations}
        self._running: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._scheduler: Any = None
        self.pollers = [SourcePoller(s, sessions, spool, clock=clock) for s in settings.sources]

    # -- lifecycle -------------------------------------------------------------------------

    def preload(self) -> None:
        """Choose the device and load the bundle's models now, so the first slide does not wait
        seconds for them and a bundle that cannot load stops the node at start.  The device is
        chosen for the runtimes the manifest names (no TensorFlow for an ONNX-only bundle), and
        the cache is keyed by it, as the jobs will ask for it."""
        from glio_node.bundle import load_manifest
        from glio_node.runtime.runners import prepare_device

        device = self.settings.worker.device
        prepare_device(device, load_manifest(self.bundle_dir))
        self._bundles.get(self.bundle_dir, device)

    def start(self) -> None:
        """Start the periodic jobs in background threads."""
        from apscheduler.schedulers.background import BackgroundScheduler

        s = self.settings
        poll = min(max(s.series.quiet_seconds / 2, 0.5), 10.0)
        scheduler = BackgroundScheduler(
            timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1}
        )
        every = [
            (self.sweep_series, poll),
            (self.dispatch, 1.0),
            (self.renew_leases, max(s.worker.lease_seconds / 3, 0.5)),
            (self.requeue_expired, nodes.HEARTBEAT_SECONDS),
            (self.deliver, 1.0),
            (self.request_commitments, 1.0),
            (self.purge, 60.0 if s.storage.retention_seconds >= 60 else 5.0),
            (self.heartbeat, nodes.HEARTBEAT_SECONDS),
        ]
        for func, seconds in every:
            scheduler.add_job(
                func, "interval", seconds=seconds, id=func.__name__, next_run_time=self.now()
            )
        for poller in self.pollers:
            scheduler.add_job(
                poller.poll, "interval", seconds=poller.source.poll_seconds,
                id=f"poll-{poller.source.name}", next_run_time=self.now(),
            )
        scheduler.start()
        self._scheduler = scheduler

    def stop(self, grace_seconds: float) -> bool:
        """Stop taking work; wait up to ``grace_seconds`` for running jobs (renewing their
        leases), then give the unfinished ones back to the queue.  True when none was left."""
        self._stopping.set()
        for poller in self.pollers:
            poller.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
        deadline = time.monotonic() + grace_seconds
        # The heartbeat job has stopped with the scheduler: beat here, or other nodes would
        # take these jobs back while they finish.
        renew_every = min(max(self.settings.worker.lease_seconds / 3, 0.5), nodes.HEARTBEAT_SECONDS)
        next_renew = time.monotonic() + renew_every
        while self.running_jobs() and time.monotonic() < deadline:
            time.sleep(0.2)
            if time.monotonic() >= next_renew:
                self.renew_leases()
                self.heartbeat()
                next_renew = time.monotonic() + renew_every
        left = self.running_jobs()
        for job_id in left:
            with self.sessions.begin() as session:
                queue.release_job(
                    session, job_id, self.owner, self.now(), "node stopped before the job finished"
                )
            log.warning("job %d released: the node stopped before it finished", job_id)
        return not left

    def running_jobs(self) -> list[int]:
        with self._lock:
            return [job_id for job_id, t in self._running.items() if t.is_alive()]

    # -- series ----------------------------------------------------------------------------

    def sweep_series(self) -> None:
        """Turn quiet series into jobs (module docstring)."""
        now = self.now()
        quiet = timedelta(seconds=self.settings.series.quiet_seconds)
        wait = timedelta(seconds=self.settings.series.incomplete_wait_seconds)
        with self.sessions.begin() as session:
            candidates = session.execute(
                select(Series.id, Series.series_instance_uid, Series.last_received_at, Series.state)
                .where(Series.state.in_([SeriesState.RECEIVING, SeriesState.INCOMPLETE]))
                .where(Series.last_received_at <= now - quiet)
                .order_by(Series.id)
            ).all()
        for series_id, uid, last_received_at, state in candidates:
            if self._stopping.is_set():
                return
            gaps = self._gaps(uid)
            overdue = last_received_at <= now - quiet - wait
            with self.sessions.begin() as session:
                if not gaps or overdue:
                    # One statement decides which node queues it (several may sweep at once).
                    taken = session.execute(
                        update(Series)
                        .where(
                            Series.id == series_id,
                            Series.state.in_([SeriesState.RECEIVING, SeriesState.INCOMPLETE]),
                            Series.last_received_at == last_received_at,
                        )
                        .values(state=SeriesState.QUEUED)
                        .execution_options(synchronize_session=False)
                    ).rowcount
                    if not taken:
                        continue
                    event = Event.SERIES_COMPLETE if not gaps else Event.SERIES_INCOMPLETE
                    details: dict[str, Any] = {"quiet_seconds": self.settings.series.quiet_seconds}
                    if gaps:
                        details.update(
                            gaps=gaps[:10],
                            warning="quiet and still incomplete after incomplete_wait_seconds; "
                            "analysed as it is",
                        )
                    queued = queue.enqueue_series(
                        session, uid, max_attempts=self.settings.worker.max_attempts, now=now
                    )
                    # With the job's id, so the job's own trail carries the incompleteness warning.
                    audit.record(
                        session, event, at=now, series_instance_uid=uid, job_id=queued.job_id,
                        details=details,
                    )
                    if gaps:
                        log.warning(
                            "series %s queued incomplete as job %d: %s",
                            series_tag(uid), queued.job_id, gaps[0],
                        )
                    else:
                        log.info("series %s complete: job %d queued", series_tag(uid), queued.job_id)
                elif state == SeriesState.RECEIVING:
                    session.execute(
                        update(Series)
                        .where(Series.id == series_id, Series.state == SeriesState.RECEIVING)
                        .values(state=SeriesState.INCOMPLETE)
                        .execution_options(synchronize_session=False)
                    )
                    audit.record(
                        session,
                        Event.SERIES_INCOMPLETE,
                        at=now,
                        series_instance_uid=uid,
                        details={
                            "gaps": gaps[:10],
                            "waiting_until": (last_received_at + quiet + wait).isoformat(),
                        },
                    )
                    log.info(
                        "series %s quiet but incomplete, waiting: %s", series_tag(uid), gaps[0]
                    )

    def _gaps(self, series_instance_uid: str) -> list[str]:
        with self.sessions.begin() as session:
            paths = session.scalars(
                select(Instance.path)
                .where(Instance.series_instance_uid == series_instance_uid)
                .order_by(Instance.id)
            ).all()
        headers = []
        for p in paths:
            try:
                headers.append(pydicom.dcmread(p, stop_before_pixels=True))
            except (OSError, ValueError, EOFError, pydicom.errors.InvalidDicomError) as exc:
                return [f"instance file unreadable: {type(exc).__name__}"]
        return [g.message for g in series_gaps(headers)]

    # -- jobs ------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Claim jobs while this node has free worker slots; run each in a thread."""
        while not self._stopping.is_set():
            with self._lock:
                self._running = {k: t for k, t in self._running.items() if t.is_alive()}
                if len(self._running) >= self.settings.worker.concurrency:
                    return
                with self.sessions.begin() as session:
                    job = queue.claim_job(
                        session, self.owner, self.settings.worker.lease_seconds, self.now()
                    )
                if job is None:
                    return
                thread = threading.Thread(
                    target=self.run_claimed, args=(job,), name=f"glio-job-{job.id}", daemon=True
                )
                self._running[job.id] = thread
            thread.start()

    def renew_leases(self) -> None:
        for job_id in self.running_jobs():
            with self.sessions.begin() as session:
                kept = queue.renew_lease(
                    session, job_id, self.owner, self.settings.worker.lease_seconds, self.now()
                )
            if not kept:
                log.warning("job %d: lease lost (another node may run it); its result is dropped", job_id)

    def requeue_expired(self) -> None:
        now = self.now()
        silent = self.settings.worker.node_silent_seconds
        with self.sessions.begin() as session:
            gone = nodes.gone_owners(session, now, silent_after_seconds=silent, exclude=[self.owner])
            records = queue.requeue_expired(session, now, gone)
            deliveries.release_claims_of(session, gone, now)
        for owner, why in gone.items():
            log.warning("node %s is gone (%s): its work is taken back", owner, why)
        for job in records:
            log.warning(
                "job %d series %s: its node is gone or its lease expired, %s",
                job.id, series_tag(job.series_instance_uid),
                "queued again" if job.state.value == "waiting" else "failed (attempts used up)",
            )

    def run_claimed(self, job: queue.JobRecord) -> None:
        """Run one claimed job to its end state (module docstring)."""
        started = time.monotonic()
        tag = series_tag(job.series_instance_uid)
        attempt = f"attempt {job.attempts}/{job.max_attempts}"
        log.info("job %d series %s started (%s)", job.id, tag, attempt)
        try:
            with self.sessions.begin() as session:
                paths = [
                    Path(p)
                    for p in session.scalars(
                        select(Instance.path)
                        .where(Instance.series_instance_uid == job.series_instance_uid)
                        .order_by(Instance.id)
                    )
                ]
            out_dir = self.spool.results_dir(job.study_instance_uid, job.series_instance_uid)
            if out_dir.exists():  # left by an attempt that died; the rerun writes the same UIDs
                shutil.rmtree(out_dir)
            run = self._run_job
            if run is None:
                from glio_node.job import run_job as run
            summary = run(
                paths, out_dir, self.bundle_dir, device=self.settings.worker.device,
                bundles=self._bundles, progress=self._progress_writer(job.id),
                # The sweep queued this series whole, or incomplete past incomplete_wait_seconds
                # (with its warning audited): analyse what arrived; the SR says what did not.
                allow_gaps=True,
            )
            objects = [_result_object(Path(f)) for f in summary.files]
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
        now = self.now()
        with self.sessions.begin() as session:
            done = queue.finish_job(
                session,
                job.id,
                self.owner,
                now,
                bundle=bundle,
                stage_seconds={k: round(v, 3) for k, v in summary.stage_seconds.items()},
                details={
                    "objects": len(objects), "device": summary.device,
                    **({"notes": list(summary.notes)} if summary.notes else {}),
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
                for d in self.destinations.values():
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
            bundle.name, bundle.version, summary.device, len(self.destinations),
        )

    def _deliver_geojson(self, summary: Any) -> Path | None:
        """The job's QuPath GeoJSON into ``[geojson] folder`` (atomic write), if one is set.

        Before the job is finished, so a folder that cannot be written fails the attempt and
        it is retried like any transient error; a re-run replaces the file.
        """
        folder = self.settings.geojson.folder_path
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
        with self.sessions.begin() as session:
            state = queue.fail_job(
                session, job.id, self.owner, error,
                transient=transient, now=self.now(), policy=self.policy,
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
        last = [0.0]

        def write(done: int, total: int) -> None:
            t = time.monotonic()
            if done < total and t - last[0] < PROGRESS_SECONDS:
                return
            last[0] = t
            with self.sessions.begin() as session:
                queue.record_progress(session, job_id, self.owner, done, total, self.now())

        return write

    def heartbeat(self) -> None:
        """Tell the store this node is alive (the status page lists every node's heartbeat)."""
        with self.sessions.begin() as session:
            nodes.heartbeat(session, self.owner, self.now())

    # -- delivery --------------------------------------------------------------------------

    def deliver(self) -> None:
        """Send due result objects: one batch per destination."""
        if self._stopping.is_set():
            return
        with self.sessions.begin() as session:
            claimed = deliveries.claim_deliveries(
                session, self.now(), DELIVERY_LEASE_SECONDS, DELIVERY_BATCH, self.owner
            )
        by_destination: dict[str, list[deliveries.DeliveryRecord]] = defaultdict(list)
        for item in claimed:
            by_destination[item.destination].append(item)
        for name, items in by_destination.items():
            self._deliver_batch(name, items)

    def _deliver_batch(self, name: str, items: list[deliveries.DeliveryRecord]) -> None:
        destination = self.destinations.get(name)
        paths = [Path(i.path) for i in items]
        results: list[SendResult]
        if destination is None:
            results = [SendResult(p, False, "destination not configured") for p in paths]
        elif missing := [p for p in paths if not p.is_file()]:
            results = [
                SendResult(p, False, "result file missing") if p in missing
                else SendResult(p, False, "batch not sent", transient=True)
                for p in paths
            ]
        else:
            try:
                sender = self._sender_factory(destination, self.settings.node.ae_title)
                results = sender.send(paths)
            except TransientError as exc:
                results = [SendResult(p, False, "unreachable", transient=True) for p in paths]
                log.warning("destination %s: %s; %d object(s) will be retried", name, exc, len(paths))
        now = self.now()
        max_attempts = self.settings.worker.delivery_max_attempts
        states: dict[str, int] = defaultdict(int)
        with self.sessions.begin() as session:
            for item, result in zip(items, results, strict=True):
                state = deliveries.record_attempt(
                    session, item, ok=result.ok, status=result.status,
                    transient=result.transient, now=now, policy=self.policy,
                    max_attempts=max_attempts,
                )
                states[state.value] += 1
        jobs = sorted({i.job_id for i in items})
        log.info(
            "delivery to %s for job(s) %s: %s",
            name, ", ".join(map(str, jobs)), ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
        )

    # -- storage commitment ----------------------------------------------------------------

    def commitment_destinations(self) -> list[str]:
        """Names of the destinations whose deliveries count only once committed."""
        return [d.name for d in self.destinations.values() if d.storage_commitment]

    def request_commitments(self) -> None:
        """Expire unanswered commitment requests, then send an N-ACTION for every job whose
        results on a commitment destination are all sent (module docstring)."""
        names = self.commitment_destinations()
        if not names or self._stopping.is_set():
            return
        max_requests = self.settings.worker.delivery_max_attempts
        timeouts = {n: self.destinations[n].commitment_timeout_seconds for n in names}
        with self.sessions.begin() as session:
            expired = commitments.expire_requests(
                session, timeouts, self.now(), self.policy, max_requests=max_requests
            )
        for job_id, name in expired:
            log.warning(
                "destination %s sent no Storage Commitment report for job %d within %.0f s; "
                "asking again after a backoff", name, job_id, timeouts[name],
            )
        try:
            with self.sessions.begin() as session:
                opened = commitments.open_requests(
                    session, names, self.now(), max_requests=max_requests
                )
        except IntegrityError:  # another node opened the same request first
            return
        from glio_node.receive.scp import handle_commitment_report
        from glio_node.send.commitment import request_commitment

        for request in opened:
            destination = self.destinations[request.destination]
            answer = request_commitment(
                destination, self.settings.node.ae_title, request.transaction_uid,
                request.references,
                on_report=lambda event: handle_commitment_report(event, self.sessions, max_requests),
            )
            if answer.ok:
                log.info(
                    "destination %s asked to commit %d object(s) of job %d (request %d)",
                    request.destination, len(request.references), request.job_id, request.attempt,
                )
                continue
            with self.sessions.begin() as session:
                retry_at = commitments.record_refusal(
                    session, request, answer.status, self.now(), self.policy,
                    max_requests=max_requests,
                )
            log.warning(
                "destination %s refused the Storage Commitment request for job %d: %s; the "
                "spool keeps the job until it is confirmed (%s). If this destination does not "
                "support Storage Commitment, set storage_commitment = false for it",
                request.destination, request.job_id, answer.status,
                f"asking again at {retry_at:%H:%M:%S} UTC" if retry_at else "gave up asking",
            )

    # -- purge -----------------------------------------------------------------------------

    def purge(self) -> None:
        """Remove delivered slides and results older than the retention period."""
        now = self.now()
        before = now - timedelta(seconds=self.settings.storage.retention_seconds)
        with self.sessions.begin() as session:
            jobs = deliveries.purgeable_jobs(session, before, self.commitment_destinations())
        for job in jobs:
            removed = self.spool.purge_series(job.study_instance_uid, job.series_instance_uid)
            with self.sessions.begin() as session:
                deliveries.mark_purged(session, job, removed, self.now())
            log.info("job %d series %s purged from the spool: %d files", job.job_id,
                     series_tag(job.series_instance_uid), removed)


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


def _result_object(path: Path) -> deliveries.ResultObject:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return deliveries.ResultObject(
        sop_instance_uid=str(header.SOPInstanceUID),
        sop_class_uid=str(header.SOPClassUID),
        path=str(path.absolute()),
    )
