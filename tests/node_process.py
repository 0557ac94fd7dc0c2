"""A ``glio-node serve`` subprocess for end-to-end tests, and a window onto its database.

Helpers only; the fixtures in tests/e2e/conftest.py wrap them.  ``make_node`` (fixture) writes a
config (SQLite, spool and ports in tmp, the demo bundle, quiet_seconds 1) with ``extra_toml``
appended for a test's own sections.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from orthanc_peer import Orthanc, free_port
from sqlalchemy import func, select

from glio_node.store.db import make_engine, make_sessions
from glio_node.store.models import AuditEvent, Delivery, DeliveryState, Job, NodeRow
from glio_node.synthetic.slide import SlideSpec, SyntheticSlide

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "models" / "glio-demo"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
# The slide the end-to-end tests send: small (12 base frames, 3 levels), seconds to analyse.
SERVE_SPEC = SlideSpec(width_px=1024, height_px=768, tile_size=256, levels=3, context_images=False)

@dataclass
class Node:
    """A ``glio-node serve`` subprocess and a window onto its database."""

    folder: Path
    port: int
    config: Path
    url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = make_engine(self.url)
        self.sessions = make_sessions(self.engine)

    def start(self) -> "Node":
        log = (self.folder / "node.log").open("ab")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.Popen(
            [sys.executable, "-m", "glio_node.cli", "serve", "--config", str(self.config)],
            cwd=REPO, stdout=log, stderr=log, env=env,
        )
        self.procs.append(proc)
        # The log is appended to across restarts: wait for this start's own line.
        starts = len(self.procs)
        wait_for(lambda: self.log().count("serving as") >= starts, 60, "the node to start", self)
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    def log(self) -> str:
        path = self.folder / "node.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=90)

    def send(self, slide: SyntheticSlide) -> None:
        done = subprocess.run(
            ["storescu", "-aec", "GLIONODE", "-xy", "-R", "127.0.0.1", str(self.port),
             *map(str, slide.files)],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr

    def jobs(self) -> list[Job]:
        with self.sessions.begin() as s:
            return list(s.scalars(select(Job).order_by(Job.id)))

    def deliveries(self) -> list[Delivery]:
        with self.sessions.begin() as s:
            return list(s.scalars(select(Delivery).order_by(Delivery.id)))

    def events(self, name: str) -> list[AuditEvent]:
        with self.sessions.begin() as s:
            return list(
                s.scalars(select(AuditEvent).where(AuditEvent.event == name).order_by(AuditEvent.id))
            )

    def heartbeat(self) -> datetime | None:
        """The latest heartbeat any node wrote to this store (None before the first)."""
        with self.sessions.begin() as s:
            return s.scalar(select(func.max(NodeRow.heartbeat_at)))

    def all_delivered(self) -> bool:
        rows = self.deliveries()
        return bool(rows) and all(d.state == DeliveryState.SENT for d in rows)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.engine.dispose()


def wait_for(check: Callable[[], object], timeout: float, what: str, node: Node | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if node is not None and node.procs and node.proc.poll() is not None:
            pytest.fail(f"the node exited ({node.proc.returncode}) waiting for {what}:\n{node.log()[-4000:]}")
        time.sleep(0.25)
    tail = node.log()[-4000:] if node else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tail}")


def wait_until_queued(node: Node, later: SyntheticSlide, timeout: float = 60) -> None:
    """Wait until the node has queued the job of ``later``, a slide that arrived after whatever
    the test expects to have caused nothing (a resend, a restart).

    The witness that replaces a fixed sleep before "nothing else happened": a sweep turns every
    quiet series into a job in one pass, oldest first, so once a slide that arrived later has its
    ``series_complete`` audit row, any job the earlier arrival would have caused is queued too.
    """
    wait_for(
        lambda: [e for e in node.events("series_complete")
                 if e.series_instance_uid == later.series_instance_uid],
        timeout, "the later slide's job to be queued", node,
    )


def assert_results_in_orthanc(
    orthanc: Orthanc, node: Node, slide: SyntheticSlide, *, slide_in_orthanc: bool = False, regions: bool = True
) -> None:
    """Every delivered object is in Orthanc, in the slide's study: SEG, SR and Parametric Maps.

    ``slide_in_orthanc``: Orthanc also holds the slide itself (the node pulled it from there).
    ``regions`` False: the bundle has no segmentation network, so no SEG may be there.
    """
    delivered = {d.sop_instance_uid: d.sop_class_uid for d in node.deliveries()}
    in_orthanc = {
        i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances_of_study(slide.study_instance_uid)
    }
    slide_uids = (
        {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in slide.files}
        if slide_in_orthanc else set()
    )
    assert set(delivered) | slide_uids == in_orthanc
    assert orthanc.instance_count() == len(delivered) + len(slide_uids)  # nothing outside the study
    modalities = Counter(s["MainDicomTags"].get("Modality") for s in orthanc.series_of_study(slide.study_instance_uid))
    assert (modalities["SEG"] >= 1 if regions else modalities["SEG"] == 0) and modalities["SR"] == 1, modalities
    assert PARAMETRIC_MAP in delivered.values()  # the heatmaps or attention maps


def successful_sends(node: Node) -> Counter[str]:
    return Counter(
        e.sop_instance_uid for e in node.events("delivery_attempt") if e.details["state"] == "sent"
    )


def node_config(folder: Path, port: int, url: str, *, destination_port: int | None,
                lease_seconds: float = 30, spool: Path | None = None, grace_seconds: float = 30,
                extra_toml: str = "") -> str:
    """The TOML a test node runs with; ``destination_port`` None leaves out the destination."""
    text = f"""
[node]
ae_title = "GLIONODE"
host = "127.0.0.1"
port = {port}
[storage]
spool_dir = "{spool or folder / 'spool'}"
database_url = "{url}"
min_free_bytes = 0
retention_seconds = 3600
[series]
quiet_seconds = 1
incomplete_wait_seconds = 30
[models]
dir = "{BUNDLE}"
[worker]
lease_seconds = {lease_seconds}
backoff_base_seconds = 1
backoff_max_seconds = 2
device = "cpu"
shutdown_grace_seconds = {grace_seconds}
"""
    if destination_port is not None:
        text += f"""
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {destination_port}
"""
    if "[status]" not in extra_toml:
        # Every node serves its status page; on a free port, so parallel nodes never collide.
        text += f"\n[status]\nport = {free_port()}\n"
    return text + extra_toml
