"""Patient-level bootstrap confidence intervals of the held-out metrics (pure NumPy).

A test set of a few dozen patients gives a figure with a wide margin, and the reader must see
it.  Resampling is by patient, not by slide or tile: the slides and tiles of one patient are not
independent (one tumour, one staining batch), so drawing them one by one would give intervals
that are too narrow.  Each resample draws as many patients as the set has, with replacement;
every slide of a drawn patient comes along (a patient drawn twice counts twice).  The interval is
the percentile interval (the 2.5th and 97.5th percentiles of the resampled metric for 95 %).

Resamples where a metric is undefined (an AUC with no positive slide, a class nobody drew) are
left out of that metric's percentiles; a metric undefined in every resample has ``None`` bounds.
Region metrics resample per-slide pixel confusion matrices, so a resample is a sum, not a
re-prediction.  Seeded: the same inputs and seed give the same intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from training.metrics import balanced_accuracy, confusion_matrix, macro_f1, matthews_corrcoef, per_class_metrics, roc_auc

N_RESAMPLES = 1000
LEVEL = 0.95


def patient_resamples(groups: Sequence[str], n_resamples: int = N_RESAMPLES, seed: int = 0) -> list[np.ndarray]:
    """Item indices of each resample: ``groups[i]`` is item i's patient; each resample draws the
    number of patients with replacement and takes all items of each drawn patient."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples {n_resamples} must be at least 1")
    groups = np.asarray(groups)
    patients = sorted(set(groups.tolist()))
    if not patients:
        raise ValueError("a bootstrap needs at least one patient")
    items = [np.flatnonzero(groups == p) for p in patients]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(patients), size=(n_resamples, len(patients)))
    return [np.concatenate([items[j] for j in row]) for row in draws]


def bootstrap(
    groups: Sequence[str], statistic: Callable[[np.ndarray], Mapping[str, float]],
    n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL,
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile interval of each metric ``statistic(indices)`` returns, over patient resamples."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level {level} must be between 0 and 1")
    values: dict[str, list[float]] = {}
    for idx in patient_resamples(groups, n_resamples, seed):
        for name, v in statistic(idx).items():
            values.setdefault(name, []).append(float(v))
    tail = (1 - level) / 2 * 100
    out: dict[str, tuple[float | None, float | None]] = {}
    for name, vs in values.items():
        finite = np.asarray(vs)[np.isfinite(vs)]
        out[name] = (float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))) if len(finite) else (None, None)
    return out


def _nest(flat: Mapping[str, tuple], class_names: Sequence[str]) -> dict:
    """{"accuracy": (lo, hi), "dice/necrosis": ...} -> {"accuracy": [lo, hi], "per_class": {"necrosis": {"dice": [lo, hi]}}}."""
    out: dict = {"per_class": {name: {} for name in class_names}}
    for key, (lo, hi) in flat.items():
        if "/" in key:
            metric, name = key.split("/", 1)
            out["per_class"][name][metric] = [lo, hi]
        else:
            out[key] = [lo, hi]
    return out


def _about(groups: Sequence[str], n_resamples: int, seed: int, level: float) -> dict:
    return {"unit": "patient", "method": "percentile", "n_patients": len(set(groups)), "n_resamples": n_resamples, "seed": seed, "level": level}


def classification_intervals(
    truth: Sequence[int], probabilities: np.ndarray, groups: Sequence[str], class_names: Sequence[str],
    n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL,
) -> dict:
    """Intervals of slide-level accuracy, balanced accuracy and, per class, sensitivity,
    specificity and one-vs-rest ROC AUC, from each slide's truth, (N, C) probabilities and patient."""
    truth = np.asarray(truth, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(truth), len(class_names))
    calls = np.argmax(probabilities, axis=1)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        cm = confusion_matrix(truth[idx], calls[idx], len(class_names))
        per_class = per_class_metrics(cm)
        out = {"accuracy": np.trace(cm) / cm.sum(), "balanced_accuracy": balanced_accuracy(cm)}
        for c, name in enumerate(class_names):
            out[f"sensitivity/{name}"] = per_class["sensitivity"][c]
            out[f"specificity/{name}"] = per_class["specificity"][c]
            out[f"roc_auc/{name}"] = roc_auc(truth[idx] == c, probabilities[idx, c])
        return out

    return _nest(bootstrap(groups, statistic, n_resamples, seed, level), class_names) | {"bootstrap": _about(groups, n_resamples, seed, level)}


def confusion_intervals(
    confusions: np.ndarray, groups: Sequence[str], class_names: Sequence[str],
    n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL,
) -> dict:
    """Intervals of the metrics of a pooled confusion matrix (pixels of a segmentation, tiles of a
    classifier): accuracy, balanced accuracy, mean Dice (classes present in the truth), macro-F1,
    MCC and per-class Dice, sensitivity and specificity.  ``confusions`` is (N, C, C), one matrix
    per slide, ``groups`` each slide's patient; a resample sums its slides' matrices."""
    confusions = np.asarray(confusions, dtype=np.int64)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        cm = confusions[idx].sum(axis=0)
        per_class = per_class_metrics(cm)
        present = cm.sum(axis=1) > 0
        out = {
            "accuracy": np.trace(cm) / cm.sum() if cm.sum() else np.nan,
            "balanced_accuracy": balanced_accuracy(cm),
            "mean_dice": np.nanmean(per_class["dice"][present]) if present.any() else np.nan,
            "macro_f1": macro_f1(cm),
            "mcc": matthews_corrcoef(cm),
        }
        for c, name in enumerate(class_names):
            for metric in ("dice", "sensitivity", "specificity"):
                out[f"{metric}/{name}"] = per_class[metric][c]
        return out

    return _nest(bootstrap(groups, statistic, n_resamples, seed, level), class_names) | {"bootstrap": _about(groups, n_resamples, seed, level)}
