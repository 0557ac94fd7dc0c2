"""Calibration and abstention as training chooses them on the validation slides."""

from __future__ import annotations

import numpy as np
import pytest

from glio_node.pipeline.calibration import calibrate
from training.calibration import (
    choose_threshold,
    coverage_accuracy,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability,
)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _drawn_from(logits, rng):
    """Truth drawn from softmax(logits): labels for which those probabilities are calibrated."""
    p = _softmax(logits)
    return np.array([rng.choice(p.shape[1], p=row) for row in p])


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_the_fit_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 2.0, size=(4000, 3))
    truth = _drawn_from(logits, rng)  # calibrated at T = 1 on these logits
    overconfident = _softmax(logits * true_t)  # what a network that is off by true_t outputs
    t = fit_temperature(overconfident, truth)
    assert t == pytest.approx(true_t, rel=0.05)
    assert nll(overconfident, truth, t) < nll(overconfident, truth, 1.0) or true_t == 1.0


def test_separable_validation_slides_end_at_the_lower_bound():
    p = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert fit_temperature(p, [0, 1, 0], bounds=(0.2, 5.0)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="must satisfy 0 < low < high"):
        fit_temperature(p, [0, 1, 0], bounds=(1.0, 0.5))
    with pytest.raises(ValueError, match="no validation slides"):
        fit_temperature(np.zeros((0, 2)), [])


def test_perfectly_calibrated_samples_have_an_ece_near_zero():
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 1.5, size=(20000, 2))
    truth = _drawn_from(logits, rng)
    assert expected_calibration_error(_softmax(logits), truth) < 0.015
    assert expected_calibration_error(_softmax(logits * 4), truth) > 0.1, "over-confident: far from the diagonal"
    assert expected_calibration_error(calibrate(_softmax(logits * 4), fit_temperature(_softmax(logits * 4), truth)), truth) < 0.015


def test_ece_is_the_weighted_gap_between_accuracy_and_confidence_per_bin():
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.35, 0.65]])
    r = reliability(p, [0, 1, 1, 1], n_bins=10)
    assert r.counts[9] == 2 and r.counts[6] == 2 and r.counts.sum() == 4
    assert r.accuracy[9] == 0.5 and r.confidence[9] == pytest.approx(0.95)
    assert r.ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.35)
    assert np.isnan(expected_calibration_error(np.zeros((0, 2)), []))


def test_the_threshold_meets_its_target_on_the_set_it_was_chosen_on():
    rng = np.random.default_rng(11)
    logits = rng.normal(0.0, 2.0, size=(300, 2))
    p = _softmax(logits)
    truth = _drawn_from(logits, rng)
    choice = choose_threshold(p, truth, target_accuracy=0.9, min_coverage=0.3)
    called = p.max(1) >= choice.threshold
    assert choice.target_met
    assert (p.argmax(1)[called] == truth[called]).mean() >= 0.9
    assert called.mean() >= 0.3 and called.mean() == pytest.approx(choice.coverage)
    thresholds, coverage, accuracy = coverage_accuracy(p, truth)
    lower = thresholds < choice.threshold
    assert not ((accuracy[lower] >= 0.9) & (coverage[lower] >= 0.3)).any(), "no lower threshold meets the target"


def test_an_unreachable_target_keeps_the_most_accurate_threshold_and_says_so():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    choice = choose_threshold(p, [1, 0, 0, 1], target_accuracy=0.99, min_coverage=0.5)
    assert not choice.target_met
    assert choice.threshold == pytest.approx(0.575) and choice.coverage == 0.75 and choice.selective_accuracy == pytest.approx(2 / 3)
    all_right = choose_threshold(p, [0, 0, 0, 0], target_accuracy=0.9, min_coverage=0.5)
    assert all_right.target_met and all_right.threshold == pytest.approx(0.525) and all_right.coverage == 1.0
    with pytest.raises(ValueError, match=r"target_accuracy 1\.5 must be in \[0, 1\]"):
        choose_threshold(p, [0, 0, 0, 0], target_accuracy=1.5, min_coverage=0.5)


def test_a_model_right_on_every_validation_slide_does_not_abstain_on_a_slightly_less_sure_one():
    # Sharpened validation confidences (temperature 0.5 on a model right on every slide): the cut
    # must not sit at the least confident of them, or a test slide at 0.999 would be indeterminate.
    p = np.array([[0.99995, 0.00005], [0.99998, 0.00002], [0.00003, 0.99997]])
    choice = choose_threshold(p, [0, 0, 1], target_accuracy=0.9, min_coverage=0.5)
    assert choice.coverage == 1.0 and choice.target_met
    assert 0.5 < choice.threshold < 0.99 + 1e-9 and choice.threshold == pytest.approx((0.5 + 0.99995) / 2)
