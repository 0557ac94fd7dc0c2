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
class ValidationEvidence:
    """A call's validation evidence: the bundle's test-set figure for that head (manifest [validation])."""

    metric: str  # e.g. "slide balanced accuracy"
    value: float
    ci_low: float | None  # patient-level bootstrap 95 % interval, when the manifest has it
    ci_high: float | None
    patients: int | None  # test patients


@dataclass(frozen=True)
class Algorithm:
    """The model bundle that produced a result: carried into every output and the audit trail."""

    name: str  # bundle name, e.g. "glio-demo"
    version: str  # bundle version, e.g. "0.1.0"
    sha256: str  # SHA-256 over the manifest and weights (bundle fingerprint)
    intended_use: str  # e.g. "DEMO model trained on synthetic slides. Research use only. Not for diagnosis."
    is_demo: bool  # True for bundles trained on synthetic data
    origins: tuple[ModelOrigin, ...] = ()  # imported networks' sources and licences, named in every output
    precision: str = "float32"  # compute dtype of the networks' bodies (softmax float32 always)
    # Per network: the stain normalisation applied to its tiles, method and reference, in words.
    normalizations: tuple[tuple[str, str], ...] = ()
    # Per classifier task: its test-set figure; a task not listed has "no test-set figure".
    test_evidence: tuple[tuple[str, ValidationEvidence], ...] = ()
    dataset: str = ""  # what the bundle was trained and tested on (from the manifest's provenance)


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
    # Why the call is indeterminate when it is not the threshold: the slide failed QC.
    indeterminate_reason: CodedClass | None = None
    temperature: float | None = None  # the temperature that calibrated ``probabilities``; None: not calibrated

    @property
    def calibrated(self) -> bool:
        """Whether ``probabilities`` were temperature-scaled (the bundle's head had a fitted temperature)."""
        return self.temperature is not None
    # True when the OOD gate withheld the call (call is then None): the slide is unlike the
    # bundle's training slides, so "indeterminate (out of distribution)", whatever the probabilities.
    out_of_distribution: bool = False
    # Aggregator heads (two-stage tasks, docs/model-bundle.md): how many fold models were
    # averaged, their spread (max - min of the top class's probability across folds), the
    # head's limit, and why the ensemble's call is indeterminate ("low_probability" |
    # "fold_disagreement"; None when it called a class).
    folds: int = 1
    fold_spread: float | None = None
    max_fold_spread: float | None = None
    fold_reason: str | None = None


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
class QcFinding:
    """One reason of a QC verdict: an artefact (with its area) or a slide-wide problem."""

    reason: CodedClass  # glio_node.coding QC_ARTEFACTS, QC_LOW_TISSUE or QC_ARTEFACT_EXTENT
    area_mm2: float  # the artefact's area; for too little tissue, the usable tissue's area
    severity: Literal["warn", "fail"]


@dataclass(frozen=True)
class QcReport:
    """The slide's quality-control verdict (glio_node.pipeline.qc).

    ``artefact_map`` is the hook for writers that draw artefact regions (GeoJSON, ANN): uint8 over
    the slide (see the module docstring's geometry), value ``i`` = ``artefact_classes[i - 1]``,
    0 = no artefact.  Tiles over artefacts were not used for slide calls; a "fail" verdict makes
    every call indeterminate.
    """

    verdict: Literal["pass", "warn", "fail"]
    findings: tuple[QcFinding, ...]
    artefact_classes: tuple[CodedClass, ...]
    artefact_map: Raster
    usable_tissue_mm2: float  # tissue minus artefacts
    tiles_assessed_for_focus: int  # tiles of the finest network with enough tissue to judge focus

    def as_dict(self) -> dict:
        """Plain JSON-able form (summary, store, status page): verdict, reasons, areas."""
        return {
            "verdict": self.verdict,
            "reasons": [
                {
                    "code": f.reason.code_value,
                    "name": f.reason.name,
                    "meaning": f.reason.code_meaning,
                    "area_mm2": round(f.area_mm2, 4),
                    "severity": f.severity,
                }
                for f in self.findings
            ],
            "usable_tissue_mm2": round(self.usable_tissue_mm2, 4),
        }


@dataclass(frozen=True)
class OodResult:
    """The out-of-distribution gate's verdict on one slide (glio_node/ood.py).

    ``tile_scores.array``: (grid_rows, grid_cols) score per tile of the gate network's grid,
    NaN where no tile was analysed; about 1 for a typical training tile.
    """

    network: str  # the bundle network whose features were scored
    slide_score: float | None  # median tile score; None when no tile was analysed
    slide_threshold: float  # fitted on validation slides: out above this ...
    out_of_distribution: bool
    tile_scores: Raster
    slide_threshold_low: float = 0.0  # ... or below this (feature collapse; 0: one-sided)


@dataclass(frozen=True)
class AnalysisResult:
    """Everything the writers need besides the source slide's own metadata.

    The regions (``label_map``, ``region_classes``, ``region_area_fraction``) come from the
    bundle's segmentation network; a bundle without one (an encoder and MIL heads, say) gives
    ``label_map`` and ``region_area_fraction`` None and no ``region_classes``: no SEG is written
    and the SR reports no region areas.  Raises ``ValueError`` when they are half there.
    """

    algorithm: Algorithm
    region_classes: tuple[CodedClass, ...]  # index i is label value i in label_map; () without regions
    label_map: Raster | None  # uint8 (rows, cols): class index per pixel, 255 = not tissue; None: no segmentation network
    tissue_area_mm2: float
    region_area_fraction: dict[str, float] | None  # class name -> fraction of tissue area (0..1); None: no regions
    heatmaps: tuple[Heatmap, ...]
    calls: tuple[SlideCall, ...]
    notes: tuple[str, ...] = field(default=())  # warnings to carry into the report
    # What of the source never arrived and was read as glass (not analysed); empty when whole.
    # The SR says so in a coded evaluation, so a partial answer never looks like a whole one.
    source_gaps: tuple[str, ...] = field(default=())
    qc: QcReport | None = None  # None when QC was switched off
    ood: OodResult | None = None  # the OOD gate's verdict, when the bundle has one
    attention_maps: tuple[AttentionMap, ...] = field(default=())  # one per aggregator head
    # The tissue mask (uint8, 1 = tissue) at its own spacing: the outline the GeoJSON draws when
    # there is no label map; None in results built without the pipeline's tissue detection.
    tissue: Raster | None = None

    def __post_init__(self) -> None:
        absent = (self.label_map is None, self.region_area_fraction is None, not self.region_classes)
        if len(set(absent)) != 1:
            raise ValueError(
                "label_map, region_area_fraction and region_classes come together from a segmentation "
                f"network; got label_map {'None' if absent[0] else 'set'}, region_area_fraction "
                f"{'None' if absent[1] else 'set'}, {len(self.region_classes)} region classes"
            )

    @property
    def has_regions(self) -> bool:
        """Whether the bundle's segmentation network drew a label map (a SEG is written)."""
        return self.label_map is not None

NOT_TISSUE = 255
