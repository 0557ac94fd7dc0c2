"""``glio-node serve`` end to end: DCMTK storescu -> the node (a subprocess) -> Orthanc.

Each test starts the node with its own config (SQLite, spool and ports in tmp, the demo bundle,
quiet_seconds 1) and checks what arrives in a real Orthanc through its REST API, and what the
node's database says (jobs, deliveries, audit trail).
"""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from node_process import (
    SERVE_SPEC,
    assert_results_in_orthanc,
    successful_sends,
    wait_for,
    wait_until_queued,
)
from orthanc_peer import Orthanc, free_port

from glio_node.store.db import upgrade
from glio_node.store.models import JobState
from glio_node.synthetic.slide import SyntheticSlide, write_synthetic_slide

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs("orthanc", "storescu"),
]

def test_a_slide_sent_by_storescu_comes_back_to_orthanc_and_a_resend_makes_no_second_job(
    orthanc, make_node, slide, tmp_path
):
    node = make_node(orthanc.dicom_port).start()
    node.send(slide)
    wait_for(node.all_delivered, 60, "the results to be delivered", node)
    assert_results_in_orthanc(orthanc, node, slide)
    [job] = node.jobs()
    assert job.state == JobState.DONE and job.attempts == 1
    assert job.bundle_name == "glio-demo" and job.bundle_sha256
    assert set(successful_sends(node).values()) == {1}

    # The PACS sends the same slide again: stored once, no second job, nothing sent twice.
    node.send(slide)
    assert len(node.events("instance_duplicate")) == len(slide.files)
    next_slide = write_synthetic_slide(replace(SERVE_SPEC, seed=7), tmp_path / "next-slide")
    node.send(next_slide)
    wait_until_queued(node, next_slide)
    queued = [e.series_instance_uid for e in node.events("series_complete")]
    assert queued == [slide.series_instance_uid, next_slide.series_instance_uid]
    assert len(node.jobs()) == 2
    assert set(successful_sends(node).values()) == {1}
    assert node.stop() == 0
    assert "done in" in node.log() and slide.series_instance_uid not in node.log()


def test_a_destination_down_then_up_gets_every_result_exactly_once(tmp_path, make_node, slide):
    peer = Orthanc(tmp_path / "late-orthanc", free_port(), free_port())
    node = make_node(peer.dicom_port).start()
    node.send(slide)
    wait_for(
        lambda: any(e.details["state"] == "pending" for e in node.events("delivery_attempt")),
        60, "a failed delivery attempt", node,
    )
    assert not node.all_delivered()
    peer.start()
    try:
        wait_for(node.all_delivered, 30, "the results to be delivered after the PACS came up", node)
        assert_results_in_orthanc(peer, node, slide)
        assert set(successful_sends(node).values()) == {1}
        assert all(d.attempts >= 2 for d in node.deliveries())
    finally:
        peer.stop()
    assert node.stop() == 0


@pytest.fixture(scope="module")
def slow_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """A slide whose analysis takes several seconds (256 base frames), so a test can kill the
    node while the job is surely running: after its first progress row, before its last."""
    from dataclasses import replace

    spec = replace(SERVE_SPEC, width_px=4096, height_px=4096, seed=3)
    return write_synthetic_slide(spec, tmp_path_factory.mktemp("slow-slide"))


def test_a_node_killed_mid_job_and_restarted_takes_the_job_back_at_once_and_delivers_once(
    orthanc, make_node, slow_slide
):
    """SIGKILL while the job runs, then a restart: the new process sees the old one's PID gone
    and takes the job back at once, not after the 300 s lease."""
    node = make_node(orthanc.dicom_port, lease_seconds=300).start()
    node.send(slow_slide)

    def mid_job() -> bool:
        jobs = node.jobs()
        return bool(jobs) and jobs[0].tiles_total is not None and jobs[0].tiles_done < jobs[0].tiles_total

    wait_for(mid_job, 60, "the job to report progress", node)
    node.stop(signal.SIGKILL)
    killed_at = datetime.now(UTC)
    [job] = node.jobs()
    assert job.state == JobState.RUNNING and not node.deliveries()  # killed mid-job, for sure
    dead_owner = job.lease_owner

    node.start()
    [taken] = wait_for(lambda: node.events("node_gone"), 30, "the job to be taken back", node)
    assert taken.details["owner"] == dead_owner and taken.details["requeued"] is True
    assert taken.details["reason"] == f"process {dead_owner.split(':')[1]} on this host is gone"
    assert (taken.at - killed_at).total_seconds() < 30  # the restart itself; the lease is 300 s
    wait_for(node.all_delivered, 90, "the results after the restart", node)
    [job] = node.jobs()
    assert job.state == JobState.DONE and job.attempts == 2
    assert not node.events("lease_expired")
    last_sent = max(e.at for e in node.events("delivery_attempt"))
    assert (last_sent - killed_at).total_seconds() < 120 < 300
    assert set(successful_sends(node).values()) == {1}
    assert_results_in_orthanc(orthanc, node, slow_slide)
    assert node.stop() == 0


def test_sigterm_mid_job_gives_the_job_back_and_a_restart_delivers_once(orthanc, make_node, slide):
    """Grace period 0: SIGTERM does not wait for the running job; it is released, not lost."""
    node = make_node(orthanc.dicom_port, grace_seconds=0).start()
    node.send(slide)
    wait_for(lambda: node.events("job_started"), 30, "the job to start", node)
    assert node.stop(signal.SIGTERM) == 0
    assert len(node.events("job_released")) == 1
    [job] = node.jobs()
    assert job.state == JobState.WAITING and not node.deliveries()

    node.start()
    wait_for(node.all_delivered, 60, "the results after the restart", node)
    [job] = node.jobs()
    assert job.state == JobState.DONE
    assert set(successful_sends(node).values()) == {1}
    assert_results_in_orthanc(orthanc, node, slide)
    assert node.stop() == 0


@pytest.fixture(scope="module")
def six_slides(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticSlide]:
    root = tmp_path_factory.mktemp("six-slides")
    return [write_synthetic_slide(replace(SERVE_SPEC, seed=10 + i), root / str(i)) for i in range(6)]


def test_two_nodes_on_one_postgresql_queue_analyse_each_of_six_series_once(
    tmp_path, orthanc, make_node, postgres_url, six_slides
):
    upgrade(postgres_url)
    spool = tmp_path / "shared-spool"  # nodes sharing a queue share the spool's filesystem
    nodes = [
        make_node(orthanc.dicom_port, database_url=postgres_url, spool=spool) for _ in range(2)
    ]
    for node in nodes:
        node.start()
    for i, slide in enumerate(six_slides):
        nodes[i % 2].send(slide)
    a = nodes[0]
    def six_delivered() -> bool:
        jobs = a.jobs()
        return (
            len(jobs) == 6
            and all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs)
            and a.all_delivered()
        )

    wait_for(six_delivered, 120, "six jobs delivered", a)
    jobs = a.jobs()
    assert all(j.state == JobState.DONE and j.attempts == 1 for j in jobs), [
        (j.id, j.state, j.attempts, j.last_error) for j in jobs
    ]
    started = Counter(e.job_id for e in a.events("job_started"))
    assert set(started) == {j.id for j in jobs} and set(started.values()) == {1}
    assert set(successful_sends(a).values()) == {1}
    assert orthanc.instance_count() == len(a.deliveries())
    for node in nodes:
        assert node.stop() == 0
