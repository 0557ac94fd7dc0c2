"""Every DICOM object glio-node writes, built with highdicom: SEG pyramid, heatmaps, SR, ANN.

``write_results(source, result, out_dir)`` is the one entry point; see ``common`` for series
numbers, UIDs and the missing-attribute policy, and ``seg``, ``heatmap``, ``sr``, ``ann`` for
each object.  ``geojson`` writes the QuPath file of the same run (not a DICOM object: the job
writes it beside these, from the same ``RegionPolygons``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from shapely.geometry import MultiPolygon

from glio_node.pipeline.polygonise import SIMPLIFY_TOLERANCE_PX, RegionPolygons, region_polygons
from glio_node.results import NOT_TISSUE, AnalysisResult
from glio_node.writers.ann import write_ann
from glio_node.writers.attention import write_attention_maps
from glio_node.writers.common import WrittenObject, WrittenObjects, prepare_source
from glio_node.writers.heatmap import write_heatmaps, write_ood_map
from glio_node.writers.seg import write_seg
from glio_node.writers.sr import write_sr

__all__ = ["WrittenObject", "WrittenObjects", "result_polygons", "write_results"]


def write_results(
    source: Sequence[pydicom.Dataset],
    result: AnalysisResult,
    out_dir: Path,
    regions: RegionPolygons | None = None,
) -> WrittenObjects:
    """Write the SEG pyramid, one Parametric Map per heatmap class, the attention and OOD maps,
    the SR and the ANN.  A result without regions (the bundle has no segmentation network) gets
    no SEG; the SR then reports no region areas and the ANN holds no region polygons.

    ``regions``: the label map as polygons (``result_polygons``), passed by a job that writes
    the GeoJSON from the same polygons; computed here when not given.

    ``source``: the datasets (pixel data not needed) of the analysed pyramid level, one instance
    or the parts of a concatenation. UIDs are derived from the source, the bundle and the kind of
    object, so re-running a job rewrites identical UIDs (same file names).

    Raises ``glio_node.errors.BadInput`` when the source cannot carry outputs (message names the
    missing attribute and the fix) and ``ValueError`` when ``result`` does not fit the source
    (a pipeline bug).
    """
    slide = prepare_source(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    segs = write_seg(slide, result, out_dir) if result.has_regions else []  # no segmentation network: no SEG
    heatmaps = write_heatmaps(slide, result, out_dir)
    keys = [(h.task, c.name) for h in result.heatmaps for c in h.classes]  # write_heatmaps' order
    heatmap_by_class = {key: dataset for key, (_, dataset) in zip(keys, heatmaps, strict=True)}
    attention = write_attention_maps(slide, result, out_dir)
    attention_by_task = {a.task: dataset for a, (_, dataset) in zip(result.attention_maps, attention, strict=True)}
    if regions is None:
        regions = result_polygons(result)
    anns = write_ann(slide, result, regions, out_dir)
    ood = write_ood_map(slide, result, out_dir)  # None when the bundle has no OOD gate
    sr = write_sr(
        slide, result, [ds for _, ds in segs], heatmap_by_class, out_dir,
        annotations=[ds for _, ds in anns], ood_map=ood[1] if ood else None, attention=attention_by_task,
    )
    return WrittenObjects(
        objects=(
            *(w for w, _ in segs), *(w for w, _ in heatmaps), *([ood[0]] if ood else []),
            *(w for w, _ in attention), sr, *(w for w, _ in anns),
        ),
        notes=slide.notes,
    )


def result_polygons(result: AnalysisResult) -> RegionPolygons:
    """The label map of ``result`` as simplified polygons (tissue outline and every class).

    Without a label map (no segmentation network): the tissue outline of ``result.tissue`` and
    no region classes; with neither, an empty outline."""
    if result.label_map is not None:
        return region_polygons(
            result.label_map.array, len(result.region_classes), result.label_map.mm_per_px, NOT_TISSUE
        )
    if result.tissue is not None:
        outline = np.where(np.asarray(result.tissue.array) > 0, 0, NOT_TISSUE).astype(np.uint8)
        return region_polygons(outline, 0, result.tissue.mm_per_px, NOT_TISSUE)
    return RegionPolygons(tissue=MultiPolygon(), regions=(), mm_per_px=1.0, tolerance_px=SIMPLIFY_TOLERANCE_PX)
