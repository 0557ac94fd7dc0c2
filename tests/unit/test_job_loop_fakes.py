"""The worker's job loop on the fakes: a claimed job runs to its end state in about a second.

The store (SQLite), the scheduler's dispatch and ``run_claimed``, ``job.run_job`` and the
highdicom writers are the real ones; only the slide and the models are the numpy fakes of
``glio_node.testing``, passed through ``run_job``'s two seams.  So the job loop's own story is
checked without Keras or a DICOM slide: what it opens, what it records, what it delivers, and
how it fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import Destination, Settings, StorageSettings, WorkerSettings
from glio_node.errors import BadInput
from glio_node.job import run_job
from glio_node.receive.spool import Spool
from glio_node.scheduler import NodeScheduler
from glio_node.store import queue
from glio_node.store.audit import Event
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.instances import ReceivedInstance, record_instance
from glio_node.store.models import AuditEvent, Delivery, Job, JobState
from glio_node.testing import (
    FAKE_ALGORITHM,
    FakeClassifier,
    FakeSegmenter,
    FakeSlide,
    fake_models,
    fake_slide_opener,
    tissue_image,
)

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
DESTINATIONS = ("pacs", "archive")


@dataclass
class Node:
    sessions: sessionmaker[Session]
    spool: Spool
    settings: Settings
    slide: FakeSlide
    paths: list[str]
    job_id: int


@pytest.fixture
def node(tmp_path: Path) -> Node:
    """A node's store with one received series (two instance rows) and its job queued."""
    url = f"sqlite:///{tmp_path / 'glio.db'}"
    upgrade(url)
    sessions = make_sessions(make_engine(url))
    spool = Spool(tmp_path / "spool")
    settings = Settings(
        storage=StorageSettings(spool_dir=tmp_path / "spool", database_url=url, min_free_bytes=0),
        destinations=tuple(Destination(name=n, ae_title=n.upper(), host="127.0.0.1", port=1) for n in DESTINATIONS),
        worker=WorkerSettings(device="cpu", max_attempts=3),
    )
    slide = FakeSlide(tissue_image()[0], 0.0005)
    first = slide.levels[0].headers[0]
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    now = datetime.now(UTC) - timedelta(minutes=5)
    paths = []
    with sessions.begin() as session:
        for level in slide.levels[:2]:
            header = level.headers[0]
            path = str(spool.root / "instances" / f"level-{level.index}.dcm")  # never read: the fake opens
            paths.append(path)
            record_instance(
                session,
                ReceivedInstance(
                    sop_instance_uid=str(header.SOPInstanceUID), series_instance_uid=series,
                    study_instance_uid=study, sop_class_uid=str(header.SOPClassUID),
                    transfer_syntax_uid="1.2.840.10008.1.2.1", path=path, size_bytes=1,
                    sha256="0" * 64, calling_ae="SCANNER", address="127.0.0.1:4242",
                ),
                now,
            )
        job_id = queue.enqueue_series(session, series, max_attempts=3, now=now).job_id
    return Node(sessions, spool, settings, slide, paths, job_id)


def _scheduler(node: Node, *runners, opened: list | None = None, ood=None) -> NodeScheduler:
    run = partial(run_job, open_slide=fake_slide_opener(node.slide, opened), load_models=fake_models(*runners, ood=ood))
    return NodeScheduler(node.settings, node.sessions, node.spool, node.spool.root / "no-bundle", owner="fake:1:a", run_job=run)


def _run_one(scheduler: NodeScheduler) -> None:
    scheduler.dispatch()  # claims the job, runs it in a worker thread
    assert scheduler.stop(grace_seconds=60), "the job did not finish within 60 s"


def _job(node: Node) -> Job:
    with node.sessions() as session:
        return session.get(Job, node.job_id)


def _events(node: Node, event: Event) -> list[AuditEvent]:
    with node.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event == event.value, AuditEvent.job_id == node.job_id)))


