"""DICOM SEG of the region classes: a multi-resolution pyramid, one instance per level, one series.

Decisions:

- **Segments: every region class of the model**, segment number = class index + 1, whether or
  not the class occurs on this slide. Segment numbers then mean the same class on every slide
  and in every level (dicom-microscopy-viewer refuses a SEG series whose instances differ in
  their SegmentSequence), the SR can reference a segment for each class's area (0 % included),
  and an absent class costs nothing: empty frames are omitted.
- **BINARY, TILED_SPARSE, empty frames omitted.** TILED_FULL requires every frame of every
  segment to be present (PS3.3 C.7.6.17.3; highdicom refuses TILED_FULL with
  ``omit_empty_frames``), which for 10 mostly-absent classes multiplies the frames tenfold;
  TILED_SPARSE with per-frame Plane Position (Slide) is what dicom-microscopy-viewer maps by
  row/column position. Category: SCT 85756007 "Tissue" (CID 7150) for every class; the class's
  own concept is the segmented property type. Each segment's Recommended Display CIELab Value is
  the class's colour from ``glio_node.coding.REGION_DISPLAY_RGB``, the colour the ANN groups and
  the QuPath GeoJSON use too.
- **Pixel spacing**: level 0 is the label map at its own spacing (``label_map.mm_per_px``), which
  may be coarser than the source level: highdicom is given ``pixel_measures`` and a single plane
  position (the slide's origin at pixel 1\\1). Level k has spacing ``mm_per_px * 2**k`` and
  ``ceil(rows / 2**k)`` rows (the raster convention of ``glio_node.results``). Levels go down
  until a level fits in one tile.
- **Downsampling** is a block majority vote computed exactly from level 0 (2x2 sums of per-class
  counts, ties to "not tissue", then to the lower class index), not nearest-neighbour sampling:
  sampling one pixel per block would shift content by up to half a block toward the top-left.
- **Why not ``hd.seg.create_segmentation_pyramid``**: it requires level 0 to have exactly the
  source's total pixel matrix size (so a coarser label map would first have to be upsampled to the
  source level, gigabytes for a whole slide), and it sizes levels with ``int(n / f)`` and
  stretches the spacing to ``n / int(n / f)`` times the source's. The loop below builds the same
  thing level by level with ``hd.seg.Segmentation`` (one PyramidUID, one series, instance
  number = level + 1), with exact spacings.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from pydicom import Dataset

from glio_node.coding import display_rgb
from glio_node.results import NOT_TISSUE, AnalysisResult, Raster
from glio_node.writers import common
from glio_node.writers.common import SourceSlide, WrittenObject

SEGMENT_CATEGORY = codes.SCT.Tissue  # (85756007, SCT, "Tissue"), CID 7150


def write_seg(source: SourceSlide, result: AnalysisResult, out_dir: Path) -> list[tuple[WrittenObject, Dataset]]:
    """Write the SEG pyramid of ``result.label_map`` into ``out_dir``; return one entry per level.

    Raises ``ValueError`` when the label map does not fit the source geometry or holds values
    other than class indices and ``NOT_TISSUE`` (a pipeline bug, not bad input), or when the
    result has no label map (the bundle has no segmentation network: ``write_results`` writes
    no SEG then).
    """
    if result.label_map is None:
        raise ValueError("the result has no label map (no segmentation network): there is no SEG to write")
    algorithm = result.algorithm
    check_raster_geometry(source, result.label_map, "label map")
    n_classes = len(result.region_classes)
    if not 0 < n_classes < NOT_TISSUE:
        raise ValueError(f"{n_classes} region classes; a SEG carries 1..{NOT_TISSUE - 1}")
    label_map = np.asarray(result.label_map.array)
    values = _values_present(label_map)
    bad = [int(v) for v in values if v != NOT_TISSUE and not 0 <= v < n_classes]
    if bad:
        raise ValueError(f"label map holds {bad}; allowed: 0..{n_classes - 1} and {NOT_TISSUE}")

    algorithm_id = common.algorithm_identification_sequence(algorithm)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=index + 1,
            segment_label=region.code_meaning[:64],
            segmented_property_category=SEGMENT_CATEGORY,
            segmented_property_type=common.coded(region),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
            tracking_uid=common.derived_uid(source, algorithm, "seg", "segment", region.name),
            tracking_id=f"{algorithm.name} region {region.name}"[:64],
            display_color=hd.color.CIELabColor.from_rgb(*display_rgb(region)),
        )
        for index, region in enumerate(result.region_classes)
    ]
    series_uid = common.derived_uid(source, algorithm, "seg", "series")
    pyramid_uid = common.derived_uid(source, algorithm, "seg", "pyramid")
    content_date, content_time = common.content_date_time()
    tile = max(source.tile_size)
    written = []
    # Level 0 is written from the label map itself, then the coarse levels (a third of its
    # size) are computed: the two never coexist with an encoded level's frames.
    levels = contextlib.closing(_levels_as_segment_numbers(label_map, n_classes, tile))
    with levels as level_maps:  # closing restores the label map at once should a level fail
        for level, level_map in enumerate(level_maps):
            spacing = result.label_map.mm_per_px * 2**level
            sop_uid = common.derived_uid(source, algorithm, "seg", "instance", level)
            seg = hd.seg.Segmentation(
                source_images=[source.primary],
                further_source_images=source.further or None,
                pixel_array=level_map,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=series_uid,
                series_number=common.SEG_SERIES_NUMBER,
                sop_instance_uid=sop_uid,
                instance_number=level + 1,
                **common.equipment(algorithm),
                content_description=common.content_description(algorithm),
                content_creator_name=common.content_creator_name(algorithm),
                content_label=common.content_label("GLIO_REGIONS"),
                pixel_measures=hd.PixelMeasuresSequence(
                    pixel_spacing=(spacing, spacing),
                    slice_thickness=source.slice_thickness_mm,
                ),
                plane_orientation=source.plane_orientation(),
                plane_positions=[source.plane_position()],
                omit_empty_frames=True,
                dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
                tile_pixel_array=True,
                tile_size=source.tile_size,
                pyramid_uid=pyramid_uid,
                pyramid_label=f"{algorithm.name} regions"[:64],
                series_description=common.series_description("region classes", "SEG", algorithm),
                coding_schemes=common.coding_schemes(),
                contributing_equipment=common.contributing_equipment(algorithm),
                **common.dated(content_date, content_time),
            )
            # Patient Orientation (Type 2C, PS3.3 C.7.6.1) is not required of an image oriented on a
            # slide, but "may be present otherwise"; dicom3tools (2022) applies that exception to
            # VL WSI only and reports its absence from a slide SEG as an error.  highdicom has no
            # parameter for it, so it is added here, empty (unknown), to keep dciodvfy at zero errors.
            seg.PatientOrientation = ""
            path = out_dir / f"seg-level{level}-{sop_uid}.dcm"
            seg.save_as(path, enforce_file_format=True)
            # What the SR needs of a level is its header (UIDs, segments); its Pixel Data, the
            # encoded frames, is on disk now and would otherwise stay in memory until the SR is
            # written.  The header is a new Dataset sharing the elements, so the written SEG
            # itself is not changed.
            seg = _without_pixel_data(seg)
            written.append((
                WrittenObject(
                    path=path,
                    kind="seg",
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(sop_uid),
                    series_instance_uid=str(series_uid),
                    series_number=common.SEG_SERIES_NUMBER,
                ),
                seg,
            ))
    return written


def _levels_as_segment_numbers(label_map: np.ndarray, n_classes: int, tile: int) -> Iterator[np.ndarray]:
    """Each pyramid level with segment numbers for pixels (class i -> i + 1, ``NOT_TISSUE`` -> 0),
    as highdicom takes a BINARY label-map-style array.

    Level 0 is ``label_map`` itself, renumbered in place for as long as the caller works on it
    and restored (exactly: uint8 arithmetic wraps 255 + 1 to 0 and back) when the caller asks for
    the next level, or on an error or early exit: a renumbered copy would be one byte per
    label-map pixel, the largest temporary of the SEG.  A read-only label map is copied instead.
    The coarse levels are computed from the restored level 0 after it has been encoded, and
    renumbered in place (they are this function's own arrays).
    """
    if label_map.flags.writeable:
        _shift_in_bands(label_map, 1)
        try:
            yield label_map
        finally:
            _shift_in_bands(label_map, -1)
    else:
        yield label_map + np.uint8(1)
    for level_map in pyramid_levels(label_map, n_classes, tile)[1:]:
        _shift_in_bands(level_map, 1)
        yield level_map


def _shift_in_bands(a: np.ndarray, delta: int) -> None:
    """``a += delta`` (uint8, wrapping) in place, a megapixel of rows at a time (``+=`` on the
    whole array would make no copy either, but a band keeps the working set cache-sized)."""
    band = max(1, (1 << 20) // max(1, a.shape[1]))
    step = np.uint8(delta % 256)
    for r0 in range(0, a.shape[0], band):
        view = a[r0 : r0 + band]
        np.add(view, step, out=view)


def _without_pixel_data(seg: Dataset) -> Dataset:
    """A header of ``seg``: every element but Pixel Data (shared, not copied), and its file meta."""
    header = Dataset()
    for element in seg:
        if element.keyword != "PixelData":
            header.add(element)
    header.file_meta = seg.file_meta
    return header


def check_raster_geometry(source: SourceSlide, raster: Raster, what: str) -> None:
    """Raise ``ValueError`` unless ``raster`` covers the source's total pixel matrix.

    By the convention of ``glio_node.results`` a raster at ``mm_per_px`` has
    ``ceil(extent_mm / mm_per_px)`` rows and columns (one more tolerated for rounding).
    """
    row_mm = source.total_pixel_matrix_rows * source.pixel_spacing_mm[0]
    col_mm = source.total_pixel_matrix_columns * source.pixel_spacing_mm[1]
    rows, cols = raster.array.shape[:2]
    want = (row_mm / raster.mm_per_px, col_mm / raster.mm_per_px)
    ok = all(math.floor(w - 1e-6) <= n <= math.ceil(w - 1e-6) + 1 for n, w in zip((rows, cols), want))
    if not ok:
        raise ValueError(
            f"{what} of {rows}x{cols} px at {raster.mm_per_px} mm/px does not cover the source "
            f"level of {source.total_pixel_matrix_rows}x{source.total_pixel_matrix_columns} px at "
            f"{source.pixel_spacing_mm[0]} mm/px (expected about {want[0]:.1f}x{want[1]:.1f} px)"
        )


def pyramid_levels(label_map: np.ndarray, n_classes: int, tile: int) -> list[np.ndarray]:
    """Level 0 and its 2x block-majority downsamples, until a level fits within ``tile`` px.

    Each coarse pixel takes the label that covers most of its block of level-0 pixels (blocks
    past the raster edge count only their real pixels); ties go to ``NOT_TISSUE``, then to the
    lower class index.

    Worked in bands of level-0 rows a whole number of coarsest blocks high (about a megapixel
    each), so every block of every level lies in one band: the temporaries are band-sized and
    contiguous (the slide-sized arrays are the label map and the coarse levels, a third of it).
    """
    n_levels = 1
    rows, cols = label_map.shape
    while max(math.ceil(rows / 2 ** (n_levels - 1)), math.ceil(cols / 2 ** (n_levels - 1))) > tile:
        n_levels += 1
    if n_levels == 1:
        return [label_map]
    block = 2 ** (n_levels - 1)  # level-0 px per coarsest pixel, along each axis
    padded_cols = math.ceil(cols / block) * block
    band_rows = max(block, ((1 << 20) // padded_cols) // block * block)
    shapes = [(math.ceil(rows / 2**k), math.ceil(cols / 2**k)) for k in range(n_levels)]
    out = [np.empty(shape, np.uint8) for shape in shapes[1:]]
    buffer = np.full((band_rows, padded_cols), _PAD, np.uint8)
    for r0 in range(0, rows, band_rows):
        r1 = min(rows, r0 + band_rows)
        if r1 - r0 < band_rows:  # the last band: pad its rows up to whole coarsest blocks
            h = math.ceil((r1 - r0) / block) * block
            band = buffer[:h]
            band[:] = _PAD
        else:
            band = buffer
        band[: r1 - r0, :cols] = label_map[r0:r1]
        best_label: list[np.ndarray | None] = [None] * n_levels
        best_count: list[np.ndarray | None] = [None] * n_levels
        for label in (NOT_TISSUE, *range(n_classes)):
            equal = band == label
            if label != NOT_TISSUE and not equal.any():
                continue
            counts = _sum2x2(equal.view(np.uint8), np.uint8)
            for level in range(1, n_levels):
                if level > 1:
                    counts = _sum2x2(counts, np.uint16 if level <= 7 else np.uint32)
                if best_count[level] is None:
                    best_count[level] = counts.copy()
                    best_label[level] = np.full(counts.shape, label, dtype=np.uint8)
                else:
                    better = counts > best_count[level]
                    best_count[level][better] = counts[better]
                    best_label[level][better] = label
        for level in range(1, n_levels):
            f = 2**level
            y0, y1 = r0 // f, min(shapes[level][0], math.ceil(r1 / f))
            out[level - 1][y0:y1] = best_label[level][: y1 - y0, : shapes[level][1]]
    return [label_map, *out]


_PAD = NOT_TISSUE - 1  # band padding past the raster edge: never a class index (those stop at NOT_TISSUE - 2)


def _values_present(label_map: np.ndarray) -> np.ndarray:
    """The distinct values of a uint8 raster, a band of about a megapixel at a time (``np.unique``
    would sort a copy of the whole raster)."""
    seen = np.zeros(256, bool)
    band = max(1, (1 << 20) // max(1, label_map.shape[1]))
    for r0 in range(0, label_map.shape[0], band):
        seen |= np.bincount(label_map[r0 : r0 + band].ravel(), minlength=256).astype(bool)
    return np.flatnonzero(seen)


def _sum2x2(a: np.ndarray, dtype: type) -> np.ndarray:
    """2x2 block sums in ``dtype`` (wide enough for 4x the largest value); edge blocks sum
    only their real pixels."""
    rows, cols = a.shape
    out = a[0::2, 0::2].astype(dtype)
    out[: rows // 2] += a[1::2, 0::2]
    out[:, : cols // 2] += a[0::2, 1::2]
    out[: rows // 2, : cols // 2] += a[1::2, 1::2]
    return out
