"""A run folder and its model card carry PNG plots: loss per epoch and confusion matrices."""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.plots import plot_confusion, plot_history


def test_loss_curves_are_a_png_with_the_epochs_drawn(tmp_path):
    out = plot_history({"loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.7, 0.4], "learning_rate": [1e-3] * 3}, "regions", tmp_path / "m.png")
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert (image.std(axis=-1) > 30).any(), "no coloured line was drawn"


def test_a_confusion_matrix_png_shades_the_counts(tmp_path):
    cm = np.array([[9, 1], [0, 10]])
    out = plot_confusion(cm, ("methylated", "unmethylated"), "mgmt", tmp_path / "c.png")
    image = np.asarray(Image.open(out).convert("L"))
    assert image.min() < 100, "the large counts are shaded dark"


def test_a_reliability_diagram_draws_each_curve_against_the_diagonal(tmp_path):
    from training.plots import plot_reliability

    before = {"counts": [0] * 5 + [2, 0, 1, 0, 3], "confidence": [np.nan] * 5 + [0.55, np.nan, 0.75, np.nan, 0.97], "accuracy": [np.nan] * 5 + [0.5, np.nan, 1.0, np.nan, 0.67]}
    out = plot_reliability({"validation, before": before, "validation, after": before}, "mgmt", tmp_path / "r.png")
    image = np.asarray(Image.open(out).convert("RGB"))
    assert (image.std(axis=-1) > 30).any(), "no coloured curve was drawn"


def test_a_coverage_accuracy_curve_marks_the_chosen_threshold(tmp_path):
    from training.plots import plot_coverage_accuracy

    curve = {"threshold": [0.5, 0.7, 0.9], "coverage": [1.0, 0.66, 0.33], "selective_accuracy": [0.66, 1.0, 1.0]}
    out = plot_coverage_accuracy({"validation": curve, "test (scored once)": curve}, 0.7, "mgmt", tmp_path / "c.png")
    image = np.asarray(Image.open(out).convert("RGB"))
    assert (image.std(axis=-1) > 30).any() and image.min() < 50, "coloured curves and a black mark"
