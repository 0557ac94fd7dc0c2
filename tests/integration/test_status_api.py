"""The status page's JSON API, page, /metrics and actions over a real SQLite store.

The store is filled the way a node fills it: synthetic slides made durable in a real spool and
recorded as the receiver records them, swept into jobs by the real scheduler, analysed by the
real pipeline with the demo bundle (one done, one failed because its slide has no pixel
spacing), one job left waiting and one claimed and part-way, and deliveries tried against a
destination that does not answer.  Then the operator looks, through FastAPI's TestClient.
"""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from orthanc_peer import free_port
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import (
    Destination,
    Settings,
    StatusSettings,
    StorageSettings,
    WorkerSettings,
)
from glio_node.reachability import ReachabilityBoard
from glio_node.receive.spool import Spool
from glio_node.scheduler import NodeScheduler
from glio_node.send.echo import ReachabilityProber
from glio_node.store import queue
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.instances import ReceivedInstance, record_instance
from glio_node.store.models import AuditEvent, Job, JobState
from glio_node.synthetic.slide import SlideSpec, SyntheticSlide, write_synthetic_slide
from glio_node.web.app import create_app
from glio_node.web.health import NodeContext

pytestmark = pytest.mark.slow  # the fixture runs the real pipeline twice (once per module)

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "glio-demo"
SPEC = SlideSpec(width_px=1024, height_px=768, tile_size=256, levels=3, context_images=False)
TOKEN = "s3cret-token-for-the-status-tests"


@dataclass
class Store:
    settings: Settings
    sessions: sessionmaker[Session]
    spool: Spool
    done: SyntheticSlide
    failed: SyntheticSlide
    waiting: SyntheticSlide
    running: SyntheticSlide
    job_ids: dict[str, int]
    reachability: ReachabilityBoard  # probed once by send/echo, as serve's prober does


def _receive(spool: Spool, sessions: sessionmaker[Session], slide: SyntheticSlide, at: datetime, tmp: Path) -> None:
    """What the receiver does for each C-STORE: durable file, instance row, audit row."""
    for source in slide.files:
        copy = tmp / source.name
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
                    address="127.0.0.1:4242", accession_number=str(ds.get("AccessionNumber", "")) or None,
                ),
                at,
            )


def _without_pixel_spacing(slide: SyntheticSlide) -> None:
    for path in slide.files:
        ds = pydicom.dcmread(path)
        del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        ds.save_as(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("status-store")
    url = f"sqlite:///{root / 'glio.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    spool = Spool(root / "spool")
    settings = Settings(
        storage=StorageSettings(spool_dir=root / "spool", database_url=url, min_free_bytes=0),
        # Nothing listens on this port: deliveries stay pending (the PACS is down).
        destinations=(Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port()),),
        worker=WorkerSettings(device="cpu", max_attempts=3),
        status=StatusSettings(token=TOKEN, echo_cache_seconds=3600),
    )
    slides = {
        name: write_synthetic_slide(replace(SPEC, seed=seed), root / name)
        for name, seed in (("done", 21), ("failed", 22), ("waiting", 23), ("running", 24))
    }
    _without_pixel_spacing(slides["failed"])
    assert len({s.series_instance_uid for s in slides.values()}) == 4

    t0 = datetime.now(UTC) - timedelta(minutes=10)
    for i, name in enumerate(("done", "failed", "running", "waiting")):
        _receive(spool, sessions, slides[name], t0 + timedelta(seconds=i), root)
    scheduler = NodeScheduler(settings, sessions, spool, BUNDLE, owner="test-node:1:abc")
    scheduler.sweep_series()  # quiet for minutes: four jobs, in the order received
    job_ids: dict[str, int] = {}
    for name in ("done", "failed"):
        with sessions.begin() as session:
            job = queue.claim_job(session, scheduler.owner, 300, datetime.now(UTC))
        assert job is not None and job.series_instance_uid == slides[name].series_instance_uid
        scheduler.run_claimed(job)  # the real pipeline
        job_ids[name] = job.id
    with sessions.begin() as session:  # claimed, and a third of the way (as the progress callback writes)
        job = queue.claim_job(session, scheduler.owner, 300, datetime.now(UTC))
        queue.record_progress(session, job.id, scheduler.owner, 10, 30, datetime.now(UTC))
        job_ids["running"] = job.id
    scheduler.deliver()  # connection refused: pending, to be retried
    with sessions.begin() as session:
        job_ids["waiting"] = session.scalar(select(Job.id).where(Job.state == JobState.WAITING))
    board = ReachabilityBoard(settings.destinations)
    ReachabilityProber(settings.destinations, settings.node.ae_title, board, 3600, timeout_seconds=2).check_all()
    yield Store(settings, sessions, spool, job_ids=job_ids, reachability=board, **slides)
    engine.dispose()


