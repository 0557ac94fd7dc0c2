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
