"""What an analysis produces, as plain frozen records: the hand-over from the pipeline to the writers.

Geometry convention (used by every raster here): a raster covers the source slide's total pixel
matrix from its top-left corner; raster pixel (row 0, column 0) has its top-left corner at the
top-left corner of the total pixel matrix, and each raster pixel is ``mm_per_px`` wide and high.
So a raster with ``mm_per_px`` twice the source level's spacing has half its rows and columns
(rounded up: the last row/column may extend past the slide edge).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Task = Literal["segmentation", "subtype", "mgmt", "egfr"]


@dataclass(frozen=True)
class CodedClass:
    """One output class of a network head, with the coded concept that names it in DICOM."""

    name: str  # machine name, e.g. "cellular_tumor"
    code_value: str  # e.g. "6574001"
    coding_scheme_designator: str  # "SCT" or the local scheme "99GLIO"
    code_meaning: str  # human text shown by viewers, e.g. "Cellular tumor"


@dataclass(frozen=True)
class ModelOrigin:
    """A network of the bundle that we did not train: where it came from and under which licence."""

    network: str  # the bundle's network name, e.g. "regions"
    source: str  # free text given at import: maker, where and when obtained, version
    licence_name: str  # e.g. "Apache-2.0", or the licence text's title line
    licence_sha256: str  # SHA-256 of the licence text stored in the bundle


@dataclass(frozen=True)
class Algorithm:
    """The model bundle that produced a result: carried into every output and the audit trail."""

    name: str  # bundle name, e.g. "glio-demo"
    version: str  # bundle version, e.g. "0.1.0"
    sha256: str  # SHA-256 over the manifest and weights (bundle fingerprint)
    intended_use: str  # e.g. "DEMO model trained on synthetic slides. Research use only. Not for diagnosis."
    is_demo: bool  # True for bundles trained on synthetic data
    origins: tuple[ModelOrigin, ...] = ()  # imported networks' sources and licences, named in every output


@dataclass(frozen=True)
class Raster:
    """A 2-D (rows, cols) or 3-D (rows, cols, channels) array over the slide; see module docstring."""

    array: np.ndarray
    mm_per_px: float

    def __post_init__(self) -> None:
        if self.array.ndim not in (2, 3):
            raise ValueError(f"raster must be 2-D or 3-D, got shape {self.array.shape}")
        if not self.mm_per_px > 0:
            raise ValueError(f"raster spacing must be positive, got {self.mm_per_px} mm/px")


@dataclass(frozen=True)
class SlideCall:
    """A slide-level call of one classifier head.

    ``call`` is None when the top probability is below ``threshold``: the call is then
    "indeterminate" and the writers say so, never a silent guess.
    """

    task: Task
    classes: tuple[CodedClass, ...]
    probabilities: tuple[float, ...]  # slide-level probability per class, same order as classes
    threshold: float
    call: CodedClass | None
    # Aggregator heads (two-stage tasks, docs/model-bundle.md): how many fold models were
    # averaged, their spread (max - min of the top class's probability across folds), the
    # head's limit, and why the call is indeterminate ("low_probability" | "fold_disagreement").
    folds: int = 1
    fold_spread: float | None = None
    max_fold_spread: float | None = None
    indeterminate_reason: str | None = None


@dataclass(frozen=True)
class AttentionMap:
    """One aggregator head's attention on its encoder's tile grid.

    ``weights.array`` is (grid_rows, grid_cols) float32, softmax weights over the bag (they sum
    to 1 over the analysed tiles; the mean over folds for an ensemble); tiles not in the bag hold NaN.
    """

    task: Task
    network: str  # the aggregator network's name
    weights: Raster


@dataclass(frozen=True)
class Heatmap:
    """Per-tile probabilities of one classifier head on its tile grid.

    ``probabilities.array`` has shape (grid_rows, grid_cols, n_classes); tiles that were not
    analysed (no tissue) hold NaN.
    """

    task: Task
    classes: tuple[CodedClass, ...]
    probabilities: Raster


@dataclass(frozen=True)
class AnalysisResult:
    """Everything the writers need besides the source slide's own metadata."""

    algorithm: Algorithm
    region_classes: tuple[CodedClass, ...]  # index i is label value i in label_map
    label_map: Raster  # uint8 (rows, cols): class index per pixel, 255 = not tissue
    tissue_area_mm2: float
    region_area_fraction: dict[str, float]  # class name -> fraction of tissue area (0..1)
    heatmaps: tuple[Heatmap, ...]
    calls: tuple[SlideCall, ...]
    notes: tuple[str, ...] = field(default=())  # warnings to carry into the report
    # What of the source never arrived and was read as glass (not analysed); empty when whole.
    # The SR says so in a coded evaluation, so a partial answer never looks like a whole one.
    source_gaps: tuple[str, ...] = field(default=())
    attention_maps: tuple[AttentionMap, ...] = field(default=())  # one per aggregator head

NOT_TISSUE = 255
