"""A research group's QuPath reads each job's GeoJSON from a shared folder the node fills.

The slide is made durable in a real spool and recorded as the receiver records it, swept into a
job by the real scheduler and analysed by the real pipeline with the demo bundle; then the
folder is looked at as QuPath (or a watcher) would: one whole file per slide, nothing half
written, and the audit trail says which file the job wrote.  A folder that cannot be written
does not lose the result: the job waits to be retried, with a reason the operator can act on.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from glio_node.config import GeoJSONSettings, Settings, StorageSettings, WorkerSettings
from glio_node.receive.spool import Spool
from glio_node.scheduler import NodeScheduler
from glio_node.store import queue
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.instances import ReceivedInstance, record_instance
from glio_node.store.models import AuditEvent, Job, JobState
from glio_node.synthetic.slide import SlideSpec, write_synthetic_slide

pytestmark = pytest.mark.slow  # the real pipeline, once per test

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "glio-demo"
SPEC = SlideSpec(width_px=1024, height_px=768, tile_size=256, levels=3, context_images=False, seed=31)


def _node(tmp_path: Path, folder: Path):
    url = f"sqlite:///{tmp_path / 'glio.db'}"
    upgrade(url)
    sessions = make_sessions(make_engine(url))
    spool = Spool(tmp_path / "spool")
    settings = Settings(
        storage=StorageSettings(spool_dir=tmp_path / "spool", database_url=url, min_free_bytes=0),
        worker=WorkerSettings(device="cpu", max_attempts=3),
        geojson=GeoJSONSettings(folder=str(folder)),
    )
    slide = write_synthetic_slide(SPEC, tmp_path / "slide")
    at = datetime.now(UTC) - timedelta(minutes=10)
    for source in slide.files:  # what the receiver does for each C-STORE
        copy = tmp_path / source.name
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
                    address="127.0.0.1:4242", accession_number=None,
                ),
                at,
            )
    scheduler = NodeScheduler(settings, sessions, spool, BUNDLE, owner="test-node:1:geo")
    scheduler.sweep_series()
    with sessions.begin() as session:
        job = queue.claim_job(session, scheduler.owner, 300, datetime.now(UTC))
    assert job is not None
    scheduler.run_claimed(job)
    return slide, sessions, spool, job


def test_each_job_puts_its_whole_geojson_into_the_configured_folder(tmp_path):
    folder = tmp_path / "qupath"
    slide, sessions, spool, job = _node(tmp_path, folder)
    [delivered] = folder.iterdir()  # one file, no temporary left beside it
    assert delivered.name == f"{slide.series_instance_uid}-glio-demo.geojson"
    results = spool.results_dir(job.study_instance_uid, job.series_instance_uid)
    assert delivered.read_bytes() == (results / delivered.name).read_bytes()
    collection = json.loads(delivered.read_text())
    assert collection["type"] == "FeatureCollection"
    assert collection["properties"]["series_instance_uid"] == slide.series_instance_uid
    with sessions.begin() as session:
        assert session.get(Job, job.id).state == JobState.DONE
        created = session.scalars(select(AuditEvent).where(AuditEvent.event == "objects_created")).one()
        assert created.details["geojson"] == delivered.name
        # The GeoJSON is not a DICOM object: it is not among the objects sent to destinations.
        assert all(o["sop_class_uid"].startswith("1.2.840.10008.") for o in created.details["objects"])


def test_a_folder_that_cannot_be_written_sends_the_job_back_to_be_retried(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    _, sessions, _, job = _node(tmp_path, blocked)
    with sessions.begin() as session:
        row = session.get(Job, job.id)
        assert row.state == JobState.WAITING
        assert f"[geojson] folder {blocked} cannot be written" in row.last_error
        assert "the job is retried" in row.last_error
