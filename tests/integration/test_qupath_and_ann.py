"""A QuPath user and a Slim user see the same regions and tiles as the SEG and the heatmaps.

``glio-node analyze`` runs the demo bundle on synthetic slides (ours, and one converted by
OrthancWSIDicomizer, which has no frame of reference and a concatenated base level) and writes a
GeoJSON and a DICOM Microscopy Bulk Simple Annotations object beside SEG, SR and heatmaps.  The
checks go back to independent sources: the GeoJSON's polygons are rasterised and compared with
the SEG's label map as highdicom reads it, the tissue outline with the tissue the slide was
painted with, the detections with the SR-reported slide calls; the ANN's slide coordinates are
mapped back through the slide's own origin and orientation, and it passes dciodvfy.
"""

from __future__ import annotations

import contextlib
import io
import json
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import shapely
from dciodvfy import assert_valid
from orthanc_peer import Orthanc, free_port
from shapely.geometry import shape

from glio_node.bundle import load_manifest
from glio_node.cli import main
from glio_node.coding import REGION_CLASSES, display_rgb
from glio_node.pipeline.calibration import calibrate
from glio_node.results import NOT_TISSUE
from glio_node.synthetic.slide import SlideSpec
from glio_node.synthetic.textures import Signature

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "glio-demo"
pytestmark = pytest.mark.slow

SLIDE = SlideSpec(width_px=2048, height_px=1536, um_per_px=0.5, levels=3, seed=11,
                  signature=Signature(subtype=1, mgmt_methylated=True, egfr_amplified=False))


class Analysed:
    """One ``glio-node analyze --json`` run: its summary, GeoJSON, SEG and ANN, and the slide's
    base-level header (what QuPath counts pixels in)."""

    def __init__(self, files: list[Path], out: Path, truth_tissue, base_header: pydicom.Dataset):
        args = ["analyze", *map(str, files), "--out", str(out), "--models", str(DEMO), "--device", "cpu", "--json"]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(args) == 0
        self.summary = json.loads(printed.getvalue())
        self.geojson = json.loads(Path(self.summary["geojson"]).read_text())
        by_modality: dict[str, list[Path]] = {}
        for f in map(Path, self.summary["files"]):
            by_modality.setdefault(pydicom.dcmread(f, stop_before_pixels=True).Modality, []).append(f)
        self.seg = hd.seg.segread(next(f for f in by_modality["SEG"] if "level0" in f.name))
        [self.ann_path] = by_modality["ANN"]
        self.truth_tissue = truth_tissue
        self.base = base_header

    def seg_labels(self) -> tuple[np.ndarray, float]:
        """The SEG's level 0 as a label map (class index, NOT_TISSUE), and its mm/px."""
        segments = self.seg.get_total_pixel_matrix(combine_segments=True)
        labels = np.where(segments == 0, NOT_TISSUE, segments.astype(np.int64) - 1).astype(np.uint8)
        spacing = self.seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return labels, float(spacing[0])

    def level0_spacing(self) -> tuple[float, float]:
        row, col = self.base.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return float(row), float(col)


def _base_header(files: list[Path]) -> pydicom.Dataset:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    volumes = [h for h in headers if "TotalPixelMatrixColumns" in h and "VOLUME" in list(h.ImageType)]
    return max(volumes, key=lambda h: int(h.TotalPixelMatrixColumns))


@pytest.fixture(scope="module")
def ours(slide_cache, tmp_path_factory):
    slide = slide_cache.slide(SLIDE)
    return Analysed(list(slide.files), tmp_path_factory.mktemp("qupath"), slide.truth_tissue,
                    _base_header(list(slide.files)))


@pytest.fixture(scope="module")
def wsidicomizer(wsidicomizer_slide, tmp_path_factory):
    return Analysed([wsidicomizer_slide.folder], tmp_path_factory.mktemp("qupath-wsidicomizer"),
                    wsidicomizer_slide.truth_tissue, _base_header(sorted(wsidicomizer_slide.folder.glob("*.dcm"))))


