"""Heatmaps: integer Parametric Maps of per-tile class probabilities, overlaid by WSI viewers.

Layout: **one series per (head, class), one instance per series**, series number
``HEATMAP_SERIES_BASE[task] + class index`` (subtype 9010.., MGMT 9020.., EGFR 9030..).
dicom-microscopy-viewer's ``addParameterMappings`` takes the instances of one series as the
levels of one pyramid and throws when two instances have the same size without being a
concatenation, so several classes in one series would not load; a single instance carrying all
classes as channels would need TILED_SPARSE and per-frame mappings, which highdicom allows but
no viewer here was checked with. Every class gets its map, including both classes of two-class
heads (MGMT, EGFR): the records do not say which class is "positive", and a grid of a few hundred
tiles per class costs kilobytes.

Pixel data: ``uint16`` (PixelData, never FloatPixelData, which Orthanc 1.10 DICOMweb does not
serve). Stored value ``round(p * 65535)``; the Real World Value Mapping maps stored 0..65535
linearly to probability 0..1 (slope 1/65535), so a reader's default real-world transform (e.g.
highdicom's) gives probabilities directly. **Tiles that were not analysed (NaN: no tissue) are
stored as 0**, i.e. read as probability 0; the SEG says which tiles hold tissue. A reserved
"not analysed" value outside the mapped range was tried and dropped: highdicom's default read
raises on stored values outside First/Last Value Mapped, and the viewer colours it like 0 anyway.

Geometry: the grid's own spacing (``mm_per_px``), TILED_SPARSE with every frame present (each
with its Plane Position (Slide); dciodvfy does not accept a TILED_FULL Parametric Map without
per-frame functional groups, and dicom-microscopy-viewer notes TILED_FULL "is not defined for
Parametric Map"), tiles of the source's tile size,
origin = the slide's TotalPixelMatrixOrigin at pixel 1\\1 (corner reading, see
``SourceSlide.plane_position``), same study and frame of reference as the slide.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from pydicom import Dataset

from glio_node.results import AnalysisResult, CodedClass, Heatmap
from glio_node.writers import common
from glio_node.writers.common import SourceSlide, WrittenObject
from glio_node.writers.seg import check_raster_geometry

STORED_MAX = 65535  # stored value of probability 1; 0 is probability 0 (and not analysed)
QUANTISATION = STORED_MAX  # probability step 1/65535
PROBABILITY_CONCEPT = codes.DCM.Probability  # (122157, DCM, "Probability")
_TASK_ABBREVIATION = {"subtype": "SUB", "mgmt": "MGMT", "egfr": "EGFR", "segmentation": "REG"}


def quantise(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities (NaN = not analysed) -> uint16 stored values, see the module docstring."""
    p = np.nan_to_num(np.asarray(probabilities, dtype=np.float64), nan=0.0)
    return np.rint(np.clip(p, 0.0, 1.0) * QUANTISATION).astype(np.uint16)


def dequantise(stored: np.ndarray) -> np.ndarray:
    """uint16 stored values -> probabilities (what the Real World Value Mapping says)."""
    return np.asarray(stored, dtype=np.float64) / QUANTISATION


def write_heatmaps(
    source: SourceSlide, result: AnalysisResult, out_dir: Path
) -> list[tuple[WrittenObject, Dataset]]:
    """Write one Parametric Map per class of every heatmap in ``result``.

    Raises ``ValueError`` when a heatmap's shape disagrees with its classes or with the source
    geometry (a pipeline bug).
    """
    written = []
    for heatmap in result.heatmaps:
        array = heatmap.probabilities.array
        if array.ndim != 3 or array.shape[2] != len(heatmap.classes):
            raise ValueError(
                f"{heatmap.task} heatmap has shape {array.shape}; expected (rows, cols, "
                f"{len(heatmap.classes)}) for classes {[c.name for c in heatmap.classes]}"
            )
        if len(heatmap.classes) > common.MAX_CLASSES_PER_HEATMAP_HEAD:
            raise ValueError(
                f"{heatmap.task} heatmap has {len(heatmap.classes)} classes; series numbers allow "
                f"{common.MAX_CLASSES_PER_HEATMAP_HEAD}"
            )
        check_raster_geometry(source, heatmap.probabilities, f"{heatmap.task} heatmap")
        for index, cls in enumerate(heatmap.classes):
            written.append(_write_one(source, result, heatmap, index, cls, out_dir))
    return written


