"""``glio-node serve`` with a two-stage bundle: an ONNX tile encoder and ABMIL heads (Keras, one
with two fold models), storescu -> the node -> Orthanc.

The bundle is built in the test (tests/two_stage.py: a tiny encoder exported to ONNX by the
project's export route, random ABMIL weights): the path a hospital's foundation-model encoder
and its STAMP-style heads take in production: scheduler, BundleCache, ONNX Runtime and Keras,
the bag, the writers, the sender.  The attention maps arrive in the slide's study in Orthanc,
and Orthanc's DICOMweb serves them as the viewer's heatmap path reads them (series metadata).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from node_process import BUNDLE, assert_results_in_orthanc, wait_for

import two_stage
from glio_node.bundle import TensorSpec, write_bundle
from glio_node.store.models import JobState

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs("orthanc", "orthanc-dicomweb", "storescu"),
]
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


def _bundle(folder: Path, regions: bool) -> Path:
    """The tiny encoder exported to ONNX, egfr (two agreeing folds) and mgmt ABMIL heads, and a
    segmentation network beside them when ``regions``."""
    graph = folder / "encoder.onnx"
    output = two_stage.export_encoder_onnx(two_stage.build_encoder(), graph)
    encoder = replace(two_stage.encoder_spec("onnx"), output=TensorSpec(output, ("batch", two_stage.EMBED_DIM), "float32"))
    networks = (*((two_stage.seg_spec(),) if regions else ()), encoder,
                two_stage.aggregator_spec("egfr", folds=2, max_fold_spread=0.5), two_stage.aggregator_spec("mgmt"))
    out = folder / "two-stage"
    write_bundle(out, two_stage.manifest(*networks), {
        **({"regions": two_stage.seg_model()} if regions else {}), "encoder": graph,
        "egfr-abmil": two_stage.agreeing_folds(), "mgmt-abmil": two_stage.build_head(2, 12),
    })
    return out


@pytest.fixture(scope="module")
def two_stage_bundle(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("mil-serve"), regions=True)


@pytest.fixture(scope="module")
def encoder_and_heads_bundle(tmp_path_factory) -> Path:
    """A research group's bundle: the encoder and its heads, no segmentation network."""
    return _bundle(tmp_path_factory.mktemp("mil-serve-noseg"), regions=False)


def _serve(orthanc, make_node, slide, bundle: Path, regions: bool):
    node = make_node(orthanc.dicom_port)
    node.config.write_text(node.config.read_text().replace(f'dir = "{BUNDLE}"', f'dir = "{bundle}"'))
    assert str(bundle) in node.config.read_text()
    node.start()
    node.send(slide)
    wait_for(node.all_delivered, 120, "the results to be delivered", node)
    assert_results_in_orthanc(orthanc, node, slide, regions=regions)
    [job] = node.jobs()
    assert job.state == JobState.DONE and job.bundle_name == "two-stage"
    assert node.stop() == 0
    return node


def test_a_slide_analysed_by_an_onnx_encoder_and_abmil_heads_comes_back_to_orthanc(orthanc, make_node, slide, two_stage_bundle):
    _serve(orthanc, make_node, slide, two_stage_bundle, regions=True)
    series = orthanc.series_of_study(slide.study_instance_uid)
    attention = {s["MainDicomTags"].get("SeriesNumber"): s["MainDicomTags"]["SeriesInstanceUID"] for s in series
                 if s["MainDicomTags"].get("SeriesNumber") in ("9052", "9053")}
    assert sorted(attention) == ["9052", "9053"]  # the MGMT and EGFR attention maps, in the slide's study
    for series_uid in attention.values():  # what the viewer's heatmap path fetches: the series' metadata
        metadata = orthanc.get(f"/dicom-web/studies/{slide.study_instance_uid}/series/{series_uid}/metadata")
        assert [m["00080016"]["Value"][0] for m in metadata] == [PARAMETRIC_MAP]
        mapping = metadata[0]["52009229"]["Value"][0]["00409096"]["Value"][0]  # Shared FG -> Real World Value Mapping
        assert mapping["00409210"]["Value"] == ["attention"]


def test_a_bundle_of_only_an_encoder_and_heads_sends_its_report_and_attention_maps_but_no_seg(
    orthanc, make_node, slide, encoder_and_heads_bundle
):
    node = _serve(orthanc, make_node, slide, encoder_and_heads_bundle, regions=False)
    series = orthanc.series_of_study(slide.study_instance_uid)
    numbers = sorted(s["MainDicomTags"].get("SeriesNumber") for s in series)
    assert "9001" not in numbers and {"9002", "9052", "9053"} <= set(numbers)  # no SEG; the SR and both attention maps
    assert {d.sop_class_uid for d in node.deliveries()} >= {PARAMETRIC_MAP}
