"""DICOM Microscopy Bulk Simple Annotations (ANN): region polygons and classifier tile centres.

One instance, series number 9003 (beside SEG 9001 and SR 9002), in the source's study and frame
of reference, built with ``highdicom.ann``.

Decisions:

- **3D coordinates** (Annotation Coordinate Type "3D", slide coordinate system, mm): the
  annotations are placed by the frame of reference, not tied to one pyramid level's pixel
  matrix, as the SEG and the heatmaps are.  Pixel positions become slide coordinates with the
  source's TotalPixelMatrixOrigin (top-left *corner* of pixel 1\\1, the reading of
  ``SourceSlide.plane_position``) and ImageOrientationSlide.  Float32 values
  (PointCoordinatesData): steps of about 2 nm at 20 mm from the origin.
- **One group per region class present** (POLYGON), coded like the SEG's segments: category SCT
  85756007 "Tissue", the class's own concept as property type, the same algorithm
  identification and the same Recommended Display CIELab Value.  The polygons are the GeoJSON's
  (same simplification), but an ANN POLYGON is one simple ring with no holes: a polygon with
  holes is cut by a vertical line through each hole into hole-free pieces that cover exactly
  the same area.  Each annotation carries its area (SCT 42798000 "Area", mm²).  None without a
  segmentation network (the result has no regions; the ANN draws no tissue outline either, as
  the SEG would not): then the QC and tile groups only, or no ANN.
- **One group per QC artefact kind present** (POLYGON, when slide QC ran): category
  GLIO-QC "Slide quality control", type the artefact's code (GLIO-QC-BLUR, -PEN, -DARK,
  -BUBBLE), from ``QcReport.artefact_map`` simplified like the regions, with each piece's Area.
- **Classifier tiles as POINTs** at each analysed tile's centre, one group per (head, class)
  holding the tiles whose most probable class of that head it is (so Slim colours the points by
  the tile's top class); each point carries the probabilities of every class of its head as
  measurements (the class's concept, UCUM "1").  Tiles with no tissue are not written.
- **No Specimen module**: the ANN IOD (PS3.3 A.87, as dicom3tools knows it) has none, and
  highdicom would copy the source's; it is left out of the source copies handed to highdicom,
  so dciodvfy sees no "Standard Extended SOP Class".  The SEG and SR name the specimen.
- A slide with no tissue and no tiles has nothing to annotate: no ANN is written (the Annotation
  Group Sequence is Type 1, at least one item).
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import shapely
from pydicom import Dataset
from pydicom.sr.codedict import codes
from shapely.geometry import LineString, MultiLineString, MultiPolygon, Polygon
from shapely.ops import split

from glio_node.coding import FALLBACK_DISPLAY_RGB, QC_CONCEPT, QC_DISPLAY_RGB, display_rgb
from glio_node.pipeline.polygonise import RegionPolygons, polygonise, simplify
from glio_node.results import AnalysisResult
from glio_node.writers import common
from glio_node.writers.common import SourceSlide, WrittenObject
from glio_node.writers.seg import SEGMENT_CATEGORY

ANN_SERIES_NUMBER = 9003
AREA = codes.SCT.Area  # (42798000, SCT, "Area")
SQUARE_MM = codes.UCUM.SquareMillimeter
NO_UNITS = codes.UCUM.NoUnits  # probabilities are ratios


def write_ann(
    source: SourceSlide, result: AnalysisResult, regions: RegionPolygons, out_dir: Path
) -> list[tuple[WrittenObject, Dataset]]:
    """Write the ANN instance into ``out_dir`` (none when there is nothing to annotate)."""
    algorithm = result.algorithm
    algorithm_id = common.algorithm_identification_sequence(algorithm)
    to_slide = _slide_transform(source)
    groups: list[hd.ann.AnnotationGroup] = []

    def uid(*parts: str) -> str:
        return common.derived_uid(source, algorithm, "ann", *parts)

    for region, polygons in zip(result.region_classes, regions.regions, strict=True):
        pieces = hole_free_pieces(polygons)
        if not pieces:
            continue
        rings = [np.asarray(p.exterior.coords)[:-1] * regions.mm_per_px for p in pieces]
        areas = np.array([p.area for p in pieces]) * regions.mm_per_px**2
        groups.append(
            hd.ann.AnnotationGroup(
                number=len(groups) + 1,
                uid=uid("group", "region", region.name),
                label=region.code_meaning[:64],
                annotated_property_category=SEGMENT_CATEGORY,
                annotated_property_type=common.coded(region),
                graphic_type=hd.ann.GraphicTypeValues.POLYGON,
                graphic_data=[to_slide(r) for r in rings],
                algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
                algorithm_identification=algorithm_id,
                measurements=[hd.ann.Measurements(AREA, areas, SQUARE_MM)],
                description=f"{region.code_meaning}: region polygons of {algorithm.name}"[:1024],
                display_color=hd.color.CIELabColor.from_rgb(*display_rgb(region)),
            )
        )
    qc = result.qc
    for value, artefact in enumerate(qc.artefact_classes if qc is not None else (), start=1):
        raster = qc.artefact_map
        mask = raster.array == value
        pieces = hole_free_pieces(simplify(polygonise(mask), regions.tolerance_px)) if mask.any() else []
        if not pieces:
            continue
        groups.append(
            hd.ann.AnnotationGroup(
                number=len(groups) + 1,
                uid=uid("group", "qc", artefact.name),
                label=f"QC: {artefact.code_meaning}"[:64],
                annotated_property_category=common.coded(QC_CONCEPT),
                annotated_property_type=common.coded(artefact),
                graphic_type=hd.ann.GraphicTypeValues.POLYGON,
                graphic_data=[to_slide(np.asarray(p.exterior.coords)[:-1] * raster.mm_per_px) for p in pieces],
                algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
                algorithm_identification=algorithm_id,
                measurements=[
                    hd.ann.Measurements(AREA, np.array([p.area for p in pieces]) * raster.mm_per_px**2, SQUARE_MM)
                ],
                description=f"{artefact.code_meaning}: slide QC found it; tiles over it were not used for the slide calls"[:1024],
                display_color=hd.color.CIELabColor.from_rgb(*QC_DISPLAY_RGB.get(artefact.name, FALLBACK_DISPLAY_RGB)),
            )
        )
    for heatmap in result.heatmaps:
        probs = heatmap.probabilities.array
        cell_mm = heatmap.probabilities.mm_per_px
        analysed = ~np.isnan(probs[..., 0])
        cells = np.argwhere(analysed)  # (row, col)
        values = probs[analysed]  # (tiles, classes)
        top = np.argmax(values, axis=1) if len(values) else np.zeros(0, int)
        for index, klass in enumerate(heatmap.classes):
            chosen = top == index
            if not chosen.any():
                continue
            centres_mm = (cells[chosen][:, ::-1] + 0.5) * cell_mm  # (x, y) from the corner
            groups.append(
                hd.ann.AnnotationGroup(
                    number=len(groups) + 1,
                    uid=uid("group", "tiles", heatmap.task, klass.name),
                    label=f"{klass.code_meaning} tiles"[:64],
                    annotated_property_category=SEGMENT_CATEGORY,
                    annotated_property_type=common.coded(klass),
                    graphic_type=hd.ann.GraphicTypeValues.POINT,
                    graphic_data=[to_slide(c[None, :]) for c in centres_mm],
                    algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
                    algorithm_identification=algorithm_id,
                    measurements=[
                        hd.ann.Measurements(common.coded(c), values[chosen, i].astype(np.float64), NO_UNITS)
                        for i, c in enumerate(heatmap.classes)
                    ],
                    description=(
                        f"Centres of the {heatmap.task} classifier's tiles whose most probable "
                        f"class is {klass.code_meaning}; measurements: the probability of each "
                        f"{heatmap.task} class"
                    )[:1024],
                )
            )
    if not groups:
        return []
    content_date, content_time = common.content_date_time()
    series_uid = common.derived_uid(source, algorithm, "ann", "series")
    sop_uid = common.derived_uid(source, algorithm, "ann", "instance")
    ann = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[_without_specimen(ds) for ds in source.datasets],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD3D,
        annotation_groups=groups,
        series_instance_uid=series_uid,
        series_number=ANN_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        **common.equipment(algorithm),
        content_description=common.content_description(algorithm),
        content_creator_name=common.content_creator_name(algorithm),
        content_label=common.content_label("GLIO_ANN"),
        contributing_equipment=common.contributing_equipment(algorithm),
        series_description=common.series_description(
            "region and tile annotations", "ANN", algorithm
        ),
        coding_schemes=common.coding_schemes(),
        **common.dated(content_date, content_time),
    )
    path = out_dir / f"ann-{sop_uid}.dcm"
    ann.save_as(path, enforce_file_format=True)
    written = WrittenObject(
        path=path,
        kind="ann",
        sop_class_uid=str(ann.SOPClassUID),
        sop_instance_uid=str(sop_uid),
        series_instance_uid=str(series_uid),
        series_number=ANN_SERIES_NUMBER,
    )
    return [(written, ann)]


def hole_free_pieces(geometry: MultiPolygon) -> list[Polygon]:
    """The polygons of ``geometry`` cut into pieces without holes, covering the same area.

    A vertical line through an interior point of every hole cuts that hole open; a piece can
    keep no hole whole, since every hole is crossed by its own line.
    """
    pieces: list[Polygon] = []
    for polygon in getattr(geometry, "geoms", []):
        if not polygon.interiors:
            pieces.append(polygon)
            continue
        _, y0, _, y1 = polygon.bounds
        xs = sorted({Polygon(h).representative_point().x for h in polygon.interiors})
        cutter = MultiLineString([LineString([(x, y0 - 1), (x, y1 + 1)]) for x in xs])
        for part in shapely.get_parts(split(polygon, cutter)):
            if isinstance(part, Polygon) and not part.is_empty and part.area > 0:
                if part.interiors:  # cannot happen (see docstring); never write a lost hole
                    raise ValueError("a polygon piece still has a hole after cutting")
                pieces.append(part)
    return pieces


# The Specimen module's root attributes (PS3.3 C.7.6.22), as in writers.common.
_SPECIMEN_ATTRIBUTES = (
    "ContainerIdentifier",
    "IssuerOfTheContainerIdentifierSequence",
    "AlternateContainerIdentifierSequence",
    "ContainerTypeCodeSequence",
    "ContainerDescription",
    "ContainerComponentSequence",
    "SpecimenDescriptionSequence",
)


def _without_specimen(ds: Dataset) -> Dataset:
    """A shallow copy of a source dataset without the Specimen module (see module docstring)."""
    copy = Dataset()
    for element in ds:
        if element.keyword not in _SPECIMEN_ATTRIBUTES:
            copy.add(element)
    return copy


def _slide_transform(source: SourceSlide):
    """(n, 2) mm offsets (x along columns, y along rows, from the matrix's top-left corner) ->
    (n, 3) slide coordinates (X, Y, Z) in mm."""
    o = np.array(source.origin_mm, dtype=np.float64)
    row_dir = np.array(source.image_orientation_slide[:3], dtype=np.float64)  # column index grows
    col_dir = np.array(source.image_orientation_slide[3:], dtype=np.float64)  # row index grows

    def to_slide(xy_mm: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy_mm, dtype=np.float64)
        return (o + xy[:, :1] * row_dir + xy[:, 1:2] * col_dir).astype(np.float32)

    return to_slide