@pytest.fixture(scope="module")
def orthanc(orthanc_slide, tmp_path_factory):
    return Analysed([orthanc_slide.folder], tmp_path_factory.mktemp("qupath-orthanc"),
                    orthanc_slide.truth_tissue, _base_header(sorted(orthanc_slide.folder.glob("*.dcm"))))


def rasterise(geometry, rows: int, cols: int) -> np.ndarray:
    """Pixel centres of a (rows, cols) raster inside ``geometry`` (in that raster's pixels)."""
    r, c = np.mgrid[:rows, :cols]
    return shapely.contains_xy(geometry, c + 0.5, r + 0.5)


def _to_label_px(geometry, run: Analysed, label_mm: float):
    """Level-0 pixel coordinates (the GeoJSON's) -> label-map pixels."""
    row_mm, col_mm = run.level0_spacing()
    return shapely.transform(geometry, lambda xy: xy * np.array([col_mm / label_mm, row_mm / label_mm]))


def _annotations(run: Analysed) -> dict[str, dict]:
    return {f["properties"]["name"]: f for f in run.geojson["features"] if f["properties"]["objectType"] == "annotation"}


@pytest.mark.parametrize("run", ["ours", "orthanc", "wsidicomizer"])
def test_the_geojson_regions_agree_with_the_seg_and_the_tissue_with_the_painted_slide(request, run):
    run = request.getfixturevalue(run)
    labels, label_mm = run.seg_labels()
    rows, cols = labels.shape
    annotations = _annotations(run)
    back = np.full(labels.shape, NOT_TISSUE, np.uint8)
    for index, region in enumerate(REGION_CLASSES):
        feature = annotations.get(region.code_meaning)
        if feature is None:
            assert not (labels == index).any(), f"{region.name} is in the SEG but not the GeoJSON"
            continue
        assert feature["properties"]["classification"] == {"name": region.code_meaning, "color": list(display_rgb(region))}
        geometry = shape(feature["geometry"])
        assert geometry.is_valid, shapely.is_valid_reason(geometry)
        back[rasterise(_to_label_px(geometry, run, label_mm), rows, cols)] = index
    tissue = labels != NOT_TISSUE
    agreement = float((back[tissue] == labels[tissue]).mean())
    assert agreement >= 0.98, agreement

    outline = shape(annotations["Tissue"]["geometry"])
    assert outline.is_valid
    drawn = rasterise(_to_label_px(outline, run, label_mm), rows, cols)
    assert (drawn == tissue).mean() >= 0.995  # the outline is the SEG's tissue
    painted = run.truth_tissue(label_mm * 1000)[:rows, :cols]
    drawn = drawn[: painted.shape[0], : painted.shape[1]]
    iou = (drawn & painted).sum() / (drawn | painted).sum()
    assert iou >= 0.93, iou  # 0.98 ours, 0.98 Orthanc, 0.96 wsidicomizer


def test_holes_are_kept_and_the_file_says_how_much_it_was_simplified(ours):
    coordinates = ours.geojson["properties"]["coordinates"]
    assert coordinates["simplify_tolerance_um"] == pytest.approx(1.0)  # half a px of the 2 µm/px label map
    assert coordinates["level0_columns"] == SLIDE.width_px and coordinates["level0_rows"] == SLIDE.height_px
    interiors = sum(
        len(p.interiors)
        for f in _annotations(ours).values()
        for p in getattr(shape(f["geometry"]), "geoms", [shape(f["geometry"])])
    )
    assert interiors > 0  # regions enclosing others keep them as holes


def test_classifier_tiles_are_detections_whose_mean_is_the_slide_call(ours):
    detections = [f for f in ours.geojson["features"] if f["properties"]["objectType"] == "detection"]
    [classifier] = [n for n in ours.summary["stats"]["networks"] if n["name"] != "regions"]
    assert len(detections) == classifier["tiles_inferred"] > 0
    measurements = [d["properties"]["measurements"] for d in detections]
    heads = {h.task: h for n in load_manifest(DEMO).networks for h in n.heads}
    for task, probabilities in ours.summary["probabilities"].items():
        classes = _classes(task)
        tile_p = np.array([[m[f"{c.code_meaning} probability"] for c in classes] for m in measurements])
        # The tiles are the network's own probabilities; the slide call is their mean, calibrated
        # with the head's temperature (fitted on validation) as the worker calls it.
        expected = calibrate(tile_p.mean(axis=0), heads[task].temperature or 1.0)
        assert [probabilities[c.name] for c in classes] == pytest.approx(list(expected), abs=1e-5)
    for d in detections:  # squares on the slide, inside its pixel matrix
        x0, y0, x1, y1 = shape(d["geometry"]).bounds
        assert 0 <= x0 < x1 <= SLIDE.width_px and 0 <= y0 < y1 <= SLIDE.height_px


