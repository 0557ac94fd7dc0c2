"""The node's background work on APScheduler's timers, in-process (``glio-node serve``).

This module is wiring only: it builds the :class:`~glio_node.worker.context.WorkContext` the
steps share, passes in what a step needs of the receiver (the spool's folders, the commitment
report handler), and calls each step of :mod:`glio_node.worker` on its timer.  Each timer is a
method of :class:`NodeScheduler` that tests may also call directly:

- ``sweep_series`` (every quiet_seconds / 2, 0.5 to 10 s): quiet series -> jobs
  (:mod:`~glio_node.worker.sweep`);
- ``dispatch`` (1 s): claim jobs up to ``[worker] concurrency``, one thread each;
  ``renew_leases`` (a third of ``lease_seconds``): keep their leases (:mod:`~glio_node.worker.run`);
- ``requeue_expired`` and ``heartbeat`` (``HEARTBEAT_SECONDS``): take back the work of gone
  nodes and expired leases; say this node is alive (:mod:`~glio_node.worker.liveness`);
- ``deliver`` (1 s): results to the destinations (:mod:`~glio_node.worker.deliver`);
- ``request_commitments`` (1 s): Storage Commitment requests (:mod:`~glio_node.worker.commit`);
- ``purge`` (60 s, 5 s when ``retention_seconds`` < 60): the spool emptied of what every
  destination has (:mod:`~glio_node.worker.purge`);
- ``poll-<name>``, one per ``[[sources]]`` entry, every ``poll_seconds``: new series from a
  DICOMweb server into the spool (:mod:`glio_node.pull.poller`); from there they are swept like
  C-STORE'd ones.  A node without sources has no such job.

SIGTERM (:meth:`NodeScheduler.stop`): stop taking work, let running jobs finish within the grace
period (leases renewed, heartbeat kept), give the rest back to the queue.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from glio_node.config import Destination, Settings
from glio_node.job import BundleCache
from glio_node.pull.poller import SourcePoller
from glio_node.receive.spool import Spool
from glio_node.redact import redacted_logger
from glio_node.send import ResultSender, make_sender
from glio_node.store import nodes, queue
from glio_node.worker import commit, deliver, liveness, purge, sweep
from glio_node.worker.context import Sessions, WorkContext
from glio_node.worker.run import JobRunner, RunJob

log = redacted_logger(__name__)


def default_owner() -> str:
    """This process's name on the queue: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class NodeScheduler:
    """The node's timers and the steps they call; see the module docstring.

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
        self.now = clock
        self.work = WorkContext(settings, sessions, self.owner, clock)
        self._bundles = BundleCache()
        self.jobs = JobRunner(self.work, spool, self.bundle_dir, run_job=run_job, bundles=self._bundles)
        self._sender_factory = sender_factory
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
        self.work.stopping.set()
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
        return not self.jobs.release_unfinished()

    def running_jobs(self) -> list[int]:
        return self.jobs.running_jobs()

    # -- the timers' steps (glio_node.worker) ----------------------------------------------

    def sweep_series(self) -> None:
        sweep.sweep_series(self.work)

    def dispatch(self) -> None:
        self.jobs.dispatch()

    def run_claimed(self, job: queue.JobRecord) -> None:
        """Run one claimed job to its end state, in the calling thread."""
        self.jobs.run_claimed(job)

    def renew_leases(self) -> None:
        self.jobs.renew_leases()

    def requeue_expired(self) -> None:
        liveness.take_back(self.work)

    def heartbeat(self) -> None:
        liveness.heartbeat(self.work)

    def deliver(self) -> None:
        deliver.deliver(self.work, self._sender_factory)

    def commitment_destinations(self) -> list[str]:
        return self.work.commitment_destinations()

    def request_commitments(self) -> None:
        commit.request_commitments(self.work, on_report=self._commitment_report)

    def purge(self) -> None:
        purge.purge(self.work, self.spool)

    def _commitment_report(self, event: Any) -> tuple[int, None]:
        """A Storage Commitment report sent on the request's own association: the receiver's
        handler, with what the receiver binds to it (``start_receiver``)."""
        from glio_node.receive.scp import handle_commitment_report

        reporters = {d.name: d.ae_title for d in self.settings.destinations if d.storage_commitment}
        return handle_commitment_report(
            event, self.sessions, self.settings.worker.delivery_max_attempts, reporters
        )
