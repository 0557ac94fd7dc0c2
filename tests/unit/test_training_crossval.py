"""Cross-validation summarises its folds the way a reader of the paper expects: each test metric's
mean and sample standard deviation over the folds, and the folds' test results pooled, each slide
counted once, with patient-level intervals."""

from __future__ import annotations

import numpy as np
import pytest

from training.dataset import LABEL_VALUES, REGION_NAMES
from training.metrics import classification_report, confusion_matrix, segmentation_report, slide_level_report
from training.run import summarise_folds

SUBTYPES = LABEL_VALUES["subtype"]


def _fold(rng, slide_ids):
    """A fold's metrics as train_split writes them (the test set's; the validation set is not
    summarised), from random labels and predictions: one 8x8 region tile per slide."""
    n = len(slide_ids)
    y = rng.integers(0, len(REGION_NAMES), size=(n, 8, 8))
    p = np.where(rng.random((n, 8, 8)) < 0.7, y, rng.integers(0, len(REGION_NAMES), size=(n, 8, 8)))
    tiles = {s: rng.dirichlet(np.ones(4), size=5) for s in slide_ids}
    truth = {s: int(rng.integers(0, 4)) for s in slide_ids}
    tile_truth = np.concatenate([[truth[s]] * 5 for s in slide_ids])
    tile_probs = np.concatenate([tiles[s] for s in slide_ids])
    regions = segmentation_report(y, p, REGION_NAMES)
    regions["slides"] = {s: confusion_matrix(y[i], p[i], len(REGION_NAMES)).tolist() for i, s in enumerate(slide_ids)}
    tile = classification_report(tile_truth, tile_probs, SUBTYPES)
    tile["slides"] = {s: confusion_matrix([truth[s]] * 5, tiles[s].argmax(-1), 4).tolist() for s in slide_ids}
    test = {"regions": regions, "subtype": {"tile": tile, "slide": slide_level_report(tiles, truth, SUBTYPES)}}
    return {"sets": {}, "validation": {}, "test": test}, (y, p), (tiles, truth)


def test_mean_sd_and_pooled_results_over_three_folds():
    rng = np.random.default_rng(7)
    folds = [_fold(rng, [f"S{i}{j}" for j in range(4)]) for i in range(3)]
    summary = summarise_folds([(f"fold-{i}", m) for i, (m, _, _) in enumerate(folds)])

    dice = [m["test"]["regions"]["mean_dice"] for m, _, _ in folds]
    st = summary["metrics"]["test_regions_mean_dice"]
    assert st["n"] == 3
    assert st["mean"] == pytest.approx(np.mean(dice)) and st["sd"] == pytest.approx(np.std(dice, ddof=1))
    slide_acc = [m["test"]["subtype"]["slide"]["accuracy"] for m, _, _ in folds]
    assert summary["metrics"]["test_subtype_slide_accuracy"]["mean"] == pytest.approx(np.mean(slide_acc))
    assert [f["fold"] for f in summary["folds"]] == ["fold-0", "fold-1", "fold-2"]

    # Pooled = scored once on everything the folds tested, computed here independently.
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
    del b["test"]["subtype"]
    summary = summarise_folds([("lopo-A", a), ("lopo-B", b)])
    assert summary["metrics"]["test_subtype_tile_accuracy"] == {"mean": pytest.approx(a["test"]["subtype"]["tile"]["accuracy"]), "sd": None, "n": 1}
    assert summary["metrics"]["test_regions_mean_dice"]["n"] == 2
    assert summary["pooled"]["subtype"]["slide"]["n"] == 2


def test_pooled_results_carry_patient_level_intervals_when_patients_are_known():
    rng = np.random.default_rng(3)
    folds = [_fold(rng, [f"S{i}{j}" for j in range(4)]) for i in range(3)]
    patient_of = {f"S{i}{j}": f"P{i}{j // 2}" for i in range(3) for j in range(4)}  # two slides per patient
    summary = summarise_folds([(f"fold-{i}", m) for i, (m, _, _) in enumerate(folds)], patient_of, seed=4)
    regions = summary["pooled"]["regions"]
    assert regions["ci"]["bootstrap"]["n_patients"] == 6 and regions["ci"]["bootstrap"]["n_resamples"] >= 1000
    for metric in ("mean_dice", "macro_f1", "mcc", "accuracy"):
        lo, hi = regions["ci"][metric]
        assert lo <= regions[metric] <= hi, metric
    slide = summary["pooled"]["subtype"]["slide"]
    lo, hi = slide["ci"]["balanced_accuracy"]
    assert lo <= slide["balanced_accuracy"] <= hi
    assert summary == summarise_folds([(f"fold-{i}", m) for i, (m, _, _) in enumerate(folds)], patient_of, seed=4)
    assert "ci" not in summarise_folds([(f"fold-{i}", m) for i, (m, _, _) in enumerate(folds)])["pooled"]["regions"]
