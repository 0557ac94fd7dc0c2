"""Temperature scaling of slide-level probabilities (Guo et al., 2017).

A network's probabilities are often over- or under-confident.  Training fits one temperature
``T`` per classifier head on the validation slides (``training/calibration.py``) and stores it
in the bundle (``temperature`` of the head, docs/model-bundle.md); the worker applies it here,
before the head's "indeterminate" threshold, whose value was chosen on calibrated probabilities.

Calibration works on probabilities, not logits, so that every aggregator can call it on what it
produces: the mean of tile probabilities today, an attention-MIL head's softmax tomorrow.  The
log of a probability vector is a logit vector up to a constant, so
``softmax(log(p) / T) = p**(1/T) / sum(p**(1/T))``: T > 1 softens, T < 1 sharpens, T = 1 leaves
``p`` as it is, and the ranking of the classes never changes (the call stays the argmax).
"""

from __future__ import annotations

import math

import numpy as np

IDENTITY = 1.0


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float; ValueError unless it is a finite number > 0."""
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature {temperature!r} must be a finite number greater than 0")
    return t


def calibrate(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``probabilities`` (..., n_classes), each row summing to 1, scaled by ``temperature``.

    Returns float64 rows that sum to 1; at ``temperature == 1`` the input unchanged (as float64).
    A zero probability stays zero; a NaN row (nothing analysed) stays NaN.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    t = check_temperature(temperature)
    if t == IDENTITY:
        return p.copy()
    with np.errstate(divide="ignore"):
        scaled = np.log(np.clip(p, 0.0, None)) / t
    scaled -= np.max(scaled, axis=-1, keepdims=True)  # exp never overflows; the max class is exp(0)
    e = np.exp(scaled)
    return e / e.sum(axis=-1, keepdims=True)
