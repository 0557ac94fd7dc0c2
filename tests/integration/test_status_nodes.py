"""Several nodes on one PostgreSQL: the status page lists every node and its heartbeat, an
operator's pause reaches all of them (one ``control`` row), and a node whose heartbeat stops
loses its running job to another node, on the real database server."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select

from glio_node.config import Settings, WorkerSettings
from glio_node.receive.spool import Spool
from glio_node.scheduler import NodeScheduler
from glio_node.store import actions, nodes, queue
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.instances import ReceivedInstance, record_instance
from glio_node.store.models import AuditEvent, JobState
from glio_node.web.app import create_app
from glio_node.web.health import NodeContext

def test_every_node_and_its_heartbeat_appear_and_a_pause_reaches_all(postgres_url):
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessions(engine)
    now = datetime.now(UTC)
    try:
        with sessions.begin() as s:
            for owner, host in (("gpu-a:1:aaaaaa", "gpu-a"), ("gpu-b:2:bbbbbb", "gpu-b"), ("gpu-c:3:cccccc", "gpu-c")):
                nodes.register(s, nodes.NodeInfo(owner, host, "0.1.0", "gpu:0", "glio-demo", "0.1.0"), now - timedelta(hours=1))
            nodes.heartbeat(s, "gpu-a:1:aaaaaa", now - timedelta(seconds=2))
            nodes.heartbeat(s, "gpu-b:2:bbbbbb", now - timedelta(minutes=5))  # died without a word
            nodes.mark_stopped(s, "gpu-c:3:cccccc", now - timedelta(minutes=1))
        with TestClient(create_app(Settings(), sessions, NodeContext(read_only=True))) as client:
            listed = {n["hostname"]: n for n in client.get("/api/status").json()["nodes"]}
            assert set(listed) == {"gpu-a", "gpu-b", "gpu-c"}
            assert listed["gpu-a"]["alive"] and not listed["gpu-b"]["alive"] and not listed["gpu-c"]["alive"]
            assert listed["gpu-b"]["heartbeat_age_seconds"] >= 300
            html = client.get("/").text
            assert "silent for 5 min" in html and "stopped " in html
        with sessions.begin() as s:
            actions.set_intake_paused(s, True, now, by="it-desk", address="10.0.0.9:5000")
        with sessions.begin() as s:  # a second switch updates the one row (ON CONFLICT DO UPDATE)
            assert actions.intake_paused(s)
            actions.set_intake_paused(s, False, now, by="it-desk", address=None)
        with sessions.begin() as s:
            assert not actions.intake_paused(s)
    finally:
        engine.dispose()


def test_a_node_whose_heartbeat_stops_loses_its_job_to_another_node_after_node_silent_seconds(
    postgres_url, tmp_path
):
    """Node A (another host) runs a job and dies without a word: its heartbeat stops.  Node B,
    sweeping every 5 s, leaves the job alone while A may still be alive, takes it back once A
    is silent for longer than ``node_silent_seconds`` (30 s, not the 300 s lease), and runs it."""
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessions(engine)
    t0 = datetime.now(UTC)
    clock = {"now": t0}
    settings = Settings(worker=WorkerSettings(lease_seconds=300, node_silent_seconds=30))
    spool = Spool(tmp_path / "spool", 0)

    def node(owner: str, boot_id: str) -> NodeScheduler:
        scheduler = NodeScheduler(settings, sessions, spool, tmp_path, owner=owner, clock=lambda: clock["now"])
        here = nodes.this_process()
        assert here is not None
        process = replace(here, boot_id=boot_id)  # another machine: its PIDs mean nothing here
        with sessions.begin() as s:
            nodes.register(s, nodes.NodeInfo(owner, owner.split(":")[0], "0.1.0", "gpu:0", "glio-demo", "0.1.0", process), t0)
        return scheduler

    try:
        a, b = node("gpu-a:41:aaaaaa", "boot-of-gpu-a"), node("gpu-b:42:bbbbbb", "boot-of-gpu-b")
        with sessions.begin() as s:
            for series in ("1.2.3.4.1", "1.2.3.4.2"):
                record_instance(s, ReceivedInstance(
                    sop_instance_uid=series + ".1", series_instance_uid=series, study_instance_uid="1.2.3",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.6", transfer_syntax_uid="1.2.840.10008.1.2.4.50",
                    path=f"/spool/{series}.dcm", size_bytes=1, sha256="0" * 64, calling_ae="ORTHANC", address=None,
                ), t0)
                queue.enqueue_series(s, series, max_attempts=3, now=t0)
            a_job = queue.claim_job(s, a.owner, 300, t0)
            b_job = queue.claim_job(s, b.owner, 300, t0)
        a.heartbeat()  # A's last word at t0; B beats on

        for seconds in (5, 10, 15, 20, 25, 30):  # B's sweeps while A might only be slow
            clock["now"] = t0 + timedelta(seconds=seconds)
            b.heartbeat()
            b.requeue_expired()
            with sessions.begin() as s:
                assert queue.get_job(s, a_job.id).lease_owner == a.owner, seconds
        clock["now"] = t0 + timedelta(seconds=35)
        b.heartbeat()
        b.requeue_expired()
        with sessions.begin() as s:
            taken = queue.get_job(s, a_job.id)
            assert taken.state == JobState.WAITING and taken.lease_owner is None
            assert queue.get_job(s, b_job.id).lease_owner == b.owner  # B's own job stays B's
            [event] = s.scalars(select(AuditEvent).where(AuditEvent.event == "node_gone")).all()
            assert event.job_id == a_job.id
            assert event.details == {
                "owner": a.owner, "reason": "no heartbeat for 35 s (node_silent_seconds = 30)",
                "attempt": 1, "requeued": True,
            }
            again = queue.claim_job(s, b.owner, 300, clock["now"])
            assert again.id == a_job.id and again.attempts == 2
        with sessions.begin() as s:  # A, were it only paused, finds its lease gone
            assert not queue.renew_lease(s, a_job.id, a.owner, 300, clock["now"])
    finally:
        engine.dispose()


def test_a_node_finishing_its_job_during_a_graceful_stop_keeps_its_heartbeat(postgres_url, tmp_path):
    """SIGTERM stops the periodic jobs but waits up to shutdown_grace_seconds for the running
    one: the node must keep beating meanwhile, or the other nodes would take the job back
    from a node that is only finishing it."""
    import threading

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessions(engine)
    release = threading.Event()

    def run_job(*_args, **_kwargs):
        release.wait(30)  # the analysis, still running while the node stops
        raise RuntimeError("interrupted by the test")

    settings = Settings(worker=WorkerSettings(lease_seconds=300, shutdown_grace_seconds=8))
    a = NodeScheduler(settings, sessions, Spool(tmp_path / "spool", 0), tmp_path, owner="gpu-d:4:dddddd", run_job=run_job)
    t0 = datetime.now(UTC)
    try:
        with sessions.begin() as s:
            nodes.register(s, nodes.NodeInfo(a.owner, "gpu-d", "0.1.0", "cpu", "glio-demo", "0.1.0", nodes.this_process()), t0)
            record_instance(s, ReceivedInstance(
                sop_instance_uid="1.2.3.5.1.1", series_instance_uid="1.2.3.5.1", study_instance_uid="1.2.3",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.6", transfer_syntax_uid="1.2.840.10008.1.2.4.50",
                path=str(tmp_path / "x.dcm"), size_bytes=1, sha256="0" * 64, calling_ae="ORTHANC", address=None,
            ), t0)
            job_id = queue.enqueue_series(s, "1.2.3.5.1", max_attempts=3, now=t0).job_id
        a.dispatch()
        assert a.running_jobs()
        stopping = threading.Thread(target=a.stop, args=(settings.worker.shutdown_grace_seconds,))
        stopping.start()

        def beat() -> datetime:
            with sessions.begin() as s:
                return next(n.heartbeat_at for n in nodes.all_nodes(s) if n.owner == a.owner)

        deadline = time.monotonic() + 7
        while beat() <= t0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert beat() > t0, "no heartbeat while the node finished its job"
        with sessions.begin() as s:
            assert nodes.gone_owners(s, datetime.now(UTC), silent_after_seconds=15) == {}
            assert queue.get_job(s, job_id).lease_owner == a.owner
        release.set()  # the job ends (with an error: retried later); stop returns
        stopping.join(10)
        assert not stopping.is_alive() and not a.running_jobs()
    finally:
        release.set()
        deadline = time.monotonic() + 10
        while a.running_jobs() and time.monotonic() < deadline:
            time.sleep(0.1)
        engine.dispose()