def _classes(task: str):
    from glio_node.coding import CLASSES_BY_TASK

    return CLASSES_BY_TASK[task]


def test_the_collection_names_the_calls_the_bundle_and_says_research_use_only(ours):
    props = ours.geojson["properties"]
    assert "research use only" in props["notice"].lower() and props["notice"].startswith("DEMO")
    assert props["research_use_only"] is True and props["synthetic_demo"] is True
    assert props["bundle"]["sha256"] == ours.summary["bundle_sha256"]
    assert props["bundle"]["version"] == ours.summary["bundle_version"]
    assert {t: c["call"] for t, c in props["slide_calls"].items()} == ours.summary["calls"]
    assert props["series_instance_uid"] == ours.summary["series_instance_uid"]


def _slide_to_label_px(points: np.ndarray, base: pydicom.Dataset, label_mm: float) -> np.ndarray:
    """Slide coordinates (mm) -> label-map pixels, from the slide's own origin and orientation."""
    origin = base.TotalPixelMatrixOriginSequence[0]
    o = np.array([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)])
    cosines = np.array([float(v) for v in base.ImageOrientationSlide]).reshape(2, 3)[:, :2]  # rows: x dir, y dir
    mm = np.linalg.solve(cosines.T, (points[:, :2] - o).T).T  # (along columns, along rows) in mm
    return mm / label_mm


def test_the_ann_validates_is_coded_like_the_seg_and_lies_where_the_seg_does(ours):
    assert_valid(ours.ann_path)
    ann = hd.ann.annread(ours.ann_path)
    base = ours.base
    assert ann.StudyInstanceUID == base.StudyInstanceUID
    assert ann.FrameOfReferenceUID == base.FrameOfReferenceUID
    assert ann.AnnotationCoordinateType == "3D"
    assert "research use only" in ann.SeriesDescription.lower()
    labels, label_mm = ours.seg_labels()
    rows, cols = labels.shape
    segments = {s.SegmentLabel: s for s in ours.seg.SegmentSequence}
    back = np.full(labels.shape, NOT_TISSUE, np.uint8)
    point_groups = []
    for group in ann.get_annotation_groups():
        if group.graphic_type == hd.ann.GraphicTypeValues.POINT:
            point_groups.append(group)
            continue
        segment = segments[group.label]  # one group per region class, named like its segment
        assert group.annotated_property_type == segment.SegmentedPropertyTypeCodeSequence[0]
        assert group.annotated_property_category == segment.SegmentedPropertyCategoryCodeSequence[0]
        assert list(group.RecommendedDisplayCIELabValue) == list(segment.RecommendedDisplayCIELabValue)
        rings = group.get_graphic_data(hd.ann.AnnotationCoordinateTypeValues.SCOORD3D)
        pieces = shapely.union_all([shapely.Polygon(_slide_to_label_px(r, base, label_mm)) for r in rings])
        back[rasterise(pieces, rows, cols)] = int(segment.SegmentNumber) - 1
        names, areas, _ = group.get_measurements()
        assert names[0].meaning == "Area"
        assert areas.sum() * 1e6 == pytest.approx(pieces.area * (label_mm * 1e3) ** 2, rel=1e-3)  # µm²
    tissue = labels != NOT_TISSUE
    assert (back[tissue] == labels[tissue]).mean() >= 0.98

    # Tile centres: each analysed classifier tile once per head, in the group of its top class,
    # inside the GeoJSON detection of the same tile, with the same probabilities.
    detections = [f for f in ours.geojson["features"] if f["properties"]["objectType"] == "detection"]
    squares = [shape(d["geometry"]) for d in detections]
    subtype = [g for g in point_groups if "subtype" in g.label.lower()]
    assert sum(g.number_of_annotations for g in subtype) == len(detections)
    row_mm, col_mm = ours.level0_spacing()
    for group in subtype:
        names, values, units = group.get_measurements()
        assert units[0].value == "1"
        for point, probs in zip(group.get_graphic_data(hd.ann.AnnotationCoordinateTypeValues.SCOORD3D), values):
            x, y = _slide_to_label_px(point, base, label_mm)[0] * np.array([label_mm / col_mm, label_mm / row_mm])
            [d] = [d for d, sq in zip(detections, squares) if sq.contains(shapely.Point(x, y))]
            m = d["properties"]["measurements"]
            assert [m[f"{n.meaning} probability"] for n in names] == pytest.approx(list(probs), abs=1e-6)
            assert int(np.argmax(probs)) == [n.meaning for n in names].index(group.label.removesuffix(" tiles"))