@pytest.fixture
def client(store: Store) -> Iterator[TestClient]:
    ctx = NodeContext(device="cpu", bundles=[("glio-demo", "1")], spool_dir=store.spool.root)
    with TestClient(create_app(store.settings, store.sessions, ctx, reachability=store.reachability)) as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c


def test_the_api_shows_a_done_a_failed_a_running_and_a_waiting_job(client, store):
    status = client.get("/api/status").json()
    jobs = {j["id"]: j for j in status["jobs"]}
    done, failed = jobs[store.job_ids["done"]], jobs[store.job_ids["failed"]]
    assert done["state"] == "delivering"  # analysed; the PACS is down, so results wait
    assert done["bundle"].startswith("glio-demo ")
    assert {"open", "load_models", "write"} <= set(done["stage_seconds"])
    assert set(done["deliveries"]) == {"pending"} and done["deliveries"]["pending"] >= 3
    assert failed["state"] == "failed"
    assert failed["reason"].startswith("The slide could not be analysed: ")
    assert "spacing" in failed["reason"].lower()
    [running] = status["running"]
    assert running["id"] == store.job_ids["running"]
    assert running["percent"] == pytest.approx(100 / 3) and running["tiles_total"] == 30
    assert running["eta_seconds"] is not None
    assert status["waiting"] == 1 and status["job_states"] == {"waiting": 1, "running": 1, "done": 1, "failed": 1}
    [problem] = status["delivery_problems"]
    assert problem["destination"] == "pacs" and problem["state"] == "pending" and problem["attempts"] == 1
    [pacs] = status["destinations"]  # what the prober posted; the page itself sends no C-ECHO
    assert pacs["kind"] == "C-ECHO" and pacs["ok"] is False
    assert pacs["detail"].endswith("no answer (host, port or firewall)") and pacs["checked_at"]
    assert sum(d + f for _, d, f in status["throughput"]) == 2
    assert status["health"]["checks"][0] == {"name": "database", "ok": True, "detail": "reachable"}
    # No patient data anywhere in what the API answers.
    patient = pydicom.dcmread(store.done.files[0], stop_before_pixels=True)
    text = client.get("/api/status").text + client.get("/api/jobs").text
    assert str(patient.PatientName) not in text and str(patient.PatientID) not in text


def test_the_page_shows_the_same_in_plain_html_without_patient_data(client, store):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    html = page.text
    assert f'id="job-{store.job_ids["failed"]}"' in html and "could not be analysed" in html
    assert "33 %" in html and "10/30 tiles" in html
    assert "<svg" in html and "<script" not in html
    # Air-gapped hospitals: every link and resource is on this server (no CDN, no web font).
    assert re.findall(r'(?:href|src)="([^"]*)"', html) and all(
        u.startswith("/") for u in re.findall(r'(?:href|src)="([^"]*)"', html)
    )
    patient = pydicom.dcmread(store.done.files[0], stop_before_pixels=True)
    assert str(patient.PatientName) not in html and str(patient.PatientID) not in html
    assert client.get("/static/status.css").status_code == 200


def test_patient_name_and_id_show_only_when_the_setting_says_so(store):
    settings = replace(store.settings, status=replace(store.settings.status, show_patient_data=True))
    with TestClient(create_app(settings, store.sessions)) as c:
        html = c.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).text
    patient = pydicom.dcmread(store.done.files[0], stop_before_pixels=True)
    assert str(patient.PatientID) in html


def test_audit_search_by_accession_number_finds_the_study_and_keeps_it_out_of_the_url(client, store):
    accession = str(pydicom.dcmread(store.done.files[0], stop_before_pixels=True).AccessionNumber)
    rows = client.post("/api/audit/search", json={"accession_number": accession}).json()
    events = {r["event"] for r in rows}
    assert {"instance_received", "series_complete", "job_queued", "job_finished"} <= events
    by_uid = client.post("/api/audit/search", json={"study_instance_uid": store.failed.study_instance_uid}).json()
    assert any(r["event"] == "job_failed" for r in by_uid)
    assert client.post("/api/audit/search", json={"accession_number": "NO-SUCH"}).json() == []
    page = client.post("/audit", data={"accession_number": accession})
    assert page.status_code == 200 and 'id="audit-results"' in page.text and "job_finished" in page.text


