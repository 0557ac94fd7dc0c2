"""Each job's GeoJSON reaches a research group's shared folder and a vendor's HTTP endpoint.

The slide is made durable in a real spool and recorded as the receiver records it, swept into a
job by the real scheduler and analysed by the real pipeline with the demo bundle.  Then the
folder is looked at as QuPath (or a watcher) would: one whole file per slide, nothing half
written, and the audit trail says which file the job wrote.  A folder that cannot be written
does not lose the result: the job waits to be retried, with a reason the operator can act on.
An HTTP endpoint (a real HTTP server in the test, answering as a vendor integration that is
briefly overloaded) gets the file by POST, retried after a 503 and audited like a DICOM
delivery, while the DICOM objects go to the PACS and only there.
"""

from __future__ import annotations

import json
import shutil
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from orthanc_peer import free_port

from glio_node.config import Destination, GeoJSONSettings, Settings, StorageSettings, WorkerSettings
from glio_node.receive.spool import Spool
from glio_node.scheduler import NodeScheduler
from glio_node.store import queue
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.instances import ReceivedInstance, record_instance
from glio_node.store.models import AuditEvent, Delivery, DeliveryState, Job, JobState
from glio_node.synthetic.slide import SlideSpec, write_synthetic_slide
from glio_node.send.echo import check

pytestmark = pytest.mark.slow  # the real pipeline, once per test

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "glio-demo"
SPEC = SlideSpec(width_px=1024, height_px=768, tile_size=256, levels=3, context_images=False, seed=31)


