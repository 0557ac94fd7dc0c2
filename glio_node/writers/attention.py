"""Attention maps: one integer Parametric Map per aggregator head (two-stage tasks).

The attention of an attention-MIL head is one softmax weight per tile of its encoder's grid
(they sum to 1 over the slide's tissue tiles).  Written like the heatmaps (writers/heatmap.py:
uint16 PixelData, TILED_SPARSE, the grid's own spacing, same study and frame of reference as
the slide; tiles outside the bag stored as 0), one series per head, series number
``ATTENTION_SERIES_NUMBER[task]`` (9051 subtype, 9052 MGMT, 9053 EGFR).

Scaling: weights are of the order 1/N, so a fixed 0..1 scale would leave a slide of 10,000
tiles black.  The slide's largest weight is stored as 65535: stored = round(w / w_max * 65535),
and the Real World Value Mapping (slope w_max / 65535, quantity 99GLIO ATTNWEIGHT "Attention
weight") gives the weight itself back.  The window spans the stored range, so a viewer shows
"where the call looked" relative to the slide's most attended tile.  The SR's call group lists
this instance among its source images.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from glio_node.coding import ATTENTION_WEIGHT
from glio_node.results import AnalysisResult, AttentionMap
from glio_node.writers import common
from glio_node.writers.common import SourceSlide, WrittenObject
from glio_node.writers.heatmap import STORED_MAX
from glio_node.writers.seg import check_raster_geometry

_TASK_ABBREVIATION = {"subtype": "SUB", "mgmt": "MGMT", "egfr": "EGFR"}


def quantise_attention(weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Attention weights (NaN = not in the bag) -> (uint16 stored values, the slope w_max / 65535)."""
    w = np.nan_to_num(np.asarray(weights, np.float64), nan=0.0).clip(min=0.0)
    top = float(w.max()) if w.size else 0.0
    if top <= 0.0:
        return np.zeros(w.shape, np.uint16), 1.0 / STORED_MAX
    return np.rint(w / top * STORED_MAX).astype(np.uint16), top / STORED_MAX


def write_attention_maps(source: SourceSlide, result: AnalysisResult, out_dir: Path) -> list[tuple[WrittenObject, Dataset]]:
    """One Parametric Map per attention map of ``result``; ValueError on a geometry mismatch (a pipeline bug)."""
    written = []
    for attention in result.attention_maps:
        if attention.weights.array.ndim != 2:
            raise ValueError(f"{attention.task} attention has shape {attention.weights.array.shape}; expected (rows, cols)")
        check_raster_geometry(source, attention.weights, f"{attention.task} attention map")
        written.append(_write_one(source, result, attention, out_dir))
    return written


def _write_one(source: SourceSlide, result: AnalysisResult, attention: AttentionMap, out_dir: Path):
    algorithm = result.algorithm
    task = attention.task
    spacing = attention.weights.mm_per_px
    stored, slope = quantise_attention(attention.weights.array)
    series_number = common.ATTENTION_SERIES_NUMBER[task]
    series_uid = common.derived_uid(source, algorithm, "attention", task, attention.network, "series")
    sop_uid = common.derived_uid(source, algorithm, "attention", task, attention.network, "instance")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="attention",
        lut_explanation=f"Attention weight of {attention.network} ({task})"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0, STORED_MAX),
        slope=slope,
        intercept=0.0,
        quantity_definition=common.coded(ATTENTION_WEIGHT),
    )
    content_date, content_time = common.content_date_time()
    short = f"{_TASK_ABBREVIATION[task]}ATT"
    pmap = hd.pm.ParametricMap(
        source_images=[source.primary],
        further_source_images=source.further or None,
        pixel_array=stored,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        **common.equipment(algorithm),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=[STORED_MAX / 2],
                window_width=[STORED_MAX + 1],
                window_explanation=["attention 0..max"],
            )
        ],
        content_description=common.content_description(algorithm),
        content_creator_name=common.content_creator_name(algorithm),
        content_label=common.content_label(f"GLIO_{short}"),
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=(spacing, spacing), slice_thickness=source.slice_thickness_mm),
        plane_orientation=source.plane_orientation(),
        plane_positions=[source.plane_position()],
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
        tile_pixel_array=True,
        tile_size=source.tile_size,
        series_description=common.series_description(f"{task} attention ({attention.network})", short, algorithm),
        coding_schemes=common.coding_schemes(),
        contributing_equipment=common.contributing_equipment(algorithm),
        **common.dated(content_date, content_time),
    )
    path = out_dir / f"attention-{task}-{sop_uid}.dcm"
    pmap.save_as(path, enforce_file_format=True)
    written = WrittenObject(
        path=path,
        kind="attention",
        sop_class_uid=str(pmap.SOPClassUID),
        sop_instance_uid=str(sop_uid),
        series_instance_uid=str(series_uid),
        series_number=series_number,
    )
    return written, pmap
