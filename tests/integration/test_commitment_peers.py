"""Storage Commitment against real peers, driven through the scheduler's own steps
(``deliver``, ``request_commitments``, ``purge``) with the node's real receiver listening:

- Orthanc (Storage Commitment SCP since 1.6.0) answers the N-ACTION with an N-EVENT-REPORT on a
  new association to the node's AE (it finds the node in its ``DicomModalities`` by our calling
  AE title); an object Orthanc lost is reported failed, sent again and committed by a second
  request; only then is the spool purged;
- Orthanc whose report cannot reach the node: the request expires after
  ``commitment_timeout_seconds`` and a new one is sent after the backoff;
- DCMTK ``storescp`` does not implement Storage Commitment: the N-ACTION is refused, the audit
  says so, and the spool keeps the job.

A done job is set up in the store with result files in its spool folder (copies of a small
synthetic slide), so no model runs here; tests/e2e/test_commitment.py runs the whole node.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from orthanc_peer import Orthanc, free_port
from sqlalchemy import select
from test_store import BUNDLE, queued

from glio_node.config import (
    Destination,
    NodeSettings,
    Settings,
    StorageSettings,
    WorkerSettings,
)
from glio_node.receive import Spool, start_receiver
from glio_node.scheduler import NodeScheduler
from glio_node.send.commitment import NOT_SUPPORTED
from glio_node.store import commitments, deliveries
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.models import (
    AuditEvent,
    CommitmentState,
    Delivery,
    DeliveryState,
    Job,
)
from glio_node.store.queue import claim_job, finish_job
from glio_node.synthetic.slide import SlideSpec, SyntheticSlide, write_synthetic_slide

pytestmark = pytest.mark.needs("orthanc", "storescp")

SPEC = SlideSpec(width_px=512, height_px=512, tile_size=256, levels=2, context_images=False)
SERIES = "1.2.826.0.1.3680043.8.498.1"
STUDY = "1.2.3"  # test_store.queued's study


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    return write_synthetic_slide(SPEC, tmp_path_factory.mktemp("commit-slide"))


class Setup:
    """The node's store, spool, receiver and scheduler, with one done job to deliver."""

    def __init__(self, tmp_path: Path, slide: SyntheticSlide, destinations: list[Destination],
                 backoff_seconds: float = 30, clock: Callable[[], datetime] | None = None):
        url = f"sqlite:///{tmp_path / 'glio.db'}"
        upgrade(url)
        self.port = free_port()
        self.settings = Settings(
            node=NodeSettings(host="127.0.0.1", port=self.port),
            storage=StorageSettings(
                spool_dir=tmp_path / "spool", database_url=url, min_free_bytes=0,
                retention_seconds=0,
            ),
            destinations=tuple(destinations),
            worker=WorkerSettings(
                backoff_base_seconds=backoff_seconds, backoff_max_seconds=2 * backoff_seconds
            ),
        )
        self.engine = make_engine(url)
        self.sessions = make_sessions(self.engine)
        self.spool = Spool(self.settings.storage.spool_dir, 0)
        self.server = start_receiver(
            self.settings, self.spool, self.sessions, address=("127.0.0.1", self.port)
        )
        self.scheduler = NodeScheduler(
            self.settings, self.sessions, self.spool, tmp_path, **({"clock": clock} if clock else {})
        )
        results = self.spool.results_dir(STUDY, SERIES)
        results.mkdir(parents=True)
        objects = []
        for f in slide.files:
            copy = Path(shutil.copy(f, results))
            ds = pydicom.dcmread(copy, stop_before_pixels=True)
            objects.append(
                deliveries.ResultObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(copy))
            )
        self.results = results
        self.job_id = queued(self.sessions, SERIES)
        now = self.scheduler.now()
        with self.sessions.begin() as s:
            claim_job(s, "test", 60, now)
            finish_job(s, self.job_id, "test", now, bundle=BUNDLE)
            deliveries.add_deliveries(s, self.job_id, [d.name for d in destinations], objects, now)

    def deliveries(self) -> list[Delivery]:
        with self.sessions.begin() as s:
            return list(s.scalars(select(Delivery).order_by(Delivery.id)))

    def events(self, name: str) -> list[AuditEvent]:
        with self.sessions.begin() as s:
            return list(
                s.scalars(select(AuditEvent).where(AuditEvent.event == name).order_by(AuditEvent.id))
            )

    def purged(self) -> bool:
        with self.sessions.begin() as s:
            return s.get(Job, self.job_id).purged_at is not None

    def close(self) -> None:
        self.server.shutdown()
        self.engine.dispose()


@pytest.fixture
def setups() -> Iterator[list[Setup]]:
    made: list[Setup] = []
    yield made
    for setup in made:
        setup.close()


