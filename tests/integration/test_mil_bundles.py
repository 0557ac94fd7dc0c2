"""Two-stage bundles through ``glio-node analyze``: a tiny Keras encoder (or the same encoder
exported to ONNX) and ABMIL heads with random weights, written by ``write_bundle`` in the test.

The hospital's story: a bundle of a tile encoder and attention-MIL heads analyses a slide; each
head's call is in the SR with its attention map referenced from the call, the attention maps are
integer Parametric Maps in the source's study, everything passes dciodvfy and reads back with
highdicom; fold models that disagree make the call indeterminate, with the spread reported in the
SR and in ``--json``; folds that agree give a call.  A research group's bundle of only an encoder
and its heads (Keras or ONNX heads, the ONNX ones with a dynamic bag) analyses the slide too: SR
and attention maps, no SEG.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ParametricMapStorage

import two_stage
from dciodvfy import assert_valid
from sr_content import content_items

from glio_node import coding
from glio_node.bundle import TensorSpec, load_manifest, write_bundle

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
pytestmark = [pytest.mark.slow, pytest.mark.needs("dciodvfy")]


def _analyze(bundle: Path, slide, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "glio_node.cli", "analyze", *map(str, slide.files), "--out", str(out),
         "--models", str(bundle), "--device", "cpu", "--json"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)



def _call_group(sr, head_code: str):
    """The TID 1501 group whose finding is the head concept ``head_code`` (the call)."""
    for group in content_items(sr):
        items = list(getattr(group, "ContentSequence", []))
        if any(i.ConceptNameCodeSequence[0].CodeMeaning == "Finding" and i.ConceptCodeSequence[0].CodeValue == head_code
               for i in items if i.ValueType == "CODE"):
            return items
    raise AssertionError(f"no call group for {head_code}")


@pytest.fixture(scope="module")
def disagreeing(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mil") / "two-stage"
    two_stage.write_two_stage_bundle(out, fold_models=two_stage.disagreeing_folds(), max_fold_spread=0.5)
    return out


def test_a_two_stage_bundle_writes_calls_and_attention_maps_that_pass_dciodvfy(disagreeing, small_slide, tmp_path):
    summary = _analyze(disagreeing, small_slide, tmp_path / "out")
    for f in summary["files"]:
        assert_valid(Path(f))
    encoder = next(n for n in summary["stats"]["networks"] if n["name"] == "encoder")
    assert 0 < encoder["tiles_inferred"] == encoder["tiles_with_tissue"] < encoder["tiles_total"]
    assert summary["stats"]["decode_amplification"] == 1.0

    # fold ensemble: the two folds disagree (one says class 0, the other class 1, both ~certain)
    assert summary["calls"]["egfr"] == "indeterminate"
    egfr = summary["aggregated"]["egfr"]
    assert egfr["folds"] == 2 and egfr["fold_spread"] > 0.9 and egfr["max_fold_spread"] == 0.5
    assert egfr["indeterminate_reason"] == "fold_disagreement"
    assert summary["calls"]["mgmt"] in {c.code_meaning for c in coding.MGMT_CLASSES}

    datasets = [pydicom.dcmread(f) for f in summary["files"]]
    source_study = str(pydicom.dcmread(small_slide.files[0], stop_before_pixels=True).StudyInstanceUID)
    assert {str(ds.StudyInstanceUID) for ds in datasets} == {source_study}  # in the source's study
    attention = {
        str(ds.SeriesNumber): ds for ds in datasets
        if ds.SOPClassUID == ParametricMapStorage and 9051 <= ds.SeriesNumber <= 9053
    }
    assert sorted(attention) == ["9052", "9053"]  # mgmt, egfr
    for ds in attention.values():
        pmap = hd.pm.ParametricMap.from_dataset(ds)
        mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "ATTNWEIGHT"
        stored = ds.pixel_array
        assert stored.dtype == np.uint16 and stored.max() == 65535  # the most attended tile
        # the real-world value is the weight: over the slide's tiles they sum to 1
        weights = stored.astype(np.float64) * float(mapping.RealWorldValueSlope)
        assert weights.sum() == pytest.approx(1.0, rel=0.02)
        assert pmap.SOPInstanceUID == ds.SOPInstanceUID

    (sr,) = [ds for ds in datasets if ds.Modality == "SR"]
    hd.sr.Comprehensive3DSR.from_dataset(sr)  # reads back
    for code, series in (("GLIO-EGFR", "9053"), ("GLIO-MGMT", "9052")):
        items = _call_group(sr, code)
        referenced = {
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"
        }
        assert attention[series].SOPInstanceUID in referenced  # the map is referenced from the call it explains
    egfr_items = _call_group(sr, "GLIO-EGFR")
    spread = [i for i in egfr_items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "FOLDSPREAD"]
    assert len(spread) == 1 and float(spread[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(egfr["fold_spread"], abs=1e-3)
    reasons = [i.ConceptCodeSequence[0].CodeValue for i in egfr_items
               if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "GLIO-INDREASON"]
    assert reasons == ["FOLDDISAGREE"]


def test_folds_that_agree_give_a_call_with_its_spread(tmp_path, small_slide):
    bundle = tmp_path / "agree"
    two_stage.write_two_stage_bundle(bundle, fold_models=two_stage.agreeing_folds(), max_fold_spread=0.5)
    summary = _analyze(bundle, small_slide, tmp_path / "out")
    assert summary["calls"]["egfr"] == coding.EGFR_CLASSES[1].code_meaning
    egfr = summary["aggregated"]["egfr"]
    assert egfr["indeterminate_reason"] is None and 0.0 < egfr["fold_spread"] < 0.05


def test_an_onnx_encoder_with_keras_heads_analyses_the_slide(tmp_path, small_slide):
    encoder = two_stage.build_encoder()
    graph = tmp_path / "encoder.onnx"
    output = two_stage.export_encoder_onnx(encoder, graph)
    bundle = tmp_path / "onnx-two-stage"
    spec = replace(two_stage.encoder_spec("onnx"), output=TensorSpec(output, ("batch", two_stage.EMBED_DIM), "float32"))
    networks = (two_stage.seg_spec(), spec, two_stage.aggregator_spec("egfr"), two_stage.aggregator_spec("mgmt"))
    write_bundle(bundle, two_stage.manifest(*networks), {
        "regions": two_stage.seg_model(), "encoder": graph,
        "egfr-abmil": two_stage.build_head(2, 11), "mgmt-abmil": two_stage.build_head(2, 12),
    })
    assert load_manifest(bundle).networks[1].runtime == "onnx"
    summary = _analyze(bundle, small_slide, tmp_path / "out")
    # the same encoder weights in Keras give the same calls
    keras_bundle = tmp_path / "keras-two-stage"
    two_stage.write_two_stage_bundle(keras_bundle, encoder=encoder)
    reference = _analyze(keras_bundle, small_slide, tmp_path / "out-keras")
    assert summary["calls"] == reference["calls"]
    for task in ("egfr", "mgmt"):
        assert summary["probabilities"][task] == pytest.approx(reference["probabilities"][task], abs=1e-4)
    for f in summary["files"]:
        assert_valid(Path(f))


# -- bundles without a segmentation network (issue 13): an encoder and its heads alone ----------


def _assert_results_without_regions(summary: dict, slide) -> list[pydicom.Dataset]:
    """What a bundle with no segmentation network must leave: SR + attention maps, no SEG, every
    file valid and read back by highdicom, all in the source's study and frame of reference, the
    calls referencing their attention maps, the SR without region areas, the GeoJSON the outline."""
    assert summary["region_area_fraction"] is None
    datasets = [pydicom.dcmread(f) for f in summary["files"]]
    for f in summary["files"]:
        assert_valid(Path(f))
    assert not [ds for ds in datasets if ds.Modality == "SEG"]
    source = pydicom.dcmread(slide.files[0], stop_before_pixels=True)
    assert {str(ds.StudyInstanceUID) for ds in datasets} == {str(source.StudyInstanceUID)}
    assert {str(ds.FrameOfReferenceUID) for ds in datasets if "FrameOfReferenceUID" in ds} == {str(source.FrameOfReferenceUID)}
    attention = {int(ds.SeriesNumber): ds for ds in datasets if ds.SOPClassUID == ParametricMapStorage and 9051 <= ds.SeriesNumber <= 9053}
    assert sorted(attention) == [9052, 9053]  # mgmt, egfr
    for ds in attention.values():
        assert hd.pm.ParametricMap.from_dataset(ds).SOPInstanceUID == ds.SOPInstanceUID
    (sr,) = [ds for ds in datasets if ds.Modality == "SR"]
    assert hd.sr.Comprehensive3DSR.from_dataset(sr).SOPInstanceUID == sr.SOPInstanceUID
    for code, series in (("GLIO-EGFR", 9053), ("GLIO-MGMT", 9052)):
        referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in _call_group(sr, code) if i.ValueType == "IMAGE"}
        assert attention[series].SOPInstanceUID in referenced
    numbers = {i.ConceptNameCodeSequence[0].CodeValue for i in content_items(sr) if i.ValueType == "NUM"}
    assert "AREAFRAC" not in numbers
    features = json.loads(Path(summary["geojson"]).read_text())["features"]
    names = [f["properties"]["name"] for f in features if f["properties"]["objectType"] == "annotation"]
    assert [n for n in names if not n.startswith("QC:")] == ["Tissue"]
    return datasets


def test_an_onnx_encoder_and_keras_abmil_heads_without_a_segmentation_network_analyse_the_slide(tmp_path, small_slide):
    graph = tmp_path / "encoder.onnx"
    output = two_stage.export_encoder_onnx(two_stage.build_encoder(), graph)
    spec = replace(two_stage.encoder_spec("onnx"), output=TensorSpec(output, ("batch", two_stage.EMBED_DIM), "float32"))
    networks = (spec, two_stage.aggregator_spec("egfr", folds=2, max_fold_spread=0.5), two_stage.aggregator_spec("mgmt"))
    bundle = tmp_path / "encoder-and-heads"
    write_bundle(bundle, two_stage.manifest(*networks), {
        "encoder": graph, "egfr-abmil": two_stage.agreeing_folds(), "mgmt-abmil": two_stage.build_head(2, 12),
    })
    verify = subprocess.run([sys.executable, "-m", "glio_node.cli", "models", "verify", str(bundle)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr[-2000:]
    assert "regions     none: no segmentation network, so no SEG" in verify.stdout
    summary = _analyze(bundle, small_slide, tmp_path / "out")
    _assert_results_without_regions(summary, small_slide)
    assert [n["name"] for n in summary["stats"]["networks"]] == ["encoder"]
    assert summary["calls"]["egfr"] == coding.EGFR_CLASSES[1].code_meaning  # the agreeing folds' class
    assert summary["aggregated"]["egfr"]["folds"] == 2


def test_onnx_aggregators_with_a_dynamic_bag_analyse_the_slide(tmp_path, small_slide):
    """Both ONNX aggregator forms on the same bag: egfr bag-only ([bag, D]), mgmt batched ([1, bag, D])."""
    import onnx
    import onnx_graphs

    d = two_stage.EMBED_DIM
    onnx.save(onnx_graphs.bag_attention_graph(d, 2, seed=3), tmp_path / "egfr.onnx")
    onnx.save(onnx_graphs.attention_graph(d, 2, seed=4), tmp_path / "mgmt.onnx")
    networks = (two_stage.encoder_spec(), two_stage.onnx_aggregator_spec("egfr", batched=False), two_stage.onnx_aggregator_spec("mgmt"))
    bundle = tmp_path / "onnx-heads"
    write_bundle(bundle, two_stage.manifest(*networks), {
        "encoder": two_stage.build_encoder(), "egfr-abmil": tmp_path / "egfr.onnx", "mgmt-abmil": tmp_path / "mgmt.onnx",
    })
    summary = _analyze(bundle, small_slide, tmp_path / "out")
    datasets = _assert_results_without_regions(summary, small_slide)
    for task in ("egfr", "mgmt"):
        assert sum(summary["probabilities"][task].values()) == pytest.approx(1.0, abs=1e-4)
    for ds in (ds for ds in datasets if ds.SOPClassUID == ParametricMapStorage and ds.SeriesNumber in (9052, 9053)):
        mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        weights = ds.pixel_array.astype(np.float64) * float(mapping.RealWorldValueSlope)
        assert weights.sum() == pytest.approx(1.0, rel=0.02)  # softmax over the whole bag
