"""``glio-node serve`` end to end: DCMTK storescu -> the node (a subprocess) -> Orthanc.

Each test starts the node with its own config (SQLite, spool and ports in tmp, the demo bundle,
quiet_seconds 1) and checks what arrives in a real Orthanc through its REST API, and what the
node's database says (jobs, deliveries, audit trail).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from orthanc_peer import Orthanc, free_port, have_orthanc
from sqlalchemy import select

from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.models import AuditEvent, Delivery, DeliveryState, Job, JobState
from glio_node.synthetic.slide import SlideSpec, SyntheticSlide, write_synthetic_slide

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_orthanc(), reason="Orthanc not installed"),
    pytest.mark.skipif(not shutil.which("storescu"), reason="DCMTK storescu not installed"),
]

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "models" / "glio-demo"
SPEC = SlideSpec(width_px=1024, height_px=768, tile_size=256, levels=3, context_images=False)
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    return write_synthetic_slide(SPEC, tmp_path_factory.mktemp("serve-slide"))


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
        wait_for(lambda: "serving as" in self.log(), 60, "the node to start", self)
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


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def make(destination_port: int, *, lease_seconds: float = 30, database_url: str | None = None,
             folder: Path | None = None, spool: Path | None = None, grace_seconds: float = 30) -> Node:
        folder = folder or tmp_path / f"node{len(nodes)}"
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        url = database_url or f"sqlite:///{folder / 'glio.db'}"
        config = folder / "glio-node.toml"
        config.write_text(f"""
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
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {destination_port}
""")
        if database_url is None:
            upgrade(url)
        node = Node(folder, port, config, url)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    yield peer
    peer.stop()


def assert_results_in_orthanc(orthanc: Orthanc, node: Node, slide: SyntheticSlide) -> None:
    """Every delivered object is in Orthanc, in the slide's study: SEG, SR and heatmaps."""
    delivered = {d.sop_instance_uid: d.sop_class_uid for d in node.deliveries()}
    in_orthanc = {
        i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances_of_study(slide.study_instance_uid)
    }
    assert set(delivered) == in_orthanc
    assert orthanc.instance_count() == len(delivered)  # nothing outside the slide's study
    modalities = Counter(s["MainDicomTags"].get("Modality") for s in orthanc.series_of_study(slide.study_instance_uid))
    assert modalities["SEG"] >= 1 and modalities["SR"] == 1, modalities
    assert PARAMETRIC_MAP in delivered.values()  # the heatmaps


def successful_sends(node: Node) -> Counter[str]:
    return Counter(
        e.sop_instance_uid for e in node.events("delivery_attempt") if e.details["state"] == "sent"
    )


def test_a_slide_sent_by_storescu_comes_back_to_orthanc_and_a_resend_makes_no_second_job(
    orthanc, make_node, slide
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
    time.sleep(3)  # > quiet_seconds + a sweep
    assert len(node.events("instance_duplicate")) == len(slide.files)
    assert len(node.jobs()) == 1
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


def test_a_node_killed_mid_job_runs_it_again_after_restart_and_delivers_once(
    orthanc, make_node, slide
):
    node = make_node(orthanc.dicom_port, lease_seconds=3).start()
    node.send(slide)
    wait_for(lambda: node.events("job_started"), 30, "the job to start", node)
    node.stop(signal.SIGKILL)  # at once: with the models preloaded the job lasts only a second or two
    [job] = node.jobs()
    assert job.state == JobState.RUNNING and not node.deliveries()

    node.start()
    wait_for(node.all_delivered, 60, "the results after the restart", node)
    [job] = node.jobs()
    assert job.state == JobState.DONE and job.attempts == 2
    assert len(node.events("lease_expired")) == 1
    assert set(successful_sends(node).values()) == {1}
    assert_results_in_orthanc(orthanc, node, slide)
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


PG_ADMIN_URL = os.environ.get(
    "GLIO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    import socket
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = make_url(PG_ADMIN_URL)
    try:
        socket.create_connection((admin_url.host or "127.0.0.1", admin_url.port or 5432), 1).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail(f"no PostgreSQL listens at {admin_url.render_as_string()}")
        pytest.skip(f"no PostgreSQL listens at {admin_url.render_as_string()}")
    name = f"glio_e2e_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = admin_url.set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def six_slides(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticSlide]:
    from dataclasses import replace

    root = tmp_path_factory.mktemp("six-slides")
    return [write_synthetic_slide(replace(SPEC, seed=10 + i), root / str(i)) for i in range(6)]


def test_two_nodes_on_one_postgresql_queue_analyse_each_of_six_series_once(
    tmp_path, orthanc, make_node, postgres_url, six_slides
):
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
