"""PNG plots for a run folder and its model card: per-epoch metrics and confusion matrices.

Matplotlib (the ``train`` extra) draws off-screen (Agg backend): training machines have no
display.  Pure functions of numbers -> one PNG file each, so a test can check what is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: Mapping[str, Sequence[float]], title: str, out: Path) -> Path:
    """One line per metric over epochs (``loss`` next to ``val_loss``); the learning rate is left
    out (another scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, values in sorted(history.items()):
        if name == "learning_rate" or not len(values):
            continue
        ax.plot(np.arange(1, len(values) + 1), values, label=name, linestyle="--" if name.startswith("val_") else "-")
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_confusion(cm: np.ndarray, classes: Sequence[str], title: str, out: Path) -> Path:
    """Confusion matrix, rows = truth, columns = prediction, counts written in the cells."""
    plt = _pyplot()
    cm = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), [c[:18] for c in classes], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), [c[:18] for c in classes], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title, fontsize=9)
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=6, color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_reliability(curves: Mapping[str, Mapping[str, Sequence[float]]], title: str, out: Path) -> Path:
    """Reliability diagram: per curve (e.g. "validation, before"), each non-empty bin's mean top
    probability against its accuracy, marker area by slide count; the diagonal is perfect calibration.
    A curve is ``{"counts", "confidence", "accuracy"}`` as training.calibration.Reliability holds them."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1, label="perfectly calibrated")
    for name, curve in curves.items():
        counts = np.asarray(curve["counts"], dtype=float)
        seen = counts > 0
        conf = np.asarray(curve["confidence"], dtype=float)[seen]
        acc = np.asarray(curve["accuracy"], dtype=float)[seen]
        ax.plot(conf, acc, marker="o", linestyle="--" if "before" in name else "-", label=f"{name} ({int(counts.sum())} slides)")
        ax.scatter(conf, acc, s=12 + 40 * counts[seen] / max(counts.max(), 1), alpha=0.4)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("mean top-class probability (bin)")
    ax.set_ylabel("accuracy (bin)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_coverage_accuracy(curves: Mapping[str, Mapping[str, Sequence[float]]], threshold: float, title: str, out: Path) -> Path:
    """Selective accuracy against coverage as the threshold rises, one line per set (``{"coverage",
    "selective_accuracy"}``); the chosen threshold's point on each set is marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.0), dpi=100)
    for name, curve in curves.items():
        cov = np.asarray(curve["coverage"], dtype=float)
        acc = np.asarray(curve["selective_accuracy"], dtype=float)
        order = np.argsort(cov, kind="stable")
        ax.plot(cov[order], acc[order], marker="o", markersize=4, label=name)
        th = np.asarray(curve["threshold"], dtype=float)
        at = th >= threshold
        if at.any():
            i = int(np.argmax(at))
            ax.scatter([cov[i]], [acc[i]], s=60, marker="x", color="black")
    ax.set_xlim(-0.02, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("coverage (fraction of slides called)")
    ax.set_ylabel("selective accuracy (of those called)")
    ax.set_title(f"{title}; x: threshold {threshold:.2f}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