def _node(tmp_path: Path, folder: Path | None, destinations: tuple[Destination, ...] = (), clock=None):
    url = f"sqlite:///{tmp_path / 'glio.db'}"
    upgrade(url)
    sessions = make_sessions(make_engine(url))
    spool = Spool(tmp_path / "spool")
    settings = Settings(
        storage=StorageSettings(spool_dir=tmp_path / "spool", database_url=url, min_free_bytes=0),
        worker=WorkerSettings(device="cpu", max_attempts=3),
        geojson=GeoJSONSettings(folder=str(folder) if folder else ""),
        destinations=destinations,
    )
    slide = write_synthetic_slide(SPEC, tmp_path / "slide")
    at = datetime.now(UTC) - timedelta(minutes=10)
    for source in slide.files:  # what the receiver does for each C-STORE
        copy = tmp_path / source.name
        shutil.copy2(source, copy)
        ds = pydicom.dcmread(copy, stop_before_pixels=True)
        stored = spool.store(copy, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        with sessions.begin() as session:
            record_instance(
                session,
                ReceivedInstance(
                    sop_instance_uid=ds.SOPInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                    study_instance_uid=ds.StudyInstanceUID, sop_class_uid=ds.SOPClassUID,
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(stored.path),
                    size_bytes=stored.size_bytes, sha256=stored.sha256, calling_ae="SCANNER",
                    address="127.0.0.1:4242", accession_number=None,
                ),
                at,
            )
    scheduler = NodeScheduler(settings, sessions, spool, BUNDLE, owner="test-node:1:geo",
                              **({"clock": clock} if clock else {}))
    scheduler.sweep_series()
    with sessions.begin() as session:
        job = queue.claim_job(session, scheduler.owner, 300, datetime.now(UTC))
    assert job is not None
    scheduler.run_claimed(job)
    return slide, sessions, spool, job, scheduler


def test_each_job_puts_its_whole_geojson_into_the_configured_folder(tmp_path):
    folder = tmp_path / "qupath"
    slide, sessions, spool, job, _ = _node(tmp_path, folder)
    [delivered] = folder.iterdir()  # one file, no temporary left beside it
    assert delivered.name == f"{slide.series_instance_uid}-glio-demo.geojson"
    results = spool.results_dir(job.study_instance_uid, job.series_instance_uid)
    assert delivered.read_bytes() == (results / delivered.name).read_bytes()
    collection = json.loads(delivered.read_text())
    assert collection["type"] == "FeatureCollection"
    assert collection["properties"]["series_instance_uid"] == slide.series_instance_uid
    with sessions.begin() as session:
        assert session.get(Job, job.id).state == JobState.DONE
        created = session.scalars(select(AuditEvent).where(AuditEvent.event == "objects_created")).one()
        assert created.details["geojson"] == delivered.name
        # The GeoJSON is not a DICOM object: it is not among the objects sent to destinations.
        assert all(o["sop_class_uid"].startswith("1.2.840.10008.") for o in created.details["objects"])


def test_a_folder_that_cannot_be_written_sends_the_job_back_to_be_retried(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    _, sessions, _, job, _ = _node(tmp_path, blocked)
    with sessions.begin() as session:
        row = session.get(Job, job.id)
        assert row.state == JobState.WAITING
        assert f"[geojson] folder {blocked} cannot be written" in row.last_error
        assert "the job is retried" in row.last_error


class _Endpoint(BaseHTTPRequestHandler):
    """A vendor's GeoJSON endpoint: answers the scripted statuses in turn, records each POST."""

    answers: list[int] = []
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), body))
        self.send_response(type(self).answers.pop(0) if type(self).answers else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # keep the test output quiet
        pass


def test_an_http_endpoint_gets_the_geojson_by_post_retried_after_a_503_and_audited(tmp_path):
    _Endpoint.answers, _Endpoint.received = [503], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    now = [datetime.now(UTC)]
    token = "vendor-token-for-the-geojson-test"
    destinations = (
        Destination(name="vendor", type="geojson", url=f"http://127.0.0.1:{server.server_port}/glio/results",
                    bearer_token=token),
        Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port()),  # down
    )
    try:
        slide, sessions, spool, job, scheduler = _node(tmp_path, None, destinations, clock=lambda: now[0])
        with sessions.begin() as session:
            rows = session.scalars(select(Delivery).where(Delivery.job_id == job.id)).all()
            vendor = [r for r in rows if r.destination == "vendor"]
            pacs = [r for r in rows if r.destination == "pacs"]
            assert [r.sop_class_uid for r in vendor] == ["geojson"]  # only the GeoJSON goes there
            assert pacs and all(r.sop_class_uid.startswith("1.2.840.10008.") for r in pacs)
            geojson_path = Path(vendor[0].path)

        scheduler.deliver()  # the endpoint answers 503: pending, to be retried after the backoff
        with sessions.begin() as session:
            row = session.scalars(select(Delivery).where(Delivery.destination == "vendor")).one()
            assert (row.state, row.last_status, row.attempts) == (DeliveryState.PENDING, "HTTP 503", 1)
        now[0] += timedelta(hours=2)
        scheduler.deliver()
        with sessions.begin() as session:
            row = session.scalars(select(Delivery).where(Delivery.destination == "vendor")).one()
            assert (row.state, row.last_status, row.attempts) == (DeliveryState.SENT, "HTTP 200", 2)
            attempts = session.scalars(
                select(AuditEvent).where(AuditEvent.event == "delivery_attempt", AuditEvent.sop_instance_uid == row.sop_instance_uid)
                .order_by(AuditEvent.id)
            ).all()
            assert [a.details["status"] for a in attempts] == ["HTTP 503", "HTTP 200"]
        # The status page finds the endpoint there, though it takes only POST (HEAD: 501).
        reachable = check(destinations[0], "GLIONODE")
        assert (reachable.kind, reachable.ok, reachable.detail) == ("HTTP", True, "HTTP 501")
    finally:
        server.shutdown()
    assert len(_Endpoint.received) == 2
    headers, body = _Endpoint.received[-1]
    assert body == geojson_path.read_bytes()
    assert json.loads(body)["properties"]["series_instance_uid"] == slide.series_instance_uid
    assert headers["Content-Type"] == "application/geo+json"
    assert headers["Authorization"] == f"Bearer {token}"
    assert f'filename="{slide.series_instance_uid}-glio-demo.geojson"' in headers["Content-Disposition"]
