"""Cross-validation summarises its folds the way a reader of the paper expects: each metric's
mean and sample standard deviation over the folds, and the folds' validation results pooled,
each slide counted once."""

from __future__ import annotations

import numpy as np
import pytest

from training.dataset import LABEL_VALUES, REGION_NAMES
from training.metrics import classification_report, segmentation_report, slide_level_report
from training.run import summarise_folds

SUBTYPES = LABEL_VALUES["subtype"]


def _fold(rng, slide_ids):
    """A fold's metrics as train_split writes them, from random labels and predictions."""
    y = rng.integers(0, len(REGION_NAMES), size=(2, 8, 8))
    p = np.where(rng.random((2, 8, 8)) < 0.7, y, rng.integers(0, len(REGION_NAMES), size=(2, 8, 8)))
    tiles = {s: rng.dirichlet(np.ones(4), size=5) for s in slide_ids}
    truth = {s: int(rng.integers(0, 4)) for s in slide_ids}
    tile_truth = np.concatenate([[truth[s]] * 5 for s in slide_ids])
    tile_probs = np.concatenate([tiles[s] for s in slide_ids])
    metrics = {
        "regions": segmentation_report(y, p, REGION_NAMES),
        "subtype": {"tile": classification_report(tile_truth, tile_probs, SUBTYPES), "slide": slide_level_report(tiles, truth, SUBTYPES)},
    }
    return metrics, (y, p), (tiles, truth)


def test_mean_sd_and_pooled_results_over_three_folds():
    rng = np.random.default_rng(7)
    folds = [_fold(rng, [f"S{i}{j}" for j in range(4)]) for i in range(3)]
    summary = summarise_folds([(f"fold-{i}", m) for i, (m, _, _) in enumerate(folds)])

    dice = [m["regions"]["mean_dice"] for m, _, _ in folds]
    st = summary["metrics"]["regions_mean_dice"]
    assert st["n"] == 3
    assert st["mean"] == pytest.approx(np.mean(dice)) and st["sd"] == pytest.approx(np.std(dice, ddof=1))
    slide_acc = [m["subtype"]["slide"]["accuracy"] for m, _, _ in folds]
    assert summary["metrics"]["subtype_slide_accuracy"]["mean"] == pytest.approx(np.mean(slide_acc))
    assert [f["fold"] for f in summary["folds"]] == ["fold-0", "fold-1", "fold-2"]

    # Pooled = scored once on everything the folds validated, computed here independently.
    all_y = np.concatenate([yp[0] for _, yp, _ in folds])
    all_p = np.concatenate([yp[1] for _, yp, _ in folds])
    assert summary["pooled"]["regions"]["confusion_matrix"] == segmentation_report(all_y, all_p, REGION_NAMES)["confusion_matrix"]
    assert summary["pooled"]["regions"]["mean_dice"] == pytest.approx(segmentation_report(all_y, all_p, REGION_NAMES)["mean_dice"])
    tiles = {s: t for _, _, (ts, _) in folds for s, t in ts.items()}
    truth = {s: t for _, _, (_, tr) in folds for s, t in tr.items()}
    expected = slide_level_report(tiles, truth, SUBTYPES)
    pooled = summary["pooled"]["subtype"]["slide"]
    assert pooled["n"] == 12 and pooled["confusion_matrix"] == expected["confusion_matrix"]
    for name in SUBTYPES:
        assert pooled["per_class"][name]["roc_auc"] == pytest.approx(expected["per_class"][name]["roc_auc"], nan_ok=True)
    assert summary["pooled"]["subtype"]["tile"]["n"] == 60


def test_a_task_missing_from_a_fold_counts_only_the_folds_that_have_it():
    rng = np.random.default_rng(1)
    (a, _, _), (b, _, _) = _fold(rng, ["A1", "A2"]), _fold(rng, ["B1", "B2"])
    del b["subtype"]
    summary = summarise_folds([("lopo-A", a), ("lopo-B", b)])
    assert summary["metrics"]["subtype_tile_accuracy"] == {"mean": pytest.approx(a["subtype"]["tile"]["accuracy"]), "sd": None, "n": 1}
    assert summary["metrics"]["regions_mean_dice"]["n"] == 2
    assert summary["pooled"]["subtype"]["slide"]["n"] == 2
