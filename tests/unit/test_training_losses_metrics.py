"""Each loss agrees with a NumPy reference; metrics agree with hand counts; slide-level metrics
aggregate tiles exactly as the worker does."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from glio_node.pipeline.stitch import HeatmapStitcher
from glio_node.pipeline.tiling import TileGrid
from training import losses
from training.metrics import (
    confusion_matrix,
    per_class_metrics,
    roc_auc,
    segmentation_report,
    slide_level_report,
)

rng = np.random.default_rng(7)
EPS = losses.EPSILON


def _maps(n=3, h=5, w=4, c=4):
    logits = rng.normal(size=(n, h, w, c))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    t = np.eye(c)[rng.integers(0, c - 1, size=(n, h, w))]  # class c-1 absent from the target
    return t.astype(np.float32), p.astype(np.float32)


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def test_categorical_and_weighted_crossentropy_match_numpy():
    t, p = _maps()
    ref = -(t * np.log(np.clip(p, EPS, 1 - EPS))).sum(-1).mean(axis=(1, 2))
    np.testing.assert_allclose(_np(losses.categorical_crossentropy(t, p)), ref, rtol=1e-5)
    w = np.array([1.0, 2.0, 0.5, 3.0], np.float32)
    ref_w = -(w * t * np.log(np.clip(p, EPS, 1 - EPS))).sum(-1).mean(axis=(1, 2))
    np.testing.assert_allclose(_np(losses.get_loss("weighted_categorical_crossentropy", w)(t, p)), ref_w, rtol=1e-5)


def test_binary_crossentropy_matches_numpy():
    t = rng.integers(0, 2, size=(6, 3)).astype(np.float32)
    p = rng.uniform(0.01, 0.99, size=(6, 3)).astype(np.float32)
    ref = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean(-1)
    np.testing.assert_allclose(_np(losses.binary_crossentropy(t, p)), ref, rtol=1e-5)


def test_dice_and_generalized_dice_match_numpy():
    t, p = _maps()
    s = losses.SMOOTH
    inter, ref_sum, pred_sum = (t * p).sum((1, 2)), t.sum((1, 2)), p.sum((1, 2))
    dice = 1 - ((2 * inter + s) / (ref_sum + pred_sum + s)).mean(-1)
    np.testing.assert_allclose(_np(losses.dice_loss(t, p)), dice, rtol=1e-5)
    w = np.where(ref_sum > 0, 1 / np.maximum(ref_sum**2, EPS), 0)
    gd = 1 - (2 * (w * inter).sum(-1) + s) / ((w * (ref_sum + pred_sum)).sum(-1) + s)
    np.testing.assert_allclose(_np(losses.generalized_dice_loss(t, p)), gd, rtol=1e-5)
    assert _np(losses.dice_loss(t, t)).max() < 1e-5 and _np(losses.generalized_dice_loss(t, t)).max() < 1e-5


def test_an_unknown_loss_names_the_known_ones():
    with pytest.raises(ValueError, match="loss 'focal' is not one of"):
        losses.get_loss("focal")
    with pytest.raises(ValueError, match="needs class_weights"):
        losses.get_loss("weighted_categorical_crossentropy")


def test_per_class_metrics_from_hand_counts():
    # truth:      0 0 0 1 1 2 ; predicted: 0 0 1 1 2 2 ; 255 is not scored
    cm = confusion_matrix(np.array([0, 0, 0, 1, 1, 2, 255]), np.array([0, 0, 1, 1, 2, 2, 0]), 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    m = per_class_metrics(cm)
    np.testing.assert_allclose(m["sensitivity"], [2 / 3, 1 / 2, 1])
    np.testing.assert_allclose(m["specificity"], [3 / 3, 3 / 4, 4 / 5])
    np.testing.assert_allclose(m["precision"], [1, 1 / 2, 1 / 2])
    np.testing.assert_allclose(m["accuracy"], [5 / 6, 4 / 6, 5 / 6])
    np.testing.assert_allclose(m["dice"], [4 / 5, 2 / 4, 2 / 3])
    np.testing.assert_allclose(m["iou"], [2 / 3, 1 / 3, 1 / 2])


def test_a_class_never_seen_has_undefined_not_perfect_metrics():
    report = segmentation_report(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), ["a", "b"])
    assert report["mean_dice"] == 1.0
    assert np.isnan(report["per_class"]["b"]["sensitivity"])


def test_roc_auc_is_the_probability_a_positive_outranks_a_negative():
    t = np.array([1, 1, 0, 0, 1, 0])
    s = np.array([0.9, 0.4, 0.4, 0.1, 0.8, 0.3])
    pairs = [(a, b) for a in s[t == 1] for b in s[t == 0]]
    ref = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert roc_auc(t, s) == pytest.approx(ref)
    assert np.isnan(roc_auc(np.ones(3), s[:3]))


def test_slide_level_calls_average_tiles_as_the_worker_does():
    tiles = {"A": rng.dirichlet(np.ones(3), size=6), "B": rng.dirichlet(np.ones(3), size=4), "C": np.empty((0, 3))}
    expected = {}
    for sid, probs in tiles.items():
        stitcher = HeatmapStitcher(TileGrid(320, 320, 32, 0), 3)
        for i, p in enumerate(probs):
            stitcher.add(i // 10, i % 10, p)
        worker = stitcher.slide_probabilities()
        expected[sid] = None if worker is None else int(np.argmax(worker))
    report = slide_level_report(tiles, {"A": expected["A"], "B": (expected["B"] + 1) % 3, "C": 0}, ["x", "y", "z"])
    assert report["n"] == 2 and report["accuracy"] == 0.5
    assert report["slides_without_tiles"] == ["C"]
