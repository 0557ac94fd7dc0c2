"""A reader of the model card sees how far each held-out figure could be off: patient-level
bootstrap intervals that contain the truth, repeat with the seed, and move a patient's slides
together."""

from __future__ import annotations

import numpy as np
import pytest

from training.bootstrap import bootstrap, classification_intervals, confusion_intervals, patient_resamples
from training.metrics import balanced_accuracy, macro_f1, matthews_corrcoef

CLASSES = ("negative", "positive")


def _binary_test_set(n_patients: int, sensitivity: float, specificity: float, seed: int):
    """One slide per patient, half positive, in a shuffled order; exactly ``sensitivity`` of the
    positives and ``specificity`` of the negatives called right, so the set's rates are the true ones."""
    half = n_patients // 2
    truth = np.repeat([1, 0], half)
    right = np.concatenate([np.arange(half) < round(sensitivity * half), np.arange(half) < round(specificity * half)])
    order = np.random.default_rng(seed).permutation(n_patients)
    truth, right = truth[order], right[order]
    calls = np.where(right, truth, 1 - truth)
    probabilities = np.stack([1 - calls * 0.8 - 0.1, calls * 0.8 + 0.1], axis=1)
    return truth, probabilities, [f"P{i}" for i in range(n_patients)]


def test_the_interval_contains_the_true_rate_and_is_as_wide_as_binomial_sampling_says():
    truth, probs, patients = _binary_test_set(400, sensitivity=0.8, specificity=0.9, seed=1)
    ci = classification_intervals(truth, probs, patients, CLASSES, n_resamples=1000, seed=0)
    lo, hi = ci["per_class"]["positive"]["sensitivity"]
    assert lo < 0.8 < hi
    lo_s, hi_s = ci["per_class"]["positive"]["specificity"]
    assert lo_s < 0.9 < hi_s
    # 200 positives: the binomial 95 % half-width is 1.96 * sqrt(0.8 * 0.2 / 200) = 0.055
    assert hi - lo == pytest.approx(2 * 0.055, rel=0.25)
    assert ci["bootstrap"] == {"unit": "patient", "method": "percentile", "n_patients": 400, "n_resamples": 1000, "seed": 0, "level": 0.95}


def test_a_set_where_every_patient_looks_the_same_has_no_spread():
    cm = np.array([[8, 2], [1, 9]])
    ci = confusion_intervals(np.stack([cm] * 5), [f"P{i}" for i in range(5)], CLASSES, n_resamples=200)
    assert ci["accuracy"] == pytest.approx([0.85, 0.85])
    assert ci["mcc"] == pytest.approx([matthews_corrcoef(cm)] * 2)
    assert ci["per_class"]["positive"]["dice"] == pytest.approx([18 / 21] * 2)


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    truth, probs, patients = _binary_test_set(60, 0.7, 0.7, seed=2)
    a = classification_intervals(truth, probs, patients, CLASSES, seed=5)
    assert a == classification_intervals(truth, probs, patients, CLASSES, seed=5)
    assert a["accuracy"] != classification_intervals(truth, probs, patients, CLASSES, seed=6)["accuracy"]


def test_a_patients_slides_are_drawn_together():
    groups = ["A", "A", "B", "C"]
    for idx in patient_resamples(groups, n_resamples=300, seed=0):
        counts = np.bincount(idx, minlength=4)
        assert counts[0] == counts[1], "both slides of patient A, or neither"
        assert counts[1] + counts[2] + counts[3] == 3, "three patients drawn each time"

    # Patient A: both slides right; patient B: both wrong.  Drawing by patient, accuracy is 0, 1/2
    # or 1; drawing slides one by one would also give 1/4 and 3/4.
    right = np.array([1.0, 1.0, 0.0, 0.0])
    seen: set[float] = set()

    def accuracy(idx):
        seen.add(float(right[idx].mean()))
        return {"accuracy": right[idx].mean()}

    ci = bootstrap(["A", "A", "B", "B"], accuracy, n_resamples=200, seed=0)
    assert seen == {0.0, 0.5, 1.0}
    assert ci["accuracy"] == (0.0, 1.0)


def test_a_metric_undefined_in_every_resample_has_no_interval():
    truth = np.zeros(4, dtype=int)  # no positive slide: no AUC, no sensitivity of "positive"
    probs = np.tile([0.7, 0.3], (4, 1))
    ci = classification_intervals(truth, probs, ["A", "B", "C", "D"], CLASSES, n_resamples=50)
    assert ci["per_class"]["positive"]["roc_auc"] == [None, None]
    assert ci["per_class"]["negative"]["sensitivity"] == [1.0, 1.0]


def test_impossible_bootstraps_say_why():
    with pytest.raises(ValueError, match="at least one patient"):
        patient_resamples([], 10)
    with pytest.raises(ValueError, match="n_resamples 0 must be at least 1"):
        patient_resamples(["A"], 0)
    with pytest.raises(ValueError, match="confidence level 95 must be between 0 and 1"):
        bootstrap(["A"], lambda idx: {"x": 1.0}, level=95)


def test_brats_path_metrics_from_hand_counts():
    cm = np.array([[5, 1, 0], [2, 6, 0], [0, 0, 0]])  # third class in neither truth nor calls
    assert macro_f1(cm) == pytest.approx(np.mean([10 / 13, 12 / 15]))
    assert balanced_accuracy(cm) == pytest.approx(np.mean([5 / 6, 6 / 8]))
    # binary MCC from its textbook formula: (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))
    tp, fn, fp, tn = 6, 2, 1, 5
    assert matthews_corrcoef(cm) == pytest.approx((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert matthews_corrcoef(np.array([[4, 0], [0, 0]])) == 0.0
