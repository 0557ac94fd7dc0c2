"""The DICOMweb pull mode end to end: a slide in Orthanc -> QIDO-RS / WADO-RS -> the node -> STOW-RS.

A site that speaks only DICOMweb: the slide is put into a real Orthanc (REST API, as a scanner's
gateway would), the node (a ``glio-node serve`` subprocess) polls Orthanc's DICOMweb plugin,
retrieves the slide, analyses it, and stores SEG, SR and heatmaps back by STOW-RS into the
slide's study.  A restart must not fetch or analyse anything twice.
"""

from __future__ import annotations

import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from node_process import (
    SERVE_SPEC,
    Node,
    assert_results_in_orthanc,
    successful_sends,
    wait_for,
    wait_until_queued,
)
from orthanc_peer import Orthanc, free_port
from sqlalchemy import select

from glio_node.store.models import JobState, PullSource
from glio_node.synthetic.slide import SyntheticSlide, write_synthetic_slide

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs("orthanc", "orthanc-dicomweb"),
]

def put_into_orthanc(orthanc: Orthanc, slide: SyntheticSlide) -> None:
    for path in slide.files:
        request = urllib.request.Request(orthanc.url + "/instances", data=path.read_bytes(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200


def polled_since(node: Node, since: datetime) -> bool:
    """Whether the source polled after ``since``.  Its row appears only once the node has started
    and registered it, and its last poll is empty until the first: both are "not yet"."""
    with node.sessions.begin() as s:
        last = s.scalars(select(PullSource.last_poll_at).where(PullSource.name == "orthanc-web")).one_or_none()
    return last is not None and last > since


def pull_toml(orthanc: Orthanc) -> str:
    return f"""
[[sources]]
name = "orthanc-web"
type = "dicomweb"
url = "{orthanc.dicomweb_url}"
poll_seconds = 1

[[destinations]]
name = "orthanc-stow"
type = "dicomweb"
url = "{orthanc.dicomweb_url}"
"""


def test_a_slide_put_into_a_dicomweb_pacs_is_pulled_analysed_and_its_results_stored_back_once(
    orthanc, make_node, slide, tmp_path
):
    put_into_orthanc(orthanc, slide)
    node = make_node(None, extra_toml=pull_toml(orthanc)).start()
    wait_for(node.all_delivered, 120, "the results to be stored back by STOW-RS", node)
    assert_results_in_orthanc(orthanc, node, slide, slide_in_orthanc=True)

    # It came the C-STORE way through the spool: one instance_received per file, from the source.
    received = node.events("instance_received")
    assert len(received) == len(slide.files)
    assert {e.calling_ae for e in received} == {"orthanc-web"}
    [retrieved] = node.events("series_retrieved")
    assert retrieved.series_instance_uid == slide.series_instance_uid
    assert retrieved.details["stored"] == len(slide.files)
    assert node.events("poll_found")[0].details["new_series"] == 1
    [job] = node.jobs()
    assert job.state == JobState.DONE and job.attempts == 1
    assert set(successful_sends(node).values()) == {1}
    assert node.stop() == 0
    # No patient data and no series UID in the log: the source lists PatientName in its answers.
    log = node.log()
    assert "SYNTHETIC^DEMO" not in log and slide.series_instance_uid not in log
    assert "source orthanc-web" in log and "retrieved" in log

    # Restart: the results' own series (SEG, SR, maps) are not SM, the slide was taken: nothing
    # is fetched, analysed or sent twice.  A slide put in after the restart's first poll is
    # retrieved and queued after anything that poll would have taken again: the witness.
    node.start()
    restarted = datetime.now(UTC)
    wait_for(lambda: polled_since(node, restarted), 30, "a poll after the restart", node)
    next_slide = write_synthetic_slide(replace(SERVE_SPEC, seed=8), tmp_path / "next-slide")
    put_into_orthanc(orthanc, next_slide)
    wait_until_queued(node, next_slide)
    retrieved = [e.series_instance_uid for e in node.events("series_retrieved")]
    assert retrieved == [slide.series_instance_uid, next_slide.series_instance_uid]
    assert len(node.events("instance_received")) == len(slide.files) + len(next_slide.files)
    assert len(node.jobs()) == 2
    assert set(successful_sends(node).values()) == {1}
    assert node.stop() == 0
    assert node.log().count("retrieved") == 2


def test_a_wrong_password_is_reported_once_and_the_node_keeps_running(tmp_path, make_node, monkeypatch):
    protected = Orthanc(
        tmp_path / "protected", free_port(), free_port(),
        extra={"AuthenticationEnabled": True, "RegisteredUsers": {"glio": "secret"}},
    ).start()
    try:
        node = make_node(None, extra_toml=f"""
[[sources]]
name = "orthanc-web"
url = "{protected.dicomweb_url}"
auth = "basic"
username = "glio"
poll_seconds = 1
""")
        # The password comes from the environment, as adapters/dicomweb/README.md advises.
        monkeypatch.setenv("GLIO_SOURCES_0_PASSWORD", "not-the-secret")
        node.start()
        started = datetime.now(UTC)
        wait_for(lambda: polled_since(node, started + timedelta(seconds=2)), 30, "several polls", node)
        [failed] = node.events("poll_failed")
        assert "HTTP 401" in failed.details["error"]
        assert node.proc.poll() is None  # still serving
        log = node.log()
        assert log.count("HTTP 401: the server refused our credentials") == 1
        assert "not-the-secret" not in log
        assert node.stop() == 0
    finally:
        protected.stop()
