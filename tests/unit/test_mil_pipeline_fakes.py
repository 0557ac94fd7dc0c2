"""Two-stage tasks through ``pipeline.analyze`` on the numpy fakes: the encoder runs as a tile
network through the same frame plan, the bag holds exactly the tissue tiles' embeddings in
float16, no tile image outlives its batch, and each aggregator head gives a call and an
attention map on the encoder's grid; k folds are averaged and their spread can make the call
indeterminate."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from glio_node.coding import EGFR_CLASSES
from glio_node.errors import BadInput
from glio_node.pipeline.analyze import CLASSIFIER_MIN_TISSUE, AnalysisOptions, analyze
from glio_node.pipeline.bag import EmbeddingBag, bag_bytes, fold_spread
from glio_node.pipeline.tiling import TileGrid
from glio_node.testing import FAKE_ALGORITHM, FakeAggregator, FakeEncoder, FakeSegmenter, FakeSlide, channel_means, tissue_image
from glio_node.pipeline.analyze import find_tissue

MM_PER_PX = 0.0005

# The fake slides hold a few hundredths of a mm² of tissue: slide QC would fail them (too little
# tissue) and withhold every call; these tests are about the bag and the aggregators.
NO_QC = AnalysisOptions(qc=None)


@pytest.fixture
def slide() -> FakeSlide:
    return FakeSlide(tissue_image()[0], MM_PER_PX)


def _expected_bag(slide: FakeSlide, encoder: FakeEncoder):
    """What the bag must hold: channel_means of every grid cell with >= 50 % tissue, read straight from the level."""
    level = slide.levels[2]  # 2 µm/px, the encoder's spacing
    image = slide.arrays[2]
    grid = TileGrid(raster_rows=image.shape[0], raster_cols=image.shape[1], tile_size=encoder.tile_size, overlap=0)
    tissue, _ = find_tissue(slide)
    cells = grid.cells_with_tissue(tissue.mask, tissue.mm_per_px, level.mm_per_px, CLASSIFIER_MIN_TISSUE)
    t = encoder.tile_size
    padded = np.full((grid.rows * t, grid.cols * t, 3), 255, np.uint8)
    padded[: image.shape[0], : image.shape[1]] = image
    expected = {}
    for r, c in zip(*np.nonzero(cells)):
        tile = padded[r * t : (r + 1) * t, c * t : (c + 1) * t][None]
        expected[int(r), int(c)] = channel_means(tile, encoder.embed_dim)[0]
    return expected, grid


def test_the_bag_holds_exactly_the_tissue_tiles_embeddings_in_float16_and_no_tile_is_kept(slide):
    encoder, head = FakeEncoder(tile_size=16), FakeAggregator()
    result, stats, _ = analyze(slide, (FakeSegmenter(), encoder), FAKE_ALGORITHM, AnalysisOptions(batch_size=4, qc=None), aggregators=(head,))
    expected, grid = _expected_bag(slide, encoder)

    (bag,) = head.bags
    assert bag.dtype == np.float16 and bag.shape == (len(expected), encoder.embed_dim)
    assert 10 < len(expected) < grid.rows * grid.cols  # some cells are glass: the bag skips them
    attention = result.attention_maps[0].weights.array
    assert attention.shape == (grid.rows, grid.cols)
    # every tissue cell is in the bag once, with its embedding rounded to float16
    assert set(zip(*np.nonzero(~np.isnan(attention)))) == set(expected)
    want = np.stack([expected[k] for k in sorted(expected)]).astype(np.float16)
    np.testing.assert_array_equal(np.sort(bag, axis=0), np.sort(want, axis=0))
    assert stats.networks[1].tiles_inferred == len(expected) == stats.networks[1].tiles_with_tissue
    assert stats.decode_amplification == 1.0
    gc.collect()
    assert encoder.batches and all(ref() is None for ref in encoder.batches)  # no tile batch survives


def test_the_attention_map_and_the_call_come_from_the_aggregator(slide):
    head = FakeAggregator(indeterminate_below=0.0)
    result, _, _ = analyze(slide, (FakeSegmenter(), FakeEncoder(tile_size=16)), FAKE_ALGORITHM, NO_QC, aggregators=(head,))
    (call,) = result.calls
    attention = result.attention_maps[0]
    assert attention.task == "mgmt" and attention.network == "fake-mgmt-abmil"
    assert np.nansum(attention.weights.array) == pytest.approx(1.0, abs=1e-4)
    assert attention.weights.mm_per_px == pytest.approx(4 * MM_PER_PX * 16)  # one pixel per encoder tile
    bag = head.bags[0].astype(np.float64)[:, 0] + 1e-6
    p = float((bag / bag.sum() * bag).sum())
    assert call.probabilities == pytest.approx((1 - p, p), abs=1e-6)
    assert call.call == call.classes[int(p >= 0.5)] and call.folds == 1 and call.fold_spread == 0.0


def test_folds_that_disagree_make_the_call_indeterminate_with_the_spread_reported(slide):
    disagree = FakeAggregator(offsets=(-0.6, 0.6), max_fold_spread=0.3)
    agree = FakeAggregator(name="agree", task="egfr", offsets=(-0.3, -0.32), max_fold_spread=0.3, classes=EGFR_CLASSES)
    result, _, _ = analyze(slide, (FakeSegmenter(), FakeEncoder(tile_size=16)), FAKE_ALGORITHM, NO_QC, aggregators=(disagree, agree))
    no, yes = result.calls
    assert no.call is None and no.fold_reason == "fold_disagreement" and no.folds == 2
    assert no.fold_spread > 0.3 and no.max_fold_spread == 0.3
    assert yes.call is not None and yes.fold_reason is None and yes.fold_spread == pytest.approx(0.02, abs=1e-6)


def test_an_aggregator_naming_a_missing_encoder_is_refused(slide):
    with pytest.raises(BadInput, match=r"aggregator 'fake-mgmt-abmil' reads encoder 'uni', which is not among the networks"):
        analyze(slide, (FakeSegmenter(), FakeEncoder(tile_size=16)), FAKE_ALGORITHM, aggregators=(FakeAggregator(encoder="uni"),))


def test_the_bag_is_bounded_and_says_its_size():
    assert bag_bytes(100_000, 1024) == 204_800_000
    bag = EmbeddingBag(3, 4)
    assert bag.nbytes == bag_bytes(3, 4)
    bag.add(np.array([0, 1]), np.array([2, 3]), np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"bag of 3 tiles overfilled by 1"):
        bag.add(np.array([0, 1]), np.array([2, 3]), np.ones((2, 4), np.float32))
    assert fold_spread(np.array([[0.9, 0.1], [0.3, 0.7]])) == pytest.approx(0.6)


def _encoder_gate(slide: FakeSlide, encoder: FakeEncoder, low: float, high: float):
    """A gate on the encoder whose reference is fitted on this slide's own bag (so it scores ~1)."""
    from glio_node.ood import OodGate, fit_reference

    expected, _ = _expected_bag(slide, encoder)
    return OodGate(encoder.name, fit_reference(np.stack(list(expected.values()))), high, low)


@pytest.mark.parametrize("low, high, withheld", [(0.1, 10.0, False), (5.0, 10.0, True)], ids=["inside", "outside"])
def test_a_gate_on_the_encoder_scores_its_embeddings_and_withholds_the_mil_calls(slide, low, high, withheld):
    encoder = FakeEncoder(tile_size=16)
    gate = _encoder_gate(slide, encoder, low, high)
    result, _, _ = analyze(slide, (FakeSegmenter(), encoder), FAKE_ALGORITHM, NO_QC, ood=gate,
                           aggregators=(FakeAggregator(indeterminate_below=0.0),))
    (call,) = result.calls
    scores = result.ood.tile_scores.array
    assert result.ood.network == encoder.name and scores.shape == result.attention_maps[0].weights.array.shape
    # every tile in the bag, and only those, has a score: the embeddings are the features
    np.testing.assert_array_equal(~np.isnan(scores), ~np.isnan(result.attention_maps[0].weights.array))
    assert 0.3 < result.ood.slide_score < 2.0  # the reference is this slide's own tiles
    assert result.ood.out_of_distribution is withheld
    assert (call.call is None) is withheld and call.out_of_distribution is withheld