def test_metrics_parse_with_prometheus_clients_parser(client, store):
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = {s.labels["state"]: s.value for s in families["glio_jobs"].samples}
    assert jobs == {"waiting": 1, "running": 1, "done": 1, "failed": 1}
    assert families["glio_queue_depth"].samples[0].value == 1
    stages = families["glio_stage_duration_seconds"]
    count = [s for s in stages.samples if s.name.endswith("_count") and s.labels["stage"] == "write"]
    assert count and count[0].value == 1
    received = families["glio_instances_received"].samples[0].value
    assert received == sum(len(s.files) for s in (store.done, store.failed, store.waiting, store.running))
    assert families["glio_received_bytes"].samples[0].value > 0
    outcomes = {s.labels["outcome"]: s.value for s in families["glio_deliveries"].samples}
    assert outcomes["pending"] > 0 and outcomes["sent"] == 0
    assert families["glio_spool_free_bytes"].samples[0].value > 0


def test_probes(client, store):
    assert client.get("/healthz", headers={"Authorization": ""}).text == "ok\n"
    ready = client.get("/readyz", headers={"Authorization": ""})
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert client.get("/api/openapi.json").json()["paths"]["/api/jobs/{job_id}/retry"]


def test_without_the_token_everything_but_the_probes_is_refused(store):
    with TestClient(create_app(store.settings, store.sessions)) as c:
        for path in ("/", "/api/status", "/api/jobs", "/metrics"):
            answer = c.get(path)
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"].startswith("Basic")
        assert c.get("/api/status", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        assert c.post("/api/intake/pause").status_code == 401
        basic = base64.b64encode(f"alice:{TOKEN}".encode()).decode()
        assert c.get("/api/jobs", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_retry_and_resend_are_audited_and_refused_where_they_do_not_apply(client, store):
    failed, done = store.job_ids["failed"], store.job_ids["done"]
    assert client.post(f"/api/jobs/{done}/retry").status_code == 409
    refused = client.post(f"/api/jobs/{failed}/resend")
    assert refused.status_code == 409 and "only a finished job" in refused.json()["detail"]
    assert client.post(f"/api/jobs/{failed}/retry").json() == {"job_id": failed, "state": "waiting"}
    assert client.post(f"/api/jobs/{done}/resend").json()["objects"] > 0
    with store.sessions() as session:
        job = session.get(Job, failed)
        assert job.state == JobState.WAITING and job.attempts == 0
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.event.in_(["job_retry_requested", "resend_requested"]))
        ).all()
    assert {(e.event, e.job_id, e.details["by"]) for e in events} == {
        ("job_retry_requested", failed, "token"), ("resend_requested", done, "token"),
    }
    # Put the failed job back as it was for the other tests of this module.
    with store.sessions.begin() as session:
        session.get(Job, failed).state = JobState.FAILED


def test_pause_and_resume_intake_from_the_page(client, store):
    answer = client.post("/actions/pause", follow_redirects=False)
    assert answer.status_code == 303
    assert client.get("/api/status").json()["intake_paused"] is True
    assert "Intake paused" in client.get(answer.headers["location"]).text
    assert client.post("/actions/pause", headers={"Origin": "http://evil.example"}).status_code == 403
    # A sandboxed frame or a file: page posts with Origin "null": refused too.
    assert client.post("/actions/resume", headers={"Origin": "null"}).status_code == 403
    assert client.get("/api/status").json()["intake_paused"] is True
    client.post("/api/intake/resume")
    assert client.get("/api/status").json()["intake_paused"] is False


def test_the_read_only_page_refuses_actions_and_says_where_to_act(store):
    ctx = NodeContext(read_only=True)
    with TestClient(create_app(store.settings, store.sessions, ctx)) as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        refused = c.post(f"/api/jobs/{store.job_ids['failed']}/retry")
        assert refused.status_code == 403 and "read-only status page" in refused.json()["detail"]
        html = c.get("/").text
        assert "<button>Retry</button>" not in html
        # No prober wired: the destination is listed, unchecked, and nothing was asked of it.
        [pacs] = c.get("/api/status").json()["destinations"]
        assert (pacs["destination"], pacs["ok"], pacs["detail"], pacs["checked_at"]) == ("pacs", None, "not checked yet", None)
        assert "not checked yet" in html
