"""One slide through ``pipeline.analyze`` on the numpy fakes: every output checked against the
function that made it.

The fake slide is glass around a rectangle of tissue whose red channel varies; the fake segmenter
labels each pixel by its red value cut into bins, the fake classifier calls a tile by its mean
intensity (``glio_node.testing``).  So the label map must equal that function of the analysed
level wherever there is tissue, and each heatmap cell must equal the mean of its tile; no
Keras, no DICOM, a few milliseconds per slide.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from glio_node.errors import BadInput
from glio_node.pipeline.analyze import AnalysisOptions, analyze
from glio_node.pipeline.calibration import calibrate
from glio_node.results import NOT_TISSUE
from glio_node.testing import (
    FAKE_ALGORITHM,
    GLASS,
    FakeClassifier,
    FakeSegmenter,
    FakeSlide,
    mean_intensity,
    red_bins,
    tissue_image,
)

MM_PER_PX = 0.0005  # level 0: 0.5 µm/px; levels 1, 2, 3: 1, 2, 4 µm/px


@pytest.fixture
def slide() -> FakeSlide:
    image, _ = tissue_image()
    return FakeSlide(image, MM_PER_PX)


@pytest.fixture
def truth() -> np.ndarray:
    return tissue_image()[1]


def _run(slide: FakeSlide, *runners, **options):
    runners = runners or (FakeSegmenter(), FakeClassifier())
    return (*analyze(slide, runners, FAKE_ALGORITHM, AnalysisOptions(**options)), runners)


def test_the_label_map_is_the_segmenters_function_of_the_level_wherever_there_is_tissue(slide, truth):
    result, stats, seg_level, (seg, _) = _run(slide)

    assert seg_level.index == 1 and stats.networks[0].level == 1 and stats.networks[0].scale == 1.0
    labels = result.label_map.array
    assert labels.shape == slide.arrays[1].shape[:2]
    assert result.label_map.mm_per_px == pytest.approx(2 * MM_PER_PX)
    expected = red_bins(slide.arrays[1], len(seg.classes))
    analysed = labels != NOT_TISSUE
    np.testing.assert_array_equal(labels[analysed], expected[analysed])
    # The tissue mask is found on a coarse level: exact up to a few px of its border.
    truth_1 = truth[::2, ::2]
    assert analysed[ndimage.binary_erosion(truth_1, iterations=8)].all()
    assert not analysed[~ndimage.binary_dilation(truth_1, iterations=8)].any()
    assert len(np.unique(labels[analysed])) >= 3  # the red ramp gives several classes

    counts = np.bincount(labels[analysed], minlength=len(seg.classes))
    for i, c in enumerate(seg.classes):
        assert result.region_area_fraction[c.name] == pytest.approx(counts[i] / analysed.sum())
    assert result.tissue_area_mm2 == pytest.approx(truth.sum() * MM_PER_PX**2, rel=0.1)


def test_each_heatmap_cell_is_the_mean_of_its_tile_and_the_slide_call_their_mean(slide, truth):
    result, stats, _, (_, cls) = _run(slide)

    (heatmap,) = result.heatmaps
    assert heatmap.task == "mgmt" and heatmap.probabilities.mm_per_px == pytest.approx(4 * MM_PER_PX * cls.tile_size)
    raster = slide.arrays[2]  # 2 µm/px, read as it is
    t = cls.tile_size
    rows, cols = math.ceil(raster.shape[0] / t), math.ceil(raster.shape[1] / t)
    padded = np.full((rows * t, cols * t, 3), GLASS, np.uint8)
    padded[: raster.shape[0], : raster.shape[1]] = raster
    probs = heatmap.probabilities.array
    assert probs.shape == (rows, cols, 2)
    seen = ~np.isnan(probs[..., 0])
    for r, c in zip(*np.nonzero(seen)):
        tile = padded[r * t : (r + 1) * t, c * t : (c + 1) * t][None]
        np.testing.assert_allclose(probs[r, c], mean_intensity(tile)[0], rtol=1e-6)
    # A classifier tile is analysed when at least half of it is tissue (margins: the mask is
    # found on a coarser level).
    truth_2 = np.zeros((rows * t, cols * t), bool)
    truth_2[: raster.shape[0], : raster.shape[1]] = truth[::4, ::4]
    fraction = truth_2.reshape(rows, t, cols, t).mean(axis=(1, 3))
    assert seen[fraction > 0.6].all()
    assert not seen[fraction < 0.4].any()
    assert ((fraction > 0) & (fraction < 0.4)).any()  # the slide has such edge tiles
    assert stats.networks[1].tiles_inferred == seen.sum() == sum(cls.calls)

    (call,) = result.calls
    np.testing.assert_allclose(call.probabilities, probs[seen].mean(axis=0), rtol=1e-6)
    assert call.threshold == cls.indeterminate_below
    best = int(np.argmax(call.probabilities))
    assert call.call == (cls.classes[best] if call.probabilities[best] >= call.threshold else None)


def test_a_calibrated_head_calls_on_its_temperature_scaled_mean(slide):
    raw, *_ = _run(slide, FakeSegmenter(), FakeClassifier())
    calibrated, *_ = _run(slide, FakeSegmenter(), FakeClassifier(temperature=0.25))
    (before,), (after,) = raw.calls, calibrated.calls
    assert not before.calibrated and after.calibrated and after.temperature == 0.25
    np.testing.assert_allclose(after.probabilities, calibrate(np.array(before.probabilities), 0.25), rtol=1e-6)
    np.testing.assert_array_equal(calibrated.heatmaps[0].probabilities.array, raw.heatmaps[0].probabilities.array)  # tiles: as the network gave them
    best = int(np.argmax(after.probabilities))
    assert after.call == (after.classes[best] if after.probabilities[best] >= after.threshold else None)


def test_a_confident_classifier_makes_the_call():
    image, _ = tissue_image()
    image[image[..., 0] < 245] = 20  # dark tissue: P(second class) = mean/255 is low in tissue tiles
    slide = FakeSlide(image, MM_PER_PX)
    # QC off: flat near-black "tissue" is dark debris to QC, and 0.02 mm² is too little tissue.
    result, *_ = _run(slide, FakeSegmenter(), FakeClassifier(indeterminate_below=0.55), qc=None)
    (call,) = result.calls
    assert call.call == FakeClassifier().classes[0] and call.probabilities[0] > 0.55


def test_only_tissue_tiles_reach_the_models_in_full_batches(slide):
    result, stats, _, (seg, cls) = _run(slide, batch_size=5)

    for net, runner in zip(stats.networks, (seg, cls)):
        assert 0 < net.tiles_with_tissue < net.tiles_total
        assert net.tiles_inferred == net.tiles_with_tissue == sum(runner.calls)
        assert all(n == 5 for n in runner.calls[:-1]) and 1 <= runner.calls[-1] <= 5
    grid_cols = math.ceil(slide.levels[1].cols / (seg.tile_size - seg.overlap))
    grid_rows = math.ceil(slide.levels[1].rows / (seg.tile_size - seg.overlap))
    assert stats.networks[0].tiles_total == grid_rows * grid_cols


def test_each_frame_is_read_once_and_only_frames_under_tissue_tiles(slide, truth):
    _, stats, _, _ = _run(slide, decode_threads=3, lookahead=4)

    inference = {k: n for k, n in slide.reads.items() if k[0] in (1, 2)}  # tissue used level 3
    assert stats.tissue_level == 3 and max(inference.values()) == 1
    assert stats.frames_decoded == len(inference) == stats.frames_needed
    assert stats.decode_amplification == 1.0
    # Level 1 frames more than a tile (64 px) away from the tissue are never read.
    fh = slide.levels[1].frame_rows
    rows = np.nonzero(truth[::2, ::2].any(axis=1))[0]
    far = [(r, c) for (lvl, r, c) in inference if lvl == 1 and ((r + 1) * fh < rows[0] - 64 or r * fh > rows[-1] + 64)]
    assert far == []
    n_rows, n_cols = slide.frame_grid(1)
    assert len([k for k in inference if k[0] == 1]) < n_rows * n_cols


def test_decode_threads_and_lookahead_do_not_change_the_result(slide):
    one, *_ = _run(slide, decode_threads=1, lookahead=1, batch_size=1)
    many, *_ = _run(FakeSlide(tissue_image()[0], MM_PER_PX), decode_threads=4, lookahead=64, batch_size=8)
    np.testing.assert_array_equal(one.label_map.array, many.label_map.array)
    np.testing.assert_array_equal(one.heatmaps[0].probabilities.array, many.heatmaps[0].probabilities.array)


def test_a_network_between_levels_reads_the_finer_level_downsampled(slide):
    result, stats, seg_level, _ = _run(slide, FakeSegmenter(um_per_px=1.5), FakeClassifier())

    net = stats.networks[0]
    assert (net.level, net.scale, net.raster_um_per_px) == (1, pytest.approx(1.5), pytest.approx(1.5))
    assert seg_level.index == 1
    assert result.label_map.array.shape == (math.ceil(256 / 1.5), math.ceil(384 / 1.5))
    assert result.label_map.mm_per_px == pytest.approx(0.0015)


def test_a_slide_of_glass_is_analysed_to_nothing_and_says_so():
    slide = FakeSlide(np.full((256, 384, 3), 245, np.uint8), MM_PER_PX)
    result, stats, _, (seg, cls) = _run(slide)

    assert result.notes == (
        "No tissue was found on the slide; nothing was analysed.",
        "Slide QC: fail (too little tissue 0.00 mm²); every slide-level call is indeterminate.",
    )
    assert result.qc.verdict == "fail" and result.qc.findings[0].reason.name == "too_little_tissue"
    assert (result.label_map.array == NOT_TISSUE).all()
    assert seg.calls == [] and cls.calls == [] and stats.frames_decoded == 0
    assert result.calls[0].call is None and all(math.isnan(p) for p in result.calls[0].probabilities)


def test_a_bundle_has_at_most_one_segmentation_network(slide):
    with pytest.raises(BadInput, match="the bundle has 2 segmentation networks; it may have at most one"):
        _run(slide, FakeSegmenter(), FakeSegmenter(name="second"))


def test_a_classifier_alone_calls_the_slide_and_draws_no_regions(slide):
    result, stats, level, (cls,) = _run(slide, FakeClassifier())
    assert result.label_map is None and result.region_classes == () and result.region_area_fraction is None
    assert not result.has_regions
    assert [c.task for c in result.calls] == ["mgmt"] and result.heatmaps[0].task == "mgmt"
    assert level.index == stats.networks[0].level == 2  # the source level: the one the classifier read
    assert result.tissue.array.any() and result.tissue_area_mm2 > 0 and result.qc is not None


def test_progress_counts_every_tile_and_ends_at_the_total(slide):
    seen: list[tuple[int, int]] = []
    runners = (FakeSegmenter(), FakeClassifier())
    _, stats, _ = analyze(slide, runners, FAKE_ALGORITHM, AnalysisOptions(batch_size=4), lambda d, t: seen.append((d, t)))
    total = sum(n.tiles_inferred for n in stats.networks)
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert all(t == total for _, t in seen)


def test_a_slide_coarser_than_the_network_is_refused_with_the_fix():
    slide = FakeSlide(tissue_image()[0], 0.004, downsamples=(1, 2))
    with pytest.raises(BadInput, match=r"finest level is 4 µm/px but the model needs 1 µm/px; scan or convert"):
        _run(slide)
