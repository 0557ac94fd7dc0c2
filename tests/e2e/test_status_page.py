"""The status page of a real ``glio-node serve``, watched in a real headless Chromium.

The story of issue 4: hospital IT opens the page while slides arrive by DCMTK ``storescu``.
Two good slides are sent at once (the node runs one job at a time, so the second waits), and
one slide without pixel spacing.  The page must show the second slide's job go from waiting to
running (with progress) to delivered in Orthanc, and the bad slide's failure in plain words.
A screenshot is saved for the README.  Then intake is paused from the API: storescu's instances
are answered 0xA700 and nothing is stored, until it is resumed.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from browser import chromium
from node_process import wait_for
from orthanc_peer import free_port

from glio_node.store.models import JobState
from glio_node.synthetic.slide import SlideSpec, SyntheticSlide, write_synthetic_slide

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs("orthanc", "storescu", "chromium", "playwright"),
]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "out" / "screenshots" / "status-page.png"  # copied to docs/img for the README
TOKEN = "e2e-status-token-0123456789"
SPEC = SlideSpec(width_px=2048, height_px=1536, tile_size=256, levels=4, context_images=False)


def _status_toml(port: int, refresh: int = 60) -> str:
    return f'\n[status]\nport = {port}\ntoken = "{TOKEN}"\nrefresh_seconds = {refresh}\n'


def _api(port: int, path: str, method: str = "GET") -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def _storescu(port: int, files) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aec", "GLIONODE", "-xy", "-R", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticSlide]:
    root = tmp_path_factory.mktemp("status-slides")
    out = {name: write_synthetic_slide(replace(SPEC, seed=seed), root / name)
           for name, seed in (("first", 31), ("second", 32), ("bad", 33))}
    for path in out["bad"].files:
        ds = pydicom.dcmread(path)
        del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        ds.save_as(path)
    return out


def test_the_page_shows_a_slide_go_from_waiting_to_running_to_delivered_and_a_failure_in_words(
    orthanc, make_node, slides
):
    http_port = free_port()
    node = make_node(orthanc.dicom_port, extra_toml=_status_toml(http_port)).start()
    url = f"http://127.0.0.1:{http_port}/"
    with chromium() as browser:
        context = browser.new_context(
            http_credentials={"username": "it-desk", "password": TOKEN}, viewport={"width": 1280, "height": 1400}
        )
        page = context.new_page()
        page.goto(url)
        assert page.locator("h1").inner_text().startswith("glio-node")
        assert page.locator('meta[http-equiv="refresh"]').get_attribute("content") == "60"
        assert page.locator("#nodes tr.ok").count() == 1  # this node, heartbeat fresh

        sender = subprocess.Popen(  # both slides in one association, then the bad one
            ["storescu", "-aec", "GLIONODE", "-xy", "-R", "127.0.0.1", str(node.port),
             *map(str, slides["first"].files + slides["second"].files + slides["bad"].files)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        seen: list[str] = []
        progress_seen = False
        deadline = time.monotonic() + 240
        second_job = None
        while time.monotonic() < deadline:
            page.reload()
            if second_job is None:
                second_job = _job_of(node, slides["second"])
            if second_job is not None:
                row = page.locator(f"#job-{second_job} .state")
                if row.count():
                    state = row.inner_text()
                    if not seen or seen[-1] != state:
                        seen.append(state)
                    if state == "running" and page.locator(f"#running-{second_job} progress").count():
                        progress_seen = True
                    if state == "delivered":
                        break
            time.sleep(0.3)
        assert sender.wait(60) == 0, sender.stdout.read()
        assert "delivered" in seen, f"states seen: {seen}\n{node.log()[-3000:]}"
        assert seen.index("waiting") < seen.index("running") < seen.index("delivered"), seen
        assert progress_seen, "the running job showed no progress bar"
        delivered = {d.sop_instance_uid for d in node.deliveries() if d.job_id == second_job}
        in_orthanc = {
            i["MainDicomTags"]["SOPInstanceUID"]
            for i in orthanc.instances_of_study(slides["second"].study_instance_uid)
        }
        assert delivered and delivered <= in_orthanc

        bad_job = wait_for(lambda: _job_of(node, slides["bad"], JobState.FAILED), 120, "the bad slide to fail", node)
        page.reload()
        bad_row = page.locator(f"#job-{bad_job}")
        assert bad_row.locator(".state").inner_text() == "failed"
        reason = bad_row.locator(".reason").inner_text()
        assert reason.startswith("The slide could not be analysed:") and "spacing" in reason.lower(), reason
        assert bad_row.locator("button", has_text="Retry").count() == 1

        wait_for(node.all_delivered, 60, "every result to be delivered", node)
        page.reload()
        assert page.locator(f"#job-{_job_of(node, slides['first'])} .state").inner_text() == "delivered"
        assert "Nothing waiting to be delivered" in page.locator("#deliveries").inner_text()
        assert page.locator("#destinations").inner_text().count("answered C-ECHO") == 1
        assert page.locator("#throughput svg rect.done").count() >= 1
        html = page.content()
        patient = pydicom.dcmread(slides["second"].files[0], stop_before_pixels=True)
        assert str(patient.PatientName) not in html and str(patient.PatientID) not in html
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        context.close()
    assert node.stop() == 0
    # (The bad slide's path, UIDs included, is in the scheduler's failure line: a known issue of
    # the BadInput messages, reported separately.)
    for name in ("first", "second"):
        assert slides[name].series_instance_uid not in node.log()


def test_paused_intake_answers_0xA700_stores_nothing_and_resumes(orthanc, make_node, slides):
    http_port = free_port()
    node = make_node(orthanc.dicom_port, extra_toml=_status_toml(http_port)).start()
    assert _api(http_port, "/api/intake/pause", "POST") == {"intake_paused": True}

    refused = _storescu(node.port, slides["first"].files)
    assert refused.returncode != 0  # storescu: "some stores failed"; it keeps its files
    assert node.jobs() == [] and list((node.folder / "spool" / "instances").glob("**/*.dcm")) == []
    events = node.events("instance_refused")
    assert events  # storescu stops at the first refusal; a PACS queues the rest for later
    assert {(e.details["status"], e.details["reason"]) for e in events} == {("0xA700", "intake_paused")}
    assert _api(http_port, "/api/status")["intake_paused"] is True

    assert _api(http_port, "/api/intake/resume", "POST") == {"intake_paused": False}
    sent = _storescu(node.port, slides["first"].files)  # the PACS sends again later
    assert sent.returncode == 0, sent.stderr
    wait_for(node.all_delivered, 240, "the re-sent slide to be delivered", node)
    assert [e.event for e in node.events("intake_paused")] == ["intake_paused"]
    assert node.events("intake_resumed")[0].details == {"by": "token"}
    assert node.stop() == 0


def _job_of(node, slide: SyntheticSlide, state: JobState | None = None) -> int | None:
    from sqlalchemy import select

    from glio_node.store.models import Job, Series

    with node.sessions.begin() as s:
        row = s.execute(
            select(Job.id, Job.state).join(Series, Series.id == Job.series_id)
            .where(Series.series_instance_uid == slide.series_instance_uid)
        ).one_or_none()
    if row is None or (state is not None and row.state != state):
        return None
    return row.id


def test_status_page_alone_is_read_only_and_stops_on_sigterm(make_node):
    import os
    import signal
    import sys

    http_port = free_port()
    node = make_node(None, extra_toml=_status_toml(http_port))  # a database, no node running
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "glio_node.cli", "status-page", "--config", str(node.config)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        status = wait_for(lambda: _try_api(http_port, "/api/status"), 30, "the status page to answer")
        assert status["jobs"] == [] and status["nodes"] == []
        with pytest.raises(urllib.error.HTTPError) as refused:
            _api(http_port, "/api/intake/pause", "POST")
        assert refused.value.code == 403
        assert "read-only status page" in refused.value.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stdout.read()


def test_status_page_refuses_to_listen_beyond_localhost_without_a_token(make_node):
    import sys

    node = make_node(None, extra_toml='\n[status]\nhost = "0.0.0.0"\n')
    done = subprocess.run(
        [sys.executable, "-m", "glio_node.cli", "status-page", "--config", str(node.config)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2
    assert "listens beyond this machine but token is empty" in done.stderr


def _try_api(port: int, path: str) -> dict | None:
    try:
        return _api(port, path)
    except OSError:
        return None
