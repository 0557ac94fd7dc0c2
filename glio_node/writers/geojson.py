"""QuPath GeoJSON of one analysis: the same regions and tiles as the SEG and the heatmaps.

QuPath (0.4-0.6) opens DICOM WSI but none of our DICOM results; it imports GeoJSON (File >
Import objects, or drag the file onto the open slide).  So each job writes one FeatureCollection
beside the DICOM objects, from the same label map and heatmaps:

- **Coordinates**: QuPath's, i.e. pixels of the slide's base level (the total pixel matrix of
  the finest level), x to the right, y down, (0, 0) the top-left corner of the top-left pixel.
  A label-map pixel of ``mm_per_px`` spans ``mm_per_px / level-0 spacing`` level-0 pixels.
- **Annotations** (``objectType: "annotation"``): the tissue outline, then one (multi)polygon
  per region class present, holes kept, simplified (see
  ``glio_node.pipeline.polygonise.SIMPLIFY_TOLERANCE_PX``).  ``classification`` is the class's
  Code Meaning (QuPath's class name) and its display colour, the SEG's recommended display
  colour (``glio_node.coding.REGION_DISPLAY_RGB``).  Each carries its area in mm² and fraction of
  tissue as ``measurements``.  A bundle without a segmentation network has no regions: the
  tissue outline is then the tissue mask's (``AnalysisResult.tissue``, at its own spacing, which
  ``label_map_mm_per_px`` gives) and no region annotations follow.
- **QC artefacts** (annotations too, when slide QC ran and found any): one (multi)polygon per
  artefact kind of ``QcReport.artefact_map`` (out of focus, pen mark, fold or debris, air
  bubble), named "QC: <Code Meaning>", with its area in mm²; the tiles under them were left out
  of the slide calls.
- **Detections** (``objectType: "detection"``): one square per analysed classifier tile (the
  heatmap cells, no-tissue tiles left out), its per-class probabilities as ``measurements``
  named ``"<Code Meaning> probability"``; heads that share a tile grid share the detection.
- **Collection properties**: the slide calls with their probabilities, thresholds and calibration
  (whether temperature-scaled, and the temperature), the bundle
  (name, version, SHA-256, intended use), "AI-generated, research use only" (and the DEMO notice
  for a synthetic-data bundle), the slide QC verdict with its coded reasons and areas
  (``slide_qc``, ``QcReport.as_dict``; null with QC off), the source's Study/Series Instance UIDs (to match the file to its
  slide), the coordinate convention and the simplification tolerance.  QuPath ignores them on
  import; scripts and the vendor integrations read them.

Polygons are valid (``shapely.is_valid``); the test rasterises them back against the label map.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pydicom import Dataset
from shapely.geometry import MultiPolygon, Polygon, box

from glio_node import __version__
from glio_node.coding import FALLBACK_DISPLAY_RGB, QC_DISPLAY_RGB, TISSUE_DISPLAY_RGB, display_rgb
from glio_node.errors import BadInput
from glio_node.pipeline.polygonise import RegionPolygons, polygonise, simplify
from glio_node.results import AnalysisResult, Heatmap
from glio_node.writers.common import AI_NOTICE, DEMO_NOTICE

TISSUE_NAME = "Tissue"


@dataclass(frozen=True)
class PixelMatrix:
    """The slide's base level: the pixel grid QuPath's coordinates count in."""

    rows: int  # TotalPixelMatrixRows
    columns: int  # TotalPixelMatrixColumns
    row_spacing_mm: float  # PixelSpacing[0]: distance between rows (y)
    column_spacing_mm: float  # PixelSpacing[1]: distance between columns (x)

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.columns <= 0:
            raise ValueError(f"pixel matrix {self.rows}x{self.columns} is empty")
        if not (self.row_spacing_mm > 0 and self.column_spacing_mm > 0):
            raise ValueError(
                f"pixel spacing {self.row_spacing_mm}\\{self.column_spacing_mm} mm must be positive"
            )

    @classmethod
    def from_header(cls, ds: Dataset) -> "PixelMatrix":
        """From a base-level instance header; ``BadInput`` when it lacks size or spacing."""
        try:
            spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
            return cls(
                rows=int(ds.TotalPixelMatrixRows),
                columns=int(ds.TotalPixelMatrixColumns),
                row_spacing_mm=float(spacing[0]),
                column_spacing_mm=float(spacing[1]),
            )
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            raise BadInput(
                "the slide's base level has no TotalPixelMatrixRows/Columns or shared "
                "PixelSpacing: QuPath coordinates cannot be written; re-convert the slide"
            ) from None


def geojson_collection(
    result: AnalysisResult,
    regions: RegionPolygons,
    base: PixelMatrix,
    study_instance_uid: str,
    series_instance_uid: str,
) -> dict[str, Any]:
    """The FeatureCollection (a JSON-ready dict) described in the module docstring."""
    sx = regions.mm_per_px / base.column_spacing_mm
    sy = regions.mm_per_px / base.row_spacing_mm
    px_area_mm2 = regions.mm_per_px**2
    tissue_px = regions.tissue.area
    features = [
        _annotation(
            TISSUE_NAME, TISSUE_DISPLAY_RGB, _scaled(regions.tissue, sx, sy),
            {"Area mm^2": tissue_px * px_area_mm2},
        )
    ]
    for region, polygons in zip(result.region_classes, regions.regions, strict=True):
        if polygons.is_empty:
            continue
        features.append(
            _annotation(
                region.code_meaning,
                display_rgb(region),
                _scaled(polygons, sx, sy),
                {
                    "Area mm^2": polygons.area * px_area_mm2,
                    "Fraction of tissue": result.region_area_fraction.get(region.name, 0.0),
                },
            )
        )
    features.extend(_qc_annotations(result, base, regions.tolerance_px))
    for group in _tile_groups(result.heatmaps):
        features.extend(_detections(group, base))
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": _collection_properties(
            result, regions, base, study_instance_uid, series_instance_uid
        ),
    }


def write_geojson(
    result: AnalysisResult,
    regions: RegionPolygons,
    base: PixelMatrix,
    study_instance_uid: str,
    series_instance_uid: str,
    path: Path,
) -> Path:
    """Write the collection to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    collection = geojson_collection(result, regions, base, study_instance_uid, series_instance_uid)
    data = json.dumps(collection, separators=(",", ":"), allow_nan=False).encode("utf-8")
    atomic_write_bytes(Path(path), data)
    return Path(path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file beside ``path``, fsync, ``os.replace``, fsync the folder: a reader (QuPath, a
    watcher on a shared folder) sees the old file or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def geojson_file_name(series_instance_uid: str, algorithm_name: str) -> str:
    """``<series UID>-<bundle>.geojson``: one file per slide and bundle, stable across re-runs."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in algorithm_name)
    return f"{series_instance_uid}-{safe}.geojson"


def _scaled(geometry: MultiPolygon, sx: float, sy: float) -> MultiPolygon:
    return shapely.transform(geometry, lambda xy: xy * np.array([sx, sy]))


def _annotation(
    name: str, rgb: tuple[int, int, int], geometry: MultiPolygon, measurements: dict[str, float]
) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": json.loads(shapely.to_geojson(geometry)),
        "properties": {
            "objectType": "annotation",
            "name": name,
            "classification": {"name": name, "color": list(rgb)},
            "isLocked": True,
            "measurements": measurements,
        },
    }


def _qc_annotations(result: AnalysisResult, base: PixelMatrix, tolerance_px: float) -> list[dict[str, Any]]:
    """The QC artefact regions (module docstring), from the artefact map at its own spacing."""
    qc = result.qc
    if qc is None:
        return []
    raster = qc.artefact_map
    sx, sy = raster.mm_per_px / base.column_spacing_mm, raster.mm_per_px / base.row_spacing_mm
    features = []
    for value, artefact in enumerate(qc.artefact_classes, start=1):
        mask = raster.array == value
        if not mask.any():
            continue
        polygons = simplify(polygonise(mask), tolerance_px)
        features.append(
            _annotation(
                f"QC: {artefact.code_meaning}",
                QC_DISPLAY_RGB.get(artefact.name, FALLBACK_DISPLAY_RGB),
                _scaled(polygons, sx, sy),
                {"Area mm^2": float(mask.sum()) * raster.mm_per_px**2},
            )
        )
    return features


def _tile_groups(heatmaps: tuple[Heatmap, ...]) -> list[list[Heatmap]]:
    """Heatmaps on the same tile grid (same shape and cell size): one detection per tile."""
    groups: dict[tuple, list[Heatmap]] = {}
    for heatmap in heatmaps:
        raster = heatmap.probabilities
        key = (raster.array.shape[:2], round(raster.mm_per_px, 9))
        groups.setdefault(key, []).append(heatmap)
    return list(groups.values())


def _detections(group: list[Heatmap], base: PixelMatrix) -> list[dict[str, Any]]:
    cell_mm = group[0].probabilities.mm_per_px
    arrays = [h.probabilities.array for h in group]
    analysed = ~np.isnan(arrays[0][..., 0])
    names = [f"{c.code_meaning} probability" for h in group for c in h.classes]
    values = np.concatenate([a[analysed] for a in arrays], axis=1)  # (tiles, all classes)
    features = []
    for (row, col), probs in zip(np.argwhere(analysed), values):
        x0 = col * cell_mm / base.column_spacing_mm
        y0 = row * cell_mm / base.row_spacing_mm
        x1 = min((col + 1) * cell_mm / base.column_spacing_mm, base.columns)
        y1 = min((row + 1) * cell_mm / base.row_spacing_mm, base.rows)
        geometry: Polygon = box(x0, y0, x1, y1)
        features.append(
            {
                "type": "Feature",
                "geometry": json.loads(shapely.to_geojson(geometry)),
                "properties": {
                    "objectType": "detection",
                    "name": f"Tile {int(row)},{int(col)}",
                    "isLocked": True,
                    "measurements": {n: float(p) for n, p in zip(names, probs)},
                },
            }
        )
    return features


def _collection_properties(
    result: AnalysisResult,
    regions: RegionPolygons,
    base: PixelMatrix,
    study_instance_uid: str,
    series_instance_uid: str,
) -> dict[str, Any]:
    algorithm = result.algorithm
    notice = f"{DEMO_NOTICE}; {AI_NOTICE}" if algorithm.is_demo else AI_NOTICE
    calls = {
        c.task: {
            "call": c.call.code_meaning if c.call else "indeterminate",
            "threshold": c.threshold,
            "calibrated": c.calibrated,  # probabilities temperature-scaled with the bundle's fitted T
            "temperature": c.temperature if c.calibrated else 1.0,
            "probabilities": {
                k.code_meaning: (None if math.isnan(p) else p)
                for k, p in zip(c.classes, c.probabilities)
            },
        }
        for c in result.calls
    }
    return {
        "notice": notice,
        "research_use_only": True,
        "synthetic_demo": algorithm.is_demo,
        "generator": f"glio-node {__version__}",
        "bundle": {
            "name": algorithm.name,
            "version": algorithm.version,
            "sha256": algorithm.sha256,
            "intended_use": " ".join(algorithm.intended_use.split()),
        },
        "slide_calls": calls,
        "slide_qc": result.qc.as_dict() if result.qc is not None else None,
        "tissue_area_mm2": result.tissue_area_mm2,
        "study_instance_uid": study_instance_uid,
        "series_instance_uid": series_instance_uid,
        "coordinates": {
            "space": "level-0 pixels (total pixel matrix of the base level), x right, y down, "
            "(0, 0) = top-left corner of the top-left pixel",
            "level0_rows": base.rows,
            "level0_columns": base.columns,
            "level0_mm_per_px": [base.row_spacing_mm, base.column_spacing_mm],
            "label_map_mm_per_px": regions.mm_per_px,
            "simplify_tolerance_um": regions.tolerance_px * regions.mm_per_px * 1000,
        },
        "notes": list(result.notes),
        "source_gaps": list(result.source_gaps),
    }