class Clock:
    """The scheduler's clock, moved on by the test: a timeout or a backoff passes exactly."""

    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def test_orthanc_commits_by_a_report_on_a_new_association_and_then_the_spool_is_purged(
    tmp_path, slide, setups
):
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port())
    pacs = Destination("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom_port, storage_commitment=True)
    setup = Setup(tmp_path, slide, [pacs])
    setups.append(setup)
    orthanc.extra = {"DicomModalities": {"glionode": ["GLIONODE", "127.0.0.1", setup.port]}}
    orthanc.start()
    try:
        setup.scheduler.deliver()
        assert {d.state for d in setup.deliveries()} == {DeliveryState.SENT}
        setup.scheduler.purge()
        assert not setup.purged()  # sent, not committed

        # Orthanc loses one object before it is asked: its report lists that one as failed.
        [lost, *_] = orthanc.instances_of_study(slide.study_instance_uid)
        urllib.request.urlopen(
            urllib.request.Request(f"{orthanc.url}/instances/{lost['ID']}", method="DELETE"),
            timeout=10,
        ).close()
        lost_uid = lost["MainDicomTags"]["SOPInstanceUID"]

        setup.scheduler.request_commitments()
        [first] = setup.events("commitment_requested")
        assert first.details["objects"] == len(slide.files)
        [failed] = wait_until(lambda: setup.events("commitment_failed"), 20, "Orthanc's report")
        assert failed.calling_ae == "ORTHANC"  # it came from Orthanc, on its own association
        assert failed.details["reason"] == "failed_objects" and failed.details["resend"] == 1
        assert [f["sop_instance_uid"] for f in failed.details["failures"]] == [lost_uid]
        states = {d.sop_instance_uid: d.state for d in setup.deliveries()}
        assert states.pop(lost_uid) == DeliveryState.PENDING
        assert set(states.values()) == {DeliveryState.COMMITTED}
        accepted = [e for e in setup.events("association_accepted") if e.calling_ae == "ORTHANC"]
        assert accepted, "the report should arrive on an association Orthanc opened"
        setup.scheduler.purge()
        assert not setup.purged()

        # The lost object is sent again and a second request commits it.
        setup.scheduler.deliver()
        setup.scheduler.request_commitments()
        second = setup.events("commitment_requested")[-1]
        assert second.details["objects"] == 1 and second.details["attempt"] == 2
        [confirmed] = wait_until(
            lambda: [e for e in setup.events("commitment_confirmed")
                     if e.details["transaction_uid"] == second.details["transaction_uid"]],
            20, "Orthanc's second report",
        )
        assert {d.state for d in setup.deliveries()} == {DeliveryState.COMMITTED}
        assert all(d.committed_at is not None for d in setup.deliveries())

        setup.scheduler.purge()
        assert setup.purged() and not setup.results.exists()
        [purge] = setup.events("purge")
        assert purge.details["files_removed"] == len(slide.files)
        assert purge.id > confirmed.id
    finally:
        orthanc.stop()


def test_storescp_refuses_the_commitment_request_and_the_spool_keeps_the_job(
    tmp_path, slide, setups
):
    port = free_port()
    received = tmp_path / "storescp"
    received.mkdir()
    storescp = subprocess.Popen(
        ["storescp", "+xa", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port)
        archive = Destination("archive", "STORESCP", "127.0.0.1", port, storage_commitment=True)
        setup = Setup(tmp_path, slide, [archive])
        setups.append(setup)
        setup.scheduler.deliver()
        assert {d.state for d in setup.deliveries()} == {DeliveryState.SENT}
        assert len(list(received.iterdir())) == len(slide.files)  # the objects did arrive

        setup.scheduler.request_commitments()
        [refused] = setup.events("commitment_failed")
        assert refused.details["reason"] == "n_action_refused"
        assert refused.details["destination"] == "archive"
        assert refused.details["status"] == NOT_SUPPORTED
        assert "retry_at" in refused.details
        setup.scheduler.request_commitments()  # within the backoff: not asked again
        assert len(setup.events("commitment_requested")) == 1
        setup.scheduler.purge()
        assert not setup.purged() and setup.results.exists()
        assert {d.state for d in setup.deliveries()} == {DeliveryState.SENT}
        with setup.sessions.begin() as s:
            [request] = commitments.requests_of(s, setup.job_id)
            assert request.state == CommitmentState.REFUSED
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)


def test_a_report_that_never_comes_expires_the_request_and_the_node_asks_again(
    tmp_path, slide, setups
):
    # Orthanc accepts the N-ACTION but its report goes to a port where nothing listens.
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(), extra={
        "DicomModalities": {"glionode": ["GLIONODE", "127.0.0.1", free_port()]},
    })
    pacs = Destination("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom_port, storage_commitment=True,
                       commitment_timeout_seconds=1)
    clock = Clock()
    setup = Setup(tmp_path, slide, [pacs], backoff_seconds=1, clock=clock)
    setups.append(setup)
    orthanc.start()
    try:
        setup.scheduler.deliver()
        setup.scheduler.request_commitments()
        [first] = setup.events("commitment_requested")
        clock.advance(1.2)
        setup.scheduler.request_commitments()  # expires the first; the backoff is not over yet
        [expired] = setup.events("commitment_failed")
        assert expired.details["reason"] == "no_report" and expired.details["timeout_seconds"] == 1
        assert expired.details["transaction_uid"] == first.details["transaction_uid"]
        assert len(setup.events("commitment_requested")) == 1
        clock.advance(0.9)  # the backoff after one expiry: 1 s, not over yet
        setup.scheduler.request_commitments()
        assert len(setup.events("commitment_requested")) == 1
        clock.advance(0.2)
        setup.scheduler.request_commitments()
        second = setup.events("commitment_requested")[-1]
        assert second.details["attempt"] == 2
        assert second.details["transaction_uid"] != first.details["transaction_uid"]
        with setup.sessions.begin() as s:
            states = [r.state for r in commitments.requests_of(s, setup.job_id)]
        assert states == [CommitmentState.EXPIRED, CommitmentState.REQUESTED]
        setup.scheduler.purge()
        assert not setup.purged()
    finally:
        orthanc.stop()


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    """Until something accepts TCP connections on loopback ``port`` (a peer just started)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")
