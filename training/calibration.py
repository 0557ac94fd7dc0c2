"""Calibration and abstention, chosen on the validation slides only.

Three pure pieces, each used on one head's slide-level probabilities (the mean of its tile
probabilities, exactly as the worker calls):

- :func:`fit_temperature`: temperature scaling (Guo et al., 2017).  One scalar ``T`` minimising
  the negative log-likelihood of ``softmax(log(p) / T)`` over the validation slides, found by a
  bounded 1-D search on ``log T``.  The worker applies it with
  :func:`glio_node.pipeline.calibration.calibrate`, the same function used here.
- :func:`expected_calibration_error`: top-label ECE with equal-width confidence bins (10 by
  default): the sample-weighted mean of |accuracy - mean confidence| over bins.
- :func:`choose_threshold`: the head's "indeterminate" threshold: the lowest cut on the top
  probability at which the validation slides called reach a target selective accuracy while at
  least a minimum fraction of them is still called, placed midway in the gap of confidences that
  calls exactly those slides (not on one slide's own confidence); :func:`coverage_accuracy` is
  the curve it walks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from glio_node.pipeline.calibration import calibrate

EPS = 1e-12


def _check(probabilities, truth) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(truth, dtype=np.int64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probabilities must be (n, n_classes) with one truth each, got {p.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"truth must be class indices in [0, {p.shape[1]}), got {sorted(set(y.tolist()))}")
    return p, y


def nll(probabilities, truth, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``truth`` under the probabilities calibrated with ``temperature``."""
    p, y = _check(probabilities, truth)
    q = calibrate(p, temperature)
    return float(-np.mean(np.log(np.clip(q[np.arange(len(y)), y], EPS, None))))


def fit_temperature(probabilities, truth, bounds: tuple[float, float] = (0.1, 10.0)) -> float:
    """The temperature in ``bounds`` that minimises :func:`nll` (bounded Brent search on log T).

    With separable validation slides the NLL keeps falling as T shrinks, and the fit ends at the
    lower bound: the bounds keep one lucky validation set from making the model arbitrarily sure.
    Raises ValueError for no slides or bounds that are not 0 < low < high.
    """
    p, y = _check(probabilities, truth)
    low, high = float(bounds[0]), float(bounds[1])
    if not 0.0 < low < high < math.inf:
        raise ValueError(f"temperature bounds {bounds!r} must satisfy 0 < low < high")
    if not len(y):
        raise ValueError("no validation slides to fit a temperature on")
    found = minimize_scalar(lambda log_t: nll(p, y, math.exp(log_t)), bounds=(math.log(low), math.log(high)),
                            method="bounded", options={"xatol": 1e-5})
    candidates = [math.exp(found.x), low, high]  # Brent never evaluates the ends themselves
    return min(candidates, key=lambda t: nll(p, y, t))


@dataclass(frozen=True)
class Reliability:
    """Equal-width confidence bins over [0, 1]: per bin the slide count, mean top probability and accuracy (NaN if empty)."""

    edges: np.ndarray  # (n_bins + 1,)
    counts: np.ndarray  # (n_bins,)
    confidence: np.ndarray  # (n_bins,)
    accuracy: np.ndarray  # (n_bins,)

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of count/n * |accuracy - confidence|; NaN with no samples."""
        n = self.counts.sum()
        if not n:
            return float("nan")
        seen = self.counts > 0
        return float(np.sum(self.counts[seen] / n * np.abs(self.accuracy[seen] - self.confidence[seen])))


def reliability(probabilities, truth, n_bins: int = 10) -> Reliability:
    """Top-label reliability bins: bin i holds the samples whose top probability is in
    (edges[i], edges[i+1]] (the first bin also holds 0)."""
    p, y = _check(probabilities, truth)
    if n_bins < 1:
        raise ValueError(f"n_bins {n_bins} must be at least 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = p.max(axis=1) if len(p) else np.zeros(0)
    right = (p.argmax(axis=1) == y) if len(p) else np.zeros(0, bool)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, weights=conf, minlength=n_bins) / counts
        accuracy = np.bincount(which, weights=right.astype(float), minlength=n_bins) / counts
    return Reliability(edges, counts, confidence, accuracy)


def expected_calibration_error(probabilities, truth, n_bins: int = 10) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins (see :class:`Reliability`)."""
    return reliability(probabilities, truth, n_bins).ece


def coverage_accuracy(probabilities, truth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, coverage, selective_accuracy)``, one point per distinct top probability,
    thresholds ascending: at threshold t the slides whose top probability >= t are called;
    coverage is their fraction, selective accuracy the fraction of them called right."""
    p, y = _check(probabilities, truth)
    conf = p.max(axis=1)
    right = p.argmax(axis=1) == y
    thresholds = np.unique(conf)
    covered = conf[None, :] >= thresholds[:, None]
    n = covered.sum(axis=1)
    return thresholds, n / max(len(y), 1), (covered & right[None, :]).sum(axis=1) / np.maximum(n, 1)


@dataclass(frozen=True)
class ThresholdChoice:
    """The indeterminate threshold and what it gave on the set it was chosen on."""

    threshold: float  # the head's indeterminate_below, in [0, 1)
    coverage: float  # fraction of the slides called at that threshold
    selective_accuracy: float  # accuracy among the slides called
    target_met: bool  # False: no threshold reached target_accuracy at min_coverage (the most accurate one is kept)


def choose_threshold(probabilities, truth, target_accuracy: float, min_coverage: float) -> ThresholdChoice:
    """The lowest cut whose selective accuracy >= ``target_accuracy`` at coverage >=
    ``min_coverage``, placed midway between the validation confidence it starts at and the next
    lower one (or chance, ``1 / classes``, below the lowest), so the same validation slides are
    called but the cut does not sit on one slide's confidence; when none does, the threshold of highest selective accuracy among those
    keeping ``min_coverage`` (lowest on ties), with ``target_met`` False so the card says so.

    Candidates are the slides' own top probabilities (so the lowest one calls every slide), capped
    just below 1.0 (the manifest's bound).  Raises ValueError for no slides or targets outside [0, 1].
    """
    for name, value in (("target_accuracy", target_accuracy), ("min_coverage", min_coverage)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} {value!r} must be in [0, 1]")
    thresholds, coverage, accuracy = coverage_accuracy(probabilities, truth)
    if not len(thresholds):
        raise ValueError("no validation slides to choose a threshold on")
    keeps = coverage >= min_coverage - 1e-12
    keeps[0] = True  # the lowest candidate calls every slide: coverage 1 always qualifies
    meets = keeps & (accuracy >= target_accuracy - 1e-12)
    i = int(np.argmax(meets)) if meets.any() else int(np.argmax(np.where(keeps, accuracy, -1.0)))
    # Every threshold in (below, thresholds[i]] calls the same validation slides; take the middle
    # of that gap, not its top end. The top end is one validation slide's own confidence: a model
    # right on every validation slide would then abstain on any new slide a hair less confident
    # than the least confident of them (seen on the demo: T = 0.5 made validation confidences
    # 0.9999+, a threshold of 0.9999 left a third of the test slides indeterminate).
    # Below the lowest candidate the gap reaches down to chance, 1 / classes.
    below = thresholds[i - 1] if i > 0 else 1.0 / np.asarray(probabilities).shape[1]
    threshold = min(0.5 * (below + thresholds[i]), thresholds[i])
    return ThresholdChoice(
        threshold=float(min(threshold, np.nextafter(1.0, 0.0))),
        coverage=float(coverage[i]),
        selective_accuracy=float(accuracy[i]),
        target_met=bool(meets.any()),
    )
