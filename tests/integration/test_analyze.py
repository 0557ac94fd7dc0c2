"""A pathologist's slide goes in, DICOM results a viewer opens come out — or a clear refusal.

End to end through the real parts: slides on disk (ours and third-party converters'), wsidicom,
the shipped demo bundle on TensorFlow, highdicom writers, dciodvfy on every output.  The demo
model was trained on the same synthetic textures, so its answers can be checked against the
truth each slide was painted from: that is what catches misplaced tiles, swapped axes or a
wrong level, which a "file was written" test would not.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from dciodvfy import assert_valid
from slides import SMALL

from glio_node.bundle import load_bundle
from glio_node.cli import main
from glio_node.pipeline.analyze import AnalysisOptions, analyze
from glio_node.results import NOT_TISSUE
from glio_node.runtime.keras_runner import bundle_networks, select_device
from glio_node.runtime.slide_reader import DicomSlide
from glio_node.synthetic.slide import SlideSpec
from glio_node.synthetic.textures import Signature

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "glio-demo"
pytestmark = pytest.mark.slow

# Big enough for several tiles of both networks, small enough for seconds.
SLIDE = SlideSpec(width_px=2048, height_px=1536, um_per_px=0.5, levels=3, seed=11,
                  signature=Signature(subtype=1, mgmt_methylated=True, egfr_amplified=False))


@pytest.fixture(scope="module")
def demo():
    select_device("cpu")
    bundle = load_bundle(DEMO)
    return bundle, bundle_networks(bundle, batch_size=8)


def _analyse(demo, files):
    bundle, networks = demo
    with DicomSlide.open(files) as slide:
        return analyze(slide, networks, bundle.algorithm, AnalysisOptions(batch_size=8))


def _region_accuracy(result, truth_at) -> float:
    """Pixel accuracy of the label map against the painted truth, over true tissue."""
    raster = result.label_map
    truth = truth_at(raster.mm_per_px * 1000)
    rows, cols = min(truth.shape[0], raster.array.shape[0]), min(truth.shape[1], raster.array.shape[1])
    truth, got = truth[:rows, :cols], raster.array[:rows, :cols]
    inside = truth != NOT_TISSUE
    return float((got[inside] == truth[inside]).mean())


def test_analyze_writes_seg_sr_heatmaps_and_ann_that_validate_and_a_qupath_geojson(slide_cache, tmp_path, capsys):
    slide = slide_cache.slide(SLIDE)
    out = tmp_path / "results"
    assert main(["analyze", str(slide.files[0].parent), "--out", str(out), "--models", str(DEMO), "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    files = [Path(f) for f in summary["files"]]
    kinds = {}
    for f in files:
        ds = pydicom.dcmread(f)
        kinds.setdefault(ds.Modality, []).append(ds)
        assert ds.StudyInstanceUID == slide.study_instance_uid
        assert "research use only" in ds.SeriesDescription.lower()
        assert_valid(f)
    assert set(kinds) == {"SEG", "SR", "OT", "ANN"}
    assert Path(summary["geojson"]).parent == out and Path(summary["geojson"]).suffix == ".geojson"
    seg = hd.seg.segread(next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SEG"))
    assert len(seg.SegmentSequence) == 10
    assert seg.FrameOfReferenceUID == slide.frame_of_reference_uid
    # 4 subtype + 2 MGMT + 2 EGFR probability maps, and the demo's out-of-distribution map (9050)
    assert sorted(int(ds.SeriesNumber) for ds in kinds["OT"]) == [9010, 9011, 9012, 9013, 9020, 9021, 9030, 9031, 9050]
    stats = summary["stats"]
    assert stats["decode_amplification"] == 1.0
    for net in stats["networks"]:
        assert net["tiles_inferred"] == net["tiles_with_tissue"] > 0
    assert summary["calls"] == {"subtype": "Mesenchymal subtype", "mgmt": "MGMT promoter methylated", "egfr": "EGFR not amplified"}
    # A clean synthetic slide passes slide QC; the verdict is in the summary and the SR.
    assert summary["qc"]["verdict"] == "pass" and summary["qc"]["reasons"] == []
    sr = hd.sr.srread(next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SR"))
    verdicts = [
        e.value.value
        for g in sr.content.get_image_measurement_groups()
        for e in g.get_qualitative_evaluations()
        if e.name.value == "GLIO-QC"
    ]
    assert verdicts == ["GLIO-QC-PASS"]


def test_the_demo_model_finds_the_painted_regions_and_labels(slide_cache, demo):
    slide = slide_cache.slide(SLIDE)
    result, stats, _ = _analyse(demo, slide.files)
    assert _region_accuracy(result, slide.truth_labels) >= 0.85
    calls = {c.task: c.call.name if c.call else None for c in result.calls}
    assert calls == {"subtype": "mesenchymal", "mgmt": "methylated", "egfr": "not_amplified"}
    truth_tissue = slide.truth_tissue(8.0).mean() * SLIDE.width_px * SLIDE.height_px * (SLIDE.um_per_px / 1000) ** 2
    assert result.tissue_area_mm2 == pytest.approx(truth_tissue, rel=0.05)


def test_a_level_far_from_the_model_spacing_is_read_finer_and_downsampled(slide_cache, demo):
    """Levels at 0.25 and 0.5 µm/px only: the 2 µm/px network reads 0.5 and downsamples x4."""
    spec = replace(SLIDE, width_px=4096, height_px=3072, um_per_px=0.25, levels=2, transfer_syntax="jpeg2000",
                   dimension_organization="TILED_SPARSE", shuffle_frames=True, signature=Signature(3, False, True))
    slide = slide_cache.slide(spec)
    result, stats, _ = _analyse(demo, slide.files)
    seg = next(n for n in stats.networks if n.name == "regions")
    assert (seg.level, seg.scale) == (1, 4.0)
    assert result.label_map.mm_per_px == pytest.approx(0.002)
    assert _region_accuracy(result, slide.truth_labels) >= 0.85
    calls = {c.task: c.call.name if c.call else None for c in result.calls}
    assert calls == {"subtype": "proneural", "mgmt": "unmethylated", "egfr": "amplified"}
    assert stats.frames_decoded == stats.frames_needed


@pytest.mark.parametrize("fixture", ["orthanc_slide", "wsidicomizer_slide"])
def test_slides_from_third_party_converters_are_analysed_as_well(request, demo, tmp_path, fixture):
    converted = request.getfixturevalue(fixture)
    result, stats, level = _analyse(demo, [converted.folder])
    assert _region_accuracy(result, converted.truth_labels) >= 0.8
    calls = {c.task: c.call.name if c.call else None for c in result.calls}
    assert calls == {"subtype": "classical", "mgmt": "unmethylated", "egfr": "not_amplified"}
    from glio_node.writers import write_results

    written = write_results(list(level.headers), result, tmp_path)
    for path in written.paths:
        assert_valid(path)


def test_a_converter_pyramid_without_the_model_spacing_gives_a_label_map_of_the_slides_size(orthanc_slide, demo, tmp_path):
    """OrthancWSIDicomizer stores 0.5 µm/px as 0.000500000024 mm.  Without its 2 µm/px level the
    regions are read from the 1 µm/px level at scale 1.99999990: the label map must still cover
    the slide's 1024 µm with 512 px of 2 µm (it had 513 before the raster size was snapped)."""
    kept = tmp_path / "no-2um-level"
    kept.mkdir()
    for f in orthanc_slide.files:
        if pydicom.dcmread(f, stop_before_pixels=True).TotalPixelMatrixRows != 512:
            shutil.copy(f, kept / f.name)
    result, _, _ = _analyse(demo, [kept])
    assert result.label_map.mm_per_px == pytest.approx(0.002, rel=1e-6)
    assert result.label_map.array.shape[:2] == (512, 512)
    assert _region_accuracy(result, orthanc_slide.truth_labels) >= 0.8


