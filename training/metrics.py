"""Evaluation metrics per class, at tile (or pixel) level and at slide level.

Pure NumPy on label arrays, so the same code scores a validation epoch, a cross-validation fold and
a bundle's manifest.  Slide-level scores aggregate tiles with the worker's own functions
(:func:`glio_node.pipeline.stitch.mean_tile_probabilities` and ``slide_call``), so a reported
slide accuracy is the accuracy of the calls the worker will write into its SR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from glio_node.pipeline.stitch import mean_tile_probabilities


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = truth, columns = prediction.  Labels outside
    0..n_classes-1 (e.g. 255 for glass in a label map) are ignored."""
    t = np.asarray(y_true).ravel().astype(np.int64)
    p = np.asarray(y_pred).ravel().astype(np.int64)
    keep = (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_classes)
    return np.bincount(t[keep] * n_classes + p[keep], minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (a metric that is undefined is not 0 or 1)."""
    num, den = num.astype(np.float64), den.astype(np.float64)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def per_class_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, precision, accuracy, F1, Dice and IoU per class from a confusion
    matrix.  F1 and Dice are the same number; both are reported because both names are used."""
    cm = np.asarray(cm, dtype=np.int64)
    total = cm.sum()
    tp = np.diag(cm)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = total - tp - fn - fp
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "accuracy": _ratio(tp + tn, np.full_like(tp, total)),
        "f1": f1,
        "dice": f1,
        "iou": _ratio(tp, tp + fp + fn),
    }


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean sensitivity over the classes present in the truth (NaN when none is)."""
    cm = np.asarray(cm, dtype=np.int64)
    present = cm.sum(axis=1) > 0
    return float(np.mean(np.diag(cm)[present] / cm.sum(axis=1)[present])) if present.any() else float("nan")


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes present in the truth or the prediction (a class absent from both
    has no F1 and does not count)."""
    f1 = per_class_metrics(cm)["f1"]
    return float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")


def matthews_corrcoef(cm: np.ndarray) -> float:
    """Multi-class Matthews correlation coefficient (Gorodkin's R_K) of a confusion matrix: 1
    perfect, 0 no better than chance; 0 when truth or prediction is a single class (as
    scikit-learn does); NaN for an empty matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    s = cm.sum()
    if s == 0:
        return float("nan")
    t, p, c = cm.sum(axis=1), cm.sum(axis=0), np.trace(cm)
    den = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / den) if den > 0 else 0.0


def roc_auc(y_true_binary: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half); NaN if one class is absent."""
    t = np.asarray(y_true_binary).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average rank of each value (ties share the mean of their ranks, 1-based)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def one_vs_rest_auc(y_true: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """ROC AUC of each class against the rest, from (N, C) probabilities."""
    probabilities = np.asarray(probabilities)
    return np.array([roc_auc(np.asarray(y_true) == c, probabilities[:, c]) for c in range(probabilities.shape[1])])


def classification_report(y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """Everything for one classifier head from (N,) true labels and (N, C) probabilities."""
    n = len(class_names)
    cm = confusion_matrix(y_true, np.argmax(probabilities, axis=1), n)
    per_class = per_class_metrics(cm)
    auc = one_vs_rest_auc(y_true, probabilities)
    return {
        "n": int(cm.sum()),
        "accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else float("nan"),
        "balanced_accuracy": balanced_accuracy(cm),
        "confusion_matrix": cm.tolist(),
        "per_class": {name: {k: float(v[i]) for k, v in per_class.items()} | {"roc_auc": float(auc[i])} for i, name in enumerate(class_names)},
    }


def segmentation_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """Pixel-level report of a segmentation (label maps; 255 = not scored)."""
    return segmentation_report_from_confusion(confusion_matrix(y_true, y_pred, len(class_names)), class_names)


def segmentation_report_from_confusion(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """:func:`segmentation_report` of a pixel confusion matrix: cross-validation pools the folds'
    matrices (every pixel is validated once) and scores the sum."""
    cm = np.asarray(cm, dtype=np.int64)
    per_class = per_class_metrics(cm)
    present = cm.sum(axis=1) > 0
    dice = per_class["dice"]
    return {
        "n": int(cm.sum()),
        "accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else float("nan"),
        "mean_dice": float(np.nanmean(dice[present])) if present.any() else float("nan"),
        "macro_f1": macro_f1(cm),
        "mcc": matthews_corrcoef(cm),
        "confusion_matrix": cm.tolist(),
        "per_class": {name: {k: float(v[i]) for k, v in per_class.items()} for i, name in enumerate(class_names)},
    }


def slide_level_report(
    tile_probabilities: Mapping[str, np.ndarray], slide_truth: Mapping[str, int], class_names: Sequence[str]
) -> dict:
    """Slide-level report: each slide's tiles (T, C) are averaged exactly as the worker does, then
    scored like tiles.  Slides with no tile are left out and counted under ``slides_without_tiles``."""
    ids, truth, probs, empty = [], [], [], []
    for slide_id, tiles in sorted(tile_probabilities.items()):
        mean = mean_tile_probabilities(np.asarray(tiles, dtype=np.float64))
        if mean is None:
            empty.append(slide_id)
            continue
        ids.append(slide_id)
        truth.append(slide_truth[slide_id])
        probs.append(mean)
    report = classification_report(np.array(truth), np.array(probs).reshape(len(probs), len(class_names)), class_names)
    report["slides_without_tiles"] = empty
    # Each slide's truth and mean probabilities: cross-validation pools them over folds (ROC AUC
    # cannot be pooled from confusion matrices).  Slide ids only, no patient data.
    report["slides"] = {i: {"truth": int(t), "probabilities": [float(v) for v in p]} for i, t, p in zip(ids, truth, probs)}
    return report