def test_a_claimed_job_is_analysed_written_recorded_and_queued_for_every_destination(node: Node):
    opened: list = []
    seg, cls = FakeSegmenter(), FakeClassifier()
    _run_one(_scheduler(node, seg, cls, opened=opened))

    # It opened the series' spooled files, in the order received, accepting gaps.
    assert opened == [(list(map(Path, node.paths)), True)]
    assert node.slide.closed
    job = _job(node)
    assert job.state == JobState.DONE and job.attempts == 1 and job.last_error is None
    assert (job.bundle_name, job.bundle_version, job.bundle_sha256) == (
        FAKE_ALGORITHM.name, FAKE_ALGORITHM.version, FAKE_ALGORITHM.sha256,
    )
    assert job.tiles_done == job.tiles_total == sum(seg.calls) + sum(cls.calls) > 0
    assert {"open", "load_models", "tissue", "inference", "write"} <= set(job.stage_seconds)

    # What was written is what the audit trail says was created, and what is to be delivered.
    (created,) = _events(node, Event.OBJECTS_CREATED)
    objects = created.details["objects"]
    source = node.slide.levels[0].headers[0]
    written = sorted(node.spool.results_dir(source.StudyInstanceUID, source.SeriesInstanceUID).glob("*.dcm"))
    assert written
    on_disk = {}
    for path in written:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        on_disk[str(ds.SOPInstanceUID)] = str(ds.SOPClassUID)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert {o["sop_instance_uid"]: o["sop_class_uid"] for o in objects} == on_disk
    classes = sorted(on_disk.values())
    assert classes.count(COMPREHENSIVE_3D_SR) == 1 and classes.count(PARAMETRIC_MAP) == len(cls.classes)
    assert classes.count(SEG) >= 1
    assert created.details["bundle"] == FAKE_ALGORITHM.name
    with node.sessions() as session:
        deliveries = session.execute(select(Delivery.destination, Delivery.sop_instance_uid)).all()
    assert sorted(deliveries) == sorted((d, uid) for d in DESTINATIONS for uid in on_disk)


def test_an_incomplete_slide_says_what_was_read_as_glass(node: Node):
    image = tissue_image()[0]
    node.slide = FakeSlide(image, 0.0005, missing=frozenset({(1, 3, 3), (1, 3, 4)}))  # under the tissue
    _run_one(_scheduler(node))

    job = _job(node)
    assert job.state == JobState.DONE
    (finished,) = _events(node, Event.JOB_FINISHED)
    assert finished.details["notes"][-1] == (
        "The slide arrived incomplete (2 frame(s) missing (fake)); 2 missing frame(s) the analysis "
        "needed were read as glass and not analysed."
    )


def test_a_slide_unlike_the_training_slides_is_recorded_as_out_of_distribution(node: Node):
    from glio_node.ood import OodGate, fit_reference
    from glio_node.testing import colour_features

    image, tissue = tissue_image()
    pixels = image[tissue][:, [2, 0, 1]]  # the bundle was "trained" on another stain
    tiles = pixels[np.random.default_rng(0).integers(0, len(pixels), (64, 64))].reshape(64, 8, 8, 3)
    reference = fit_reference(colour_features(tiles), 2)
    _run_one(_scheduler(node, FakeSegmenter(), FakeClassifier(features=True), ood=OodGate("fake-mgmt", reference, 2.0, 0.5)))

    assert _job(node).state == JobState.DONE
    (finished,) = _events(node, Event.JOB_FINISHED)
    assert finished.details["ood"]["out_of_distribution"] and finished.details["ood"]["network"] == "fake-mgmt"
    assert "every call is indeterminate (out of distribution)" in finished.details["notes"][-1]


class _Refusing(FakeSegmenter):
    def predict(self, tiles: np.ndarray):
        raise BadInput("tile values out of range: re-scan the slide")


class _Crashing(FakeSegmenter):
    def predict(self, tiles: np.ndarray):
        raise RuntimeError("device lost")


def test_bad_input_fails_the_job_for_good_with_the_operators_message(node: Node):
    _run_one(_scheduler(node, _Refusing(), FakeClassifier()))

    job = _job(node)
    assert job.state == JobState.FAILED and job.last_error == "tile values out of range: re-scan the slide"
    assert node.slide.closed
    assert _events(node, Event.OBJECTS_CREATED) == []
    with node.sessions() as session:
        assert session.scalars(select(Delivery)).all() == []


def test_any_other_error_is_retried_later(node: Node):
    _run_one(_scheduler(node, _Crashing(), FakeClassifier()))

    job = _job(node)
    assert job.state == JobState.WAITING and job.attempts == 1
    assert job.last_error == "RuntimeError: device lost"
    assert job.not_before is not None and node.slide.closed
    assert _events(node, Event.OBJECTS_CREATED) == []