REFUSALS = {
    "non_wsi": "not a VL Whole Slide Microscopy image",
    "mixed_series": "belong to 2 series",
    "no_pixel_spacing": "no PixelSpacing",
    "missing_frames": "of its .* frames",
    "truncated": "truncated or corrupt",
    "garbage_jpeg": "truncated or corrupt",
    "empty": "no files found",
    "non_dicom": "not a DICOM file",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_input_exits_2_with_one_line_saying_what_to_do(malformed_inputs, tmp_path, capsys, case):
    code = main(["analyze", str(malformed_inputs[case]), "--out", str(tmp_path), "--models", str(DEMO), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("glio-node: error: ")
    import re

    assert re.search(REFUSALS[case], err[0])


def test_the_installed_command_refuses_a_non_wsi_file(malformed_inputs, tmp_path):
    """The real entry point, as an operator runs it: exit 2, no traceback."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "glio-node"), "analyze", str(malformed_inputs["non_wsi"]), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not a VL Whole Slide Microscopy image" in proc.stderr


def test_a_bundle_that_does_not_verify_is_refused(slide_cache, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO, bundle)
    weights = next(bundle.glob("*.keras"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    slide = slide_cache.slide(SMALL)
    code = main(["analyze", *map(str, slide.files), "--out", str(tmp_path / "out"), "--models", str(bundle), "--device", "cpu"])
    assert code == 2
    assert "SHA-256" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_asking_for_a_gpu_where_there_is_none_is_refused(slide_cache, tmp_path):
    """Run where no GPU is visible (CUDA_VISIBLE_DEVICES empty), so it also holds on a GPU machine."""
    import os

    slide = slide_cache.slide(SMALL)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "glio_node.cli", "analyze", *map(str, slide.files), "--out", str(tmp_path / "out"),
         "--models", str(DEMO), "--device", "gpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "sees no GPU" in done.stderr
    assert not (tmp_path / "out").exists()


def test_analyze_takes_qc_thresholds_from_the_config_and_can_skip_qc(slide_cache, tmp_path, capsys):
    slide = slide_cache.slide(SLIDE)
    config = tmp_path / "node.toml"
    config.write_text("[qc]\nmin_tissue_mm2 = 100\n")  # more tissue than any slide here has
    base = ["analyze", str(slide.files[0].parent), "--models", str(DEMO), "--device", "cpu", "--json"]
    assert main([*base, "--out", str(tmp_path / "strict"), "--config", str(config)]) == 0
    strict = json.loads(capsys.readouterr().out)
    assert strict["qc"]["verdict"] == "fail"
    assert [r["code"] for r in strict["qc"]["reasons"]] == ["GLIO-QC-LOWTISS"]
    assert set(strict["calls"].values()) == {"indeterminate"}
    assert main([*base, "--out", str(tmp_path / "off"), "--no-qc"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert off["qc"] is None and "indeterminate" not in off["calls"].values()
