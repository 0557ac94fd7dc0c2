"""Slide QC: each classical detector finds the artefact painted on H&E-like tissue, and only it.

The tissue is glio_node.synthetic's procedural H&E texture; the artefacts are painted by the
tests themselves (a green stroke, a doubled layer, a round hole, a Gaussian blur), so where each
one is, is known exactly.  The real-tissue version of these checks is
tests/integration/test_qc_real_tissue.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from glio_node.pipeline.analyze import AnalysisOptions, analyze
from glio_node.pipeline.qc import (
    BLUR,
    BUBBLE,
    DARK,
    PEN,
    QcThresholds,
    focus_measure,
    lowres_artefacts,
    qc_report,
)
from glio_node.pipeline.tissue import TissueMask, detect_tissue
from glio_node.synthetic.textures import Signature, render
from glio_node.testing import FAKE_ALGORITHM, FakeClassifier, FakeSegmenter, FakeSlide

T = QcThresholds()


def he_tissue(rows: int, cols: int, um_per_px: float, seed: int = 0) -> np.ndarray:
    """H&E-like tissue over the whole patch (several region classes in bands)."""
    labels = (np.arange(cols)[None, :] * 4 // cols + np.zeros((rows, 1), int)).astype(np.uint8)
    return render(labels, 0.0, 0.0, um_per_px, Signature(subtype=1, mgmt_methylated=False, egfr_amplified=False), seed=seed)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def lowres() -> tuple[np.ndarray, TissueMask]:
    """8 µm/px: 4 x 4 mm of tissue in the middle of glass."""
    image = np.full((700, 700, 3), 242, np.uint8)
    image[100:600, 100:600] = he_tissue(500, 500, 8.0)
    return image, detect_tissue(image, 0.008)


def test_untouched_tissue_passes_with_no_artefact(lowres):
    image, tissue = lowres
    artefacts = lowres_artefacts(image, tissue, T)
    report = qc_report(artefacts, tissue, T, tiles_assessed_for_focus=0)
    assert not artefacts.any()
    assert report.verdict == "pass" and report.findings == ()
    assert report.usable_tissue_mm2 == pytest.approx(tissue.area_mm2)


def test_a_green_pen_stroke_on_tissue_is_a_pen_mark_and_only_it(lowres):
    image, tissue = lowres
    image = image.copy()
    stroke = np.zeros(image.shape[:2], bool)
    stroke[300:330, 150:450] = True
    image[stroke] = (40, 150, 70)  # green marker
    artefacts = lowres_artefacts(image, tissue, T)
    assert iou(artefacts == PEN, stroke) >= 0.8
    assert set(np.unique(artefacts)) == {0, PEN}
    report = qc_report(artefacts, tissue, T, 0)
    assert report.verdict == "warn"
    ((finding),) = report.findings
    assert finding.reason.code_value == "GLIO-QC-PEN"
    assert finding.area_mm2 == pytest.approx(stroke.sum() * 0.008**2, rel=0.2)


def test_dark_debris_and_a_dense_fold_read_as_fold_or_debris(lowres):
    image, tissue = lowres
    image = image.copy()
    debris = np.zeros(image.shape[:2], bool)
    debris[200:240, 120:300] = True
    image[debris] = (25, 20, 30)  # near-black debris
    fold = np.zeros(image.shape[:2], bool)
    fold[400:440, 300:580] = True
    image[fold] = (image[fold] * 0.12).astype(np.uint8)  # tissue seen through many layers
    artefacts = lowres_artefacts(image, tissue, T)
    assert iou(artefacts == DARK, debris | fold) >= 0.8
    assert set(np.unique(artefacts)) == {0, DARK}


def test_a_round_bubble_is_found_and_an_irregular_tear_is_not(lowres):
    image, _ = lowres
    image = image.copy()
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    bubble = (yy - 450) ** 2 + (xx - 300) ** 2 < 40**2
    image[bubble] = 240
    tear = (np.abs(yy - 0.5 * xx - 60) < 3) & (xx > 150) & (xx < 550)  # a thin slanted crack
    image[tear] = 240
    tissue = detect_tissue(image, 0.008)  # holes are filled: both lie inside the outline
    artefacts = lowres_artefacts(image, tissue, T)
    assert iou(artefacts == BUBBLE, bubble) >= 0.7
    assert not (artefacts == BUBBLE)[tear & ~ndimage.binary_dilation(bubble, iterations=3)].any()


def test_too_little_tissue_fails():
    image = np.full((300, 300, 3), 242, np.uint8)
    image[100:120, 100:120] = he_tissue(20, 20, 8.0)  # 0.026 mm²
    tissue = detect_tissue(image, 0.008)
    report = qc_report(lowres_artefacts(image, tissue, T), tissue, T, 0)
    assert report.verdict == "fail"
    assert [f.reason.name for f in report.findings] == ["too_little_tissue"]


def test_artefacts_over_half_the_tissue_fail(lowres):
    image, tissue = lowres
    image = image.copy()
    image[100:450, 100:600] = (40, 150, 70)
    report = qc_report(lowres_artefacts(image, tissue, T), tissue, T, 0)
    assert report.verdict == "fail"
    assert [f.reason.name for f in report.findings] == ["pen_mark", "artefacts_too_extensive"]


def test_focus_separates_sharp_from_blurred_tissue_at_the_analysis_level():
    tile = he_tissue(160, 160, 0.5, seed=3)
    blurred = ndimage.gaussian_filter(tile.astype(np.float32), (2.0, 2.0, 0)).astype(np.uint8)
    sharp_value = focus_measure(tile, T.focus_min_stained_fraction)
    blurred_value = focus_measure(blurred, T.focus_min_stained_fraction)
    assert sharp_value > T.focus_min_laplacian_var > blurred_value
    glass = np.full((160, 160, 3), 240, np.uint8)
    assert focus_measure(glass, T.focus_min_stained_fraction) is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fail_artefact_fraction", 1.5, "fail_artefact_fraction = 1.5: must be between 0 and 1"),
        ("min_tissue_mm2", -1.0, "min_tissue_mm2 = -1.0: must be a number, 0 or more"),
        ("he_hue_from_deg", 400.0, "he_hue_from_deg = 400.0: must be below 360 degrees"),
    ],
)
def test_thresholds_out_of_range_are_refused_with_the_value(key, value, message):
    with pytest.raises(ValueError, match=message):
        QcThresholds(**{key: value})


# -- through the pipeline, on the fakes --------------------------------------------------------


@pytest.fixture(scope="module")
def textured_slide_image() -> np.ndarray:
    """1536 x 1536 px at 0.5 µm/px (0.59 mm²), tissue everywhere but a glass margin."""
    image = np.full((1536, 1536, 3), 242, np.uint8)
    image[64:1472, 64:1472] = he_tissue(1408, 1408, 0.5, seed=5)
    return image


def _analyze(image: np.ndarray, **options):
    slide = FakeSlide(image, 0.0005, downsamples=(1, 2, 4, 8, 16), frame=128)
    seg = FakeSegmenter(um_per_px=2.0)  # as the demo bundle: regions at 2 µm/px,
    cls = FakeClassifier(um_per_px=0.5, tile_size=160)  # the classifier (and focus) at 0.5 µm/px
    result, stats, _ = analyze(slide, [seg, cls], FAKE_ALGORITHM, AnalysisOptions(**options))
    return result, stats, slide, cls


def test_blur_and_pen_on_a_slide_are_found_kept_out_of_the_calls_and_read_once(textured_slide_image):
    image = textured_slide_image.copy()
    blurred = np.zeros(image.shape[:2], bool)
    blurred[128:640, 128:800] = True
    image[blurred] = ndimage.gaussian_filter(image.astype(np.float32), (3, 3, 0)).astype(np.uint8)[blurred]
    pen = np.zeros(image.shape[:2], bool)
    pen[1000:1200, 300:1300] = True
    image[pen] = (40, 150, 70)

    result, stats, slide, cls = _analyze(image)

    qc = result.qc
    assert qc.verdict == "warn"
    assert [f.reason.name for f in qc.findings] == ["out_of_focus", "pen_mark"]
    art = qc.artefact_map.array
    scale = round(qc.artefact_map.mm_per_px / 0.0005)
    assert iou(art == BLUR, blurred[::scale, ::scale][: art.shape[0], : art.shape[1]]) >= 0.5
    assert iou(art == PEN, pen[::scale, ::scale][: art.shape[0], : art.shape[1]]) >= 0.5
    # No classifier tile over an artefact counts: each analysed tile lies on clean tissue.
    (heat,) = result.heatmaps
    grid_px = 160  # classifier tiles at 0.5 µm/px
    for r, c in zip(*np.nonzero(~np.isnan(heat.probabilities.array[..., 0]))):
        window = (blurred | pen)[r * grid_px : (r + 1) * grid_px, c * grid_px : (c + 1) * grid_px]
        assert window.mean() < T.tile_max_artefact_fraction + 0.3
    assert not np.isnan(heat.probabilities.array[..., 0]).all()
    assert result.calls[0].indeterminate_reason is None
    assert stats.decode_amplification == 1.0


def test_a_failed_slide_makes_every_call_indeterminate_with_the_reason(textured_slide_image):
    image = textured_slide_image.copy()
    image[64:1200, 64:1472] = (40, 150, 70)  # pen over most of the tissue

    result, *_ = _analyze(image)

    assert result.qc.verdict == "fail"
    assert all(c.call is None for c in result.calls)
    assert {c.indeterminate_reason.code_value for c in result.calls} == {"GLIO-QC-FAIL"}
    assert any(n.startswith("Slide QC: fail (pen mark") for n in result.notes)


def test_qc_off_gives_no_verdict(textured_slide_image):
    result, *_ = _analyze(textured_slide_image, qc=None)
    assert result.qc is None


def test_the_qc_section_of_the_settings_sets_the_thresholds_and_names_a_bad_value(tmp_path):
    from glio_node.config import load_settings
    from glio_node.errors import ConfigError

    config = tmp_path / "node.toml"
    config.write_text("[qc]\nmin_tissue_mm2 = 2\nfocus_min_laplacian_var = 25.5\n")
    qc = load_settings(config, environ={"GLIO_QC_PEN_MIN_SATURATION": "0.4"}).qc.thresholds()
    assert qc == QcThresholds(min_tissue_mm2=2.0, focus_min_laplacian_var=25.5, pen_min_saturation=0.4)
    assert load_settings(None, environ={}).qc.thresholds() == QcThresholds()
    with pytest.raises(ConfigError, match=r"\[qc\] fail_artefact_fraction = 2.0: must be between 0 and 1 \(from GLIO_QC_FAIL_ARTEFACT_FRACTION\)"):
        load_settings(None, environ={"GLIO_QC_FAIL_ARTEFACT_FRACTION": "2"})
