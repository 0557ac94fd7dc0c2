"""A job that fails is failed for good only when the slide is at fault.

A node has the demo bundle and a SQLite queue; a slide is in its spool as the receiver leaves it.
When a frame's bytes are corrupt the job fails at once, telling the operator to re-send the
series; when decoding good bytes hits a bug (a decoder raising TypeError, injected here), the
job is retried and reported as an internal error, and runs through once the bug is gone.
"""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from glio_node.config import Settings, StorageSettings, WorkerSettings
from glio_node.receive.spool import Spool
from glio_node.runtime.slide_reader import DicomSlide
from glio_node.scheduler import NodeScheduler
from glio_node.store import queue
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.instances import ReceivedInstance, record_instance
from glio_node.store.models import Job, JobState

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "glio-demo"


@pytest.fixture
def node(tmp_path):
    url = f"sqlite:///{tmp_path / 'glio.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    settings = Settings(
        storage=StorageSettings(spool_dir=tmp_path / "spool", database_url=url, min_free_bytes=0),
        worker=WorkerSettings(device="cpu", max_attempts=3),
    )
    spool = Spool(tmp_path / "spool")
    yield NodeScheduler(settings, sessions, spool, BUNDLE, owner="test-node:1:abc")
    engine.dispose()


def receive(node: NodeScheduler, files: list[Path], tmp: Path) -> None:
    """What the receiver does for each C-STORE (durable file, instance row), ten minutes ago, so
    the series is quiet and the sweep queues it."""
    at = datetime.now(UTC) - timedelta(minutes=10)
    for source in files:
        copy = tmp / source.name
        shutil.copy2(source, copy)
        ds = pydicom.dcmread(copy, stop_before_pixels=True)
        stored = node.spool.store(copy, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        with node.sessions.begin() as session:
            record_instance(session, ReceivedInstance(
                sop_instance_uid=ds.SOPInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                study_instance_uid=ds.StudyInstanceUID, sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(stored.path),
                size_bytes=stored.size_bytes, sha256=stored.sha256, calling_ae="SCANNER",
                address="127.0.0.1:4242", accession_number=None,
            ), at)
    node.sweep_series()


def run_next(node: NodeScheduler, at: datetime) -> Job:
    """Claim the next job (as dispatch does), run it with the real pipeline, return its row."""
    with node.sessions.begin() as session:
        job = queue.claim_job(session, node.owner, 300, at)
    assert job is not None, "no claimable job"
    node.run_claimed(job)
    with node.sessions.begin() as session:
        return session.scalars(select(Job).where(Job.id == job.id)).one()


def test_corrupt_frames_fail_the_job_at_once_asking_for_the_series_again(node, malformed_inputs, tmp_path):
    receive(node, sorted(malformed_inputs["garbage_jpeg"].rglob("*.dcm")), tmp_path)
    job = run_next(node, datetime.now(UTC))
    assert job.state == JobState.FAILED and job.attempts == 1
    assert "truncated or corrupt, re-send the series" in job.last_error


def test_a_decoder_bug_is_retried_as_an_internal_error_and_the_job_runs_once_it_is_fixed(
    node, small_slide, tmp_path, monkeypatch, caplog
):
    receive(node, small_slide.files, tmp_path)
    with DicomSlide.open(small_slide.files) as slide:
        decoder = type(slide._image_data[0].decoder)

    def broken(self, frame):
        raise TypeError("decode() takes 2 positional arguments but 3 were given")

    monkeypatch.setattr(decoder, "decode", broken)
    with caplog.at_level(logging.INFO, logger="glio_node.scheduler"):
        job = run_next(node, datetime.now(UTC))
    assert job.state == JobState.WAITING and job.attempts == 1  # retried, with backoff
    assert job.last_error.startswith("TypeError: decode() takes")
    assert "re-send" not in job.last_error
    assert "unexpected error" in caplog.text and "will be retried" in caplog.text
    assert "not a data error" in caplog.text  # the traceback's note

    monkeypatch.undo()  # the fix is deployed
    job = run_next(node, datetime.now(UTC) + timedelta(minutes=5))  # past the backoff
    assert job.state == JobState.DONE and job.attempts == 2