def test_an_orthanc_slide_gets_an_ann_in_the_created_frame_of_reference(orthanc):
    assert_valid(orthanc.ann_path)
    ann = hd.ann.annread(orthanc.ann_path)
    assert "FrameOfReferenceUID" not in orthanc.base
    assert ann.FrameOfReferenceUID == orthanc.seg.FrameOfReferenceUID  # created, shared with the SEG
    assert orthanc.geojson["properties"]["coordinates"]["level0_columns"] == int(orthanc.base.TotalPixelMatrixColumns)


def test_a_wsidicomizer_slide_gets_an_ann_in_its_own_frame_of_reference(wsidicomizer):
    assert_valid(wsidicomizer.ann_path)
    ann = hd.ann.annread(wsidicomizer.ann_path)
    assert ann.FrameOfReferenceUID == wsidicomizer.base.FrameOfReferenceUID
    assert ann.StudyInstanceUID == wsidicomizer.base.StudyInstanceUID


@pytest.mark.needs("orthanc", "orthanc-dicomweb")
def test_orthanc_stores_the_ann_whole_but_its_dicomweb_metadata_keeps_one_coordinate(ours, tmp_path):
    """What docs/viewer.md says of Orthanc 1.10 (Debian): the instance is stored and served whole
    by WADO-RS, but the series metadata gives each PointCoordinatesData (OF) as a JSON "Value" of
    one float, which is what dicom-microscopy-viewer (Slim) reads the coordinates from."""
    ds = pydicom.dcmread(ours.ann_path)
    peer = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    try:
        request = urllib.request.Request(peer.url + "/instances", data=ours.ann_path.read_bytes(),
                                         method="POST", headers=peer.auth_headers())
        urllib.request.urlopen(request, timeout=30).read()
        base = f"{peer.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        request = urllib.request.Request(f"{base}/metadata", headers={**peer.auth_headers(), "Accept": "application/dicom+json"})
        [metadata] = json.loads(urllib.request.urlopen(request, timeout=30).read())
        request = urllib.request.Request(f"{base}/instances/{ds.SOPInstanceUID}",
                                         headers={**peer.auth_headers(), "Accept": 'multipart/related; type="application/dicom"'})
        retrieved = urllib.request.urlopen(request, timeout=30).read()
    finally:
        peer.stop()
    groups = metadata["006A0002"]["Value"]
    stored = [np.frombuffer(g.PointCoordinatesData, np.float32) for g in ds.AnnotationGroupSequence]
    served = [g["00660016"].get("Value", []) for g in groups]
    assert all(len(s) > 2 for s in stored)
    assert [len(v) for v in served] == [1] * len(stored)  # truncated to the first float
    assert all("BulkDataURI" not in g["00660016"] and "InlineBinary" not in g["00660016"] for g in groups)
    area = groups[0]["00660121"]["Value"][0]["00660132"]["Value"][0]["00660125"]  # FloatingPointValues
    assert len(area["Value"]) == 1 < int(ds.AnnotationGroupSequence[0].NumberOfAnnotations)
    assert ds.AnnotationGroupSequence[0].PointCoordinatesData in retrieved  # WADO-RS: the whole file
