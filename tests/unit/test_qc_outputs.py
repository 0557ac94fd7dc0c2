"""Where a slide's QC verdict shows up: the SR, the job's JSON summary, the store and the status page.

A slide with a pen stroke across its tissue goes through the real job loop (scheduler, run_job,
writers, SQLite store) on the numpy fakes; the operator then sees "warn" and "Pen mark ... mm²"
on the status page, the SR carries the coded verdict and the pen mark's area, and a slide that
fails QC has every call indeterminate with the coded reason, in a valid SR.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import shapely
import shapely.geometry
from fastapi.testclient import TestClient
from pydicom.sr.codedict import codes
from sqlalchemy import select

from glio_node.coding import QC_ARTEFACTS, QC_LOW_TISSUE, QC_VERDICTS
from glio_node.config import Destination, Settings, StatusSettings, StorageSettings, WorkerSettings
from glio_node.job import run_job
from glio_node.pipeline.qc import PEN
from glio_node.receive.spool import Spool
from glio_node.results import QcFinding, QcReport, Raster
from glio_node.scheduler import NodeScheduler
from glio_node.store import queue
from glio_node.store.audit import Event
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.instances import ReceivedInstance, record_instance
from glio_node.store.models import AuditEvent, Job, JobState
from glio_node.testing import FakeClassifier, FakeSegmenter, FakeSlide, fake_models, fake_slide_opener
from glio_node.web.app import create_app
from glio_node.web.health import NodeContext
from glio_node.writers import write_results
from test_qc import he_tissue  # tests/unit is on sys.path (pytest's rootdir-relative import)
from test_writers import dciodvfy, make_result, make_source, needs_dciodvfy

TOKEN = "a-token-for-the-qc-status-tests"
QC_CODE = hd.sr.CodedConcept("GLIO-QC", "99GLIO", "Slide quality control")


def _sr_groups(path: Path):
    sr = hd.sr.srread(path)
    return sr.content.get_image_measurement_groups()


def failed_report() -> QcReport:
    art = np.zeros((20, 30), np.uint8)
    art[2:8, 2:20] = PEN
    return QcReport(
        verdict="fail",
        findings=(
            QcFinding(QC_ARTEFACTS[PEN - 1], 0.0069, "warn"),
            QcFinding(QC_LOW_TISSUE, 0.0054, "fail"),
        ),
        artefact_classes=QC_ARTEFACTS,
        artefact_map=Raster(art, 0.008),
        usable_tissue_mm2=0.0054,
        tiles_assessed_for_focus=4,
    )


def test_a_failed_slide_sr_says_fail_why_and_that_each_call_is_indeterminate_for_it(tmp_path):
    result = make_result()
    fail = QC_VERDICTS["fail"]
    result = replace(
        result,
        qc=failed_report(),
        calls=tuple(replace(c, call=None, indeterminate_reason=fail) for c in result.calls),
    )
    objects = write_results([make_source()], result, tmp_path)
    sr_path = objects.of_kind("sr")[0].path
    groups = _sr_groups(sr_path)

    (verdict_group,) = [g for g in groups if g.finding_type == QC_CODE]
    evaluations = verdict_group.get_qualitative_evaluations()
    assert [e.value.value for e in evaluations if e.name == QC_CODE] == ["GLIO-QC-FAIL"]
    reasons = [e.value.value for e in evaluations if e.name.value == "GLIO-QC-REASON"]
    assert reasons == ["GLIO-QC-PEN", "GLIO-QC-LOWTISS"]
    (usable,) = verdict_group.get_measurements(name=codes.SCT.Area)
    assert usable.value == pytest.approx(0.0054) and usable.unit.value == "mm2"
    (pen,) = [g for g in groups if g.finding_type.value == "GLIO-QC-PEN"]
    assert pen.get_measurements(name=codes.SCT.Area)[0].value == pytest.approx(0.0069)

    for task in ("GLIO-SUBTYPE", "GLIO-MGMT", "GLIO-EGFR"):
        (call,) = [g for g in groups if g.finding_type.value == task]
        values = {e.name.value: e.value.value for e in call.get_qualitative_evaluations()}
        assert (values[task], values["GLIO-INDREASON"]) == ("82334004", "GLIO-QC-FAIL")
    if dciodvfy.DCIODVFY:
        dciodvfy.assert_valid(sr_path)


@needs_dciodvfy
def test_the_qc_groups_pass_dciodvfy(tmp_path):

    result = replace(make_result(), qc=failed_report())
    dciodvfy.assert_valid(write_results([make_source()], result, tmp_path).of_kind("sr")[0].path)


# -- the job loop: store and status page ------------------------------------------------------


@pytest.fixture
def pen_marked_slide() -> FakeSlide:
    """0.59 mm² of H&E-like tissue at 0.5 µm/px with a green pen stroke across it."""
    image = np.full((1536, 1536, 3), 242, np.uint8)
    image[64:1472, 64:1472] = he_tissue(1408, 1408, 0.5, seed=5)
    image[1000:1200, 300:1300] = (40, 150, 70)
    return FakeSlide(image, 0.0005, downsamples=(1, 2, 4, 8, 16), frame=128)


def test_a_pen_marked_slide_shows_warn_and_the_pen_mark_on_the_status_page(tmp_path, pen_marked_slide):
    url = f"sqlite:///{tmp_path / 'glio.db'}"
    upgrade(url)
    sessions = make_sessions(make_engine(url))
    spool = Spool(tmp_path / "spool")
    settings = Settings(
        storage=StorageSettings(spool_dir=tmp_path / "spool", database_url=url, min_free_bytes=0),
        destinations=(Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1),),
        worker=WorkerSettings(device="cpu"),
        status=StatusSettings(token=TOKEN),
    )
    header = pen_marked_slide.levels[0].headers[0]
    with sessions.begin() as session:
        record_instance(
            session,
            ReceivedInstance(
                sop_instance_uid=str(header.SOPInstanceUID), series_instance_uid=str(header.SeriesInstanceUID),
                study_instance_uid=str(header.StudyInstanceUID), sop_class_uid=str(header.SOPClassUID),
                transfer_syntax_uid="1.2.840.10008.1.2.1", path=str(spool.root / "level-0.dcm"), size_bytes=1,
                sha256="0" * 64, calling_ae="SCANNER", address="127.0.0.1:4242",
            ),
            datetime.now(UTC) - timedelta(minutes=5),
        )
        job_id = queue.enqueue_series(session, str(header.SeriesInstanceUID), max_attempts=3, now=datetime.now(UTC)).job_id
    runners = (FakeSegmenter(um_per_px=2.0), FakeClassifier(um_per_px=0.5, tile_size=160))
    run = partial(run_job, open_slide=fake_slide_opener(pen_marked_slide), load_models=fake_models(*runners))
    scheduler = NodeScheduler(settings, sessions, spool, spool.root / "no-bundle", owner="fake:1:a", run_job=run)
    scheduler.dispatch()
    assert scheduler.stop(grace_seconds=60)

    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.DONE
        assert job.qc["verdict"] == "warn"
        assert [r["code"] for r in job.qc["reasons"]] == ["GLIO-QC-PEN"]
        pen_mm2 = job.qc["reasons"][0]["area_mm2"]
        assert pen_mm2 == pytest.approx(200 * 1000 * 0.0005**2, rel=0.25)
        (finished,) = session.scalars(select(AuditEvent).where(AuditEvent.event == Event.JOB_FINISHED.value))
        assert finished.details["qc_verdict"] == "warn"

    with TestClient(create_app(settings, sessions, NodeContext(device="cpu"))) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        (row,) = client.get("/api/jobs").json()
        assert row["qc_verdict"] == "warn" and row["qc_reasons"] == [f"Pen mark {pen_mm2:.2f} mm²"]
        page = client.get("/").text
    assert '<span class="qc-warn">warn</span>' in page
    assert f'<div class="reason">Pen mark {pen_mm2:.2f} mm²</div>' in page


def test_the_summary_geojson_and_ann_carry_the_verdict_and_the_pen_mark(tmp_path, pen_marked_slide):
    runners = (FakeSegmenter(um_per_px=2.0), FakeClassifier(um_per_px=0.5, tile_size=160))
    summary = run_job(
        [tmp_path / "unused.dcm"], tmp_path / "out", tmp_path / "no-bundle",
        open_slide=fake_slide_opener(pen_marked_slide), load_models=fake_models(*runners),
    )
    qc = json.loads(json.dumps(summary.to_dict()))["qc"]
    assert qc["verdict"] == "warn"
    (reason,) = qc["reasons"]
    assert reason["code"] == "GLIO-QC-PEN" and reason["meaning"] == "Pen mark" and reason["severity"] == "warn"
    assert reason["area_mm2"] > 0 and qc["usable_tissue_mm2"] > 0.25
    assert any(n.startswith("Slide QC: warn (pen mark") for n in summary.notes)

    # QuPath: the verdict in the collection's properties, the pen mark as an annotation where it
    # was drawn (level-0 px: rows 1000-1200, columns 300-1300), with its area.
    collection = json.loads(Path(summary.geojson).read_text())
    assert collection["properties"]["slide_qc"] == qc
    (pen,) = [f for f in collection["features"] if f["properties"]["name"] == "QC: Pen mark"]
    assert pen["properties"]["objectType"] == "annotation"
    drawn = shapely.box(300, 1000, 1300, 1200)
    found = shapely.geometry.shape(pen["geometry"])
    assert found.is_valid and found.intersection(drawn).area / found.union(drawn).area >= 0.8
    assert pen["properties"]["measurements"]["Area mm^2"] == pytest.approx(reason["area_mm2"], rel=1e-3)

    # Slim: an ANN group coded GLIO-QC / GLIO-QC-PEN, as valid as the rest of the file.
    (ann_path,) = [Path(o.path) for o in summary.objects if o.kind == "ann"]
    ann = hd.ann.annread(ann_path)
    (group,) = [g for g in ann.get_annotation_groups() if g.annotated_property_type.value == "GLIO-QC-PEN"]
    assert group.annotated_property_category.value == "GLIO-QC"
    assert group.graphic_type == hd.ann.GraphicTypeValues.POLYGON and group.number_of_annotations >= 1
    _, areas, _ = group.get_measurements()
    assert areas.sum() == pytest.approx(reason["area_mm2"], rel=0.05)
    if dciodvfy.DCIODVFY:
        dciodvfy.assert_valid(ann_path)