def _write_one(
    source: SourceSlide,
    result: AnalysisResult,
    heatmap: Heatmap,
    index: int,
    cls: CodedClass,
    out_dir: Path,
) -> tuple[WrittenObject, Dataset]:
    algorithm = result.algorithm
    task = heatmap.task
    spacing = heatmap.probabilities.mm_per_px
    series_number = common.HEATMAP_SERIES_BASE[task] + index
    series_uid = common.derived_uid(source, algorithm, "heatmap", task, cls.name, "series")
    sop_uid = common.derived_uid(source, algorithm, "heatmap", task, cls.name, "instance")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=cls.name[:16] or f"class{index}",
        lut_explanation=f"Probability of {cls.code_meaning} ({task})"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0, STORED_MAX),
        slope=1.0 / QUANTISATION,
        intercept=0.0,
        quantity_definition=PROBABILITY_CONCEPT,
    )
    content_date, content_time = common.content_date_time()
    short = f"{_TASK_ABBREVIATION[task]}{index}"
    pmap = hd.pm.ParametricMap(
        source_images=[source.primary],
        further_source_images=source.further or None,
        pixel_array=quantise(heatmap.probabilities.array[:, :, index]),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        **common.equipment(algorithm),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            # One window, given as one-item lists: highdicom 0.28 stores a plain-string
            # explanation as list(str), one character per value ("p\\r\\o\\b..."), which
            # viewers then show as the window's name.
            hd.VOILUTTransformation(
                window_center=[STORED_MAX / 2],
                window_width=[STORED_MAX + 1],
                window_explanation=["probability 0..1"],
            )
        ],
        content_description=common.content_description(algorithm),
        content_creator_name=common.content_creator_name(algorithm),
        content_label=common.content_label(f"GLIO_{short}"),
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(spacing, spacing), slice_thickness=source.slice_thickness_mm
        ),
        plane_orientation=source.plane_orientation(),
        plane_positions=[source.plane_position()],
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
        tile_pixel_array=True,
        tile_size=source.tile_size,
        series_description=common.series_description(
            f"P({cls.code_meaning}) {task} heatmap", short, algorithm
        ),
        coding_schemes=common.coding_schemes(),
        contributing_equipment=common.contributing_equipment(algorithm, common.stain_statement(algorithm)),
        **common.dated(content_date, content_time),
    )
    path = out_dir / f"heatmap-{task}-{index}-{sop_uid}.dcm"
    pmap.save_as(path, enforce_file_format=True)
    written = WrittenObject(
        path=path,
        kind="heatmap",
        sop_class_uid=str(pmap.SOPClassUID),
        sop_instance_uid=str(sop_uid),
        series_instance_uid=str(series_uid),
        series_number=series_number,
    )
    return written, pmap


OOD_STORED_PER_UNIT = 1000  # stored value of OOD score 1.0 (a typical training tile); step 0.001
OOD_CONCEPT = hd.sr.CodedConcept("OODSCORE", common.LOCAL_SCHEME, "Out-of-distribution score")


def quantise_ood(scores: np.ndarray) -> np.ndarray:
    """Tile OOD scores (NaN = not analysed) -> uint16: round(score * 1000), 0 where not analysed,
    capped at 65535 (score 65.5, far beyond any threshold)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)
    return np.rint(np.clip(s * OOD_STORED_PER_UNIT, 0, STORED_MAX)).astype(np.uint16)


def write_ood_map(source: SourceSlide, result: AnalysisResult, out_dir: Path) -> tuple[WrittenObject, Dataset] | None:
    """The tile out-of-distribution scores as one integer Parametric Map (series 9050), so a
    pathologist sees which regions were unlike the training slides; None without an OOD verdict.

    Same geometry and layout as the class heatmaps; the Real World Value Mapping gives the score
    (slope 1/1000), about 1 for a typical training tile; the window spans 0 to twice the slide
    threshold, so what passed the threshold shows bright.
    """
    verdict = result.ood
    if verdict is None:
        return None
    raster = verdict.tile_scores
    check_raster_geometry(source, raster, "OOD score map")
    algorithm = result.algorithm
    spacing = raster.mm_per_px
    series_number = common.OOD_MAP_SERIES_NUMBER
    series_uid = common.derived_uid(source, algorithm, "ood", "series")
    sop_uid = common.derived_uid(source, algorithm, "ood", "instance")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ood_score",
        lut_explanation=f"Out-of-distribution score of network {verdict.network}"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0, STORED_MAX),
        slope=1.0 / OOD_STORED_PER_UNIT,
        intercept=0.0,
        quantity_definition=OOD_CONCEPT,
    )
    width = max(2.0, 2 * verdict.slide_threshold * OOD_STORED_PER_UNIT)
    content_date, content_time = common.content_date_time()
    pmap = hd.pm.ParametricMap(
        source_images=[source.primary],
        further_source_images=source.further or None,
        pixel_array=quantise_ood(raster.array),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        **common.equipment(algorithm),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=[width / 2], window_width=[width], window_explanation=["OOD score 0..2x threshold"]
            )
        ],
        content_description=common.content_description(algorithm),
        content_creator_name=common.content_creator_name(algorithm),
        content_label=common.content_label("GLIO_OOD"),
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(spacing, spacing), slice_thickness=source.slice_thickness_mm
        ),
        plane_orientation=source.plane_orientation(),
        plane_positions=[source.plane_position()],
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
        tile_pixel_array=True,
        tile_size=source.tile_size,
        series_description=common.series_description("out-of-distribution score map", "OOD", algorithm),
        coding_schemes=common.coding_schemes(),
        contributing_equipment=common.contributing_equipment(algorithm, common.stain_statement(algorithm)),
        **common.dated(content_date, content_time),
    )
    path = out_dir / f"ood-{sop_uid}.dcm"
    pmap.save_as(path, enforce_file_format=True)
    written = WrittenObject(
        path=path,
        kind="heatmap",
        sop_class_uid=str(pmap.SOPClassUID),
        sop_instance_uid=str(sop_uid),
        series_instance_uid=str(series_uid),
        series_number=series_number,
    )
    return written, pmap
