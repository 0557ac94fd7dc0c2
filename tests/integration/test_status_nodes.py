"""Several nodes on one PostgreSQL: the status page lists every node and its heartbeat, and an
operator's pause reaches all of them (one ``control`` row), on the real database server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from glio_node.config import Settings
from glio_node.store import actions, nodes
from glio_node.store.db import make_engine, make_sessions, upgrade
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
