"""Put tile predictions back together into slide-sized outputs.

Segmentation uses centre-crop stitching (see ``tiling``): each tile writes only its centre, so
every pixel comes from one tile, far enough from that tile's edge for the network to have seen
its context, and there is no seam to blend.  The only slide-sized array is the label map
(uint8, 1 byte per analysed pixel).

Classifier tiles fill one heatmap cell each; slide-level probabilities are the mean over the
tiles analysed, and a call is made only when the top probability reaches the head's threshold.
"""

from __future__ import annotations

import numpy as np

from glio_node.pipeline.calibration import calibrate
from glio_node.pipeline.tiling import TileGrid
from glio_node.results import NOT_TISSUE, CodedClass, SlideCall, Task


class SegmentationStitcher:
    """Label map over the raster; cells never given stay ``NOT_TISSUE``."""

    def __init__(self, grid: TileGrid):
        self.grid = grid
        self.label_map = np.full((grid.raster_rows, grid.raster_cols), NOT_TISSUE, dtype=np.uint8)

    def add(self, row: int, col: int, labels: np.ndarray) -> None:
        """Write tile (row, col)'s class indices (tile_size x tile_size) into the label map."""
        ts = self.grid.tile_size
        if labels.shape != (ts, ts):
            raise ValueError(f"tile labels must be {ts}x{ts}, got {labels.shape}")
        y0, x0, y1, x1 = self.grid.kept_region(row, col)
        oy, ox = self.grid.tile_origin(row, col)
        self.label_map[y0:y1, x0:x1] = labels[y0 - oy : y1 - oy, x0 - ox : x1 - ox]


class HeatmapStitcher:
    """Per-tile class probabilities on the classifier grid; NaN where no tile was analysed."""

    def __init__(self, grid: TileGrid, n_classes: int):
        self.grid = grid
        self.probabilities = np.full((grid.rows, grid.cols, n_classes), np.nan, dtype=np.float32)

    def add(self, row: int, col: int, probabilities: np.ndarray) -> None:
        self.probabilities[row, col] = probabilities

    def slide_probabilities(self) -> np.ndarray | None:
        """Mean over analysed tiles, or None when no tile was analysed."""
        return mean_tile_probabilities(self.probabilities)


def mean_tile_probabilities(probabilities: np.ndarray) -> np.ndarray | None:
    """Slide-level probabilities: the mean over tiles of (..., n_classes) tile probabilities,
    skipping NaN rows (tiles not analysed); None when no tile was analysed.

    A pure function so that training evaluates slide-level metrics exactly as the worker calls.
    """
    flat = probabilities.reshape(-1, probabilities.shape[-1])
    seen = ~np.isnan(flat[:, 0])
    if not seen.any():
        return None
    return flat[seen].mean(axis=0)


def slide_call(
    task: Task,
    classes: tuple[CodedClass, ...],
    probabilities: np.ndarray | None,
    threshold: float,
    temperature: float | None = None,
) -> SlideCall:
    """The slide-level call: the most probable class if it reaches ``threshold``, else indeterminate.

    With a ``temperature`` (the head's, fitted on validation slides) the probabilities are
    calibrated first (:func:`glio_node.pipeline.calibration.calibrate`): the threshold was chosen
    on calibrated probabilities, and the call reports them.  None: not calibrated.
    """
    if probabilities is None:
        probs = tuple(float("nan") for _ in classes)
        return SlideCall(task=task, classes=classes, probabilities=probs, threshold=threshold, call=None, temperature=temperature)
    if temperature is not None:
        probabilities = calibrate(probabilities, temperature)
    probs = tuple(float(p) for p in probabilities)
    best = int(np.argmax(probabilities))
    call = classes[best] if probs[best] >= threshold else None
    return SlideCall(task=task, classes=classes, probabilities=probs, threshold=threshold, call=call, temperature=temperature)


def region_fractions(label_map: np.ndarray, classes: tuple[CodedClass, ...]) -> dict[str, float]:
    """Fraction of tissue pixels per class (0..1); all zeros when there is no tissue."""
    counts = np.zeros(256, np.int64)
    band = max(1, (1 << 16) // max(1, label_map.shape[1]))  # ~64 kpx at a time: bincount casts to int64
    for r0 in range(0, label_map.shape[0], band):
        counts += np.bincount(label_map[r0 : r0 + band].ravel(), minlength=256)
    tissue = counts[: len(classes)].sum()
    return {c.name: (float(counts[i]) / tissue if tissue else 0.0) for i, c in enumerate(classes)}
