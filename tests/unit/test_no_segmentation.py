"""A bundle without a segmentation network (an encoder and an attention-MIL head, the common
STAMP/TRIDENT case, or tile classifiers alone), through ``job.run_job`` on the numpy fakes and the
real writers.

The research group's story: their bundle has no network that draws regions, yet the slide is
analysed: tissue and QC as always, the head's call and its attention map, an SR that is a valid
TID 1500 report without region areas, a GeoJSON with the tissue outline, and no SEG anywhere.
"""

from __future__ import annotations

import json

import dciodvfy
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ParametricMapStorage, SegmentationStorage

from glio_node.job import run_job
from glio_node.pipeline.analyze import AnalysisOptions
from glio_node.results import AnalysisResult, Raster
from glio_node.testing import FAKE_ALGORITHM, FakeAggregator, FakeEncoder, FakeSlide, fake_models, fake_slide_opener, tissue_image

MM_PER_PX = 0.0005


def _items(ds):
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _items(item)


@pytest.fixture
def slide() -> FakeSlide:
    return FakeSlide(tissue_image()[0], MM_PER_PX)


def test_an_encoder_and_a_mil_head_alone_write_a_report_and_an_attention_map_but_no_seg(slide, tmp_path):
    encoder, head = FakeEncoder(tile_size=16), FakeAggregator()
    summary = run_job(
        [tmp_path / "slide.dcm"], tmp_path / "out", tmp_path / "bundle", options=AnalysisOptions(batch_size=4),
        open_slide=fake_slide_opener(slide), load_models=fake_models(encoder, algorithm=FAKE_ALGORITHM, aggregators=(head,)),
    )
    assert summary.region_area_fraction is None and summary.to_dict()["region_area_fraction"] is None
    assert len(head.bags) == 1 and summary.calls.keys() == {"mgmt"} and summary.qc is not None
    kinds = sorted(o.kind for o in summary.objects)
    assert "seg" not in kinds and kinds.count("sr") == 1 and kinds.count("attention") == 1

    datasets = [pydicom.dcmread(o.path) for o in summary.objects]
    source = slide.levels[2].headers[0]  # the encoder's level (2 µm/px): the outputs' source
    assert {ds.SOPClassUID for ds in datasets}.isdisjoint({SegmentationStorage})
    assert {str(ds.StudyInstanceUID) for ds in datasets} == {str(source.StudyInstanceUID)}
    (sr,) = [ds for ds in datasets if ds.Modality == "SR"]
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    assert report.SOPInstanceUID == sr.SOPInstanceUID
    names = {i.ConceptNameCodeSequence[0].CodeValue for i in _items(sr) if i.ValueType == "NUM"}
    assert "AREAFRAC" not in names  # no region areas without regions
    evidence = {
        r.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence
    }
    assert str(source.SOPInstanceUID) in evidence
    (attention,) = [ds for ds in datasets if ds.SOPClassUID == ParametricMapStorage]
    assert attention.FrameOfReferenceUID == source.FrameOfReferenceUID and attention.SeriesNumber == 9052
    referenced = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in _items(sr) if i.ValueType == "IMAGE"
    }
    assert attention.SOPInstanceUID in referenced  # the map is referenced from the call it explains
    for o in summary.objects:
        dciodvfy.assert_valid(o.path)

    geojson = json.loads(open(summary.geojson).read())
    annotations = [f for f in geojson["features"] if f["properties"]["objectType"] == "annotation"]
    assert [f["properties"]["name"] for f in annotations if not f["properties"]["name"].startswith("QC")] == ["Tissue"]
    outline_mm2 = annotations[0]["properties"]["measurements"]["Area mm^2"]
    assert outline_mm2 == pytest.approx(summary.tissue_area_mm2, rel=0.05)


def test_regions_come_together_or_not_at_all():
    with pytest.raises(ValueError, match="label_map, region_area_fraction and region_classes come together"):
        AnalysisResult(
            algorithm=FAKE_ALGORITHM, region_classes=(), label_map=Raster(np.zeros((4, 4), np.uint8), 0.001),
            tissue_area_mm2=0.0, region_area_fraction=None, heatmaps=(), calls=(),
        )
