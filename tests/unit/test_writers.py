"""The writers: every object reads back with highdicom, lands where it belongs, and passes dciodvfy.

Sources are tiny metadata-only VL WSI levels built by ``make_source`` below (no pixel data: the
writers never read it). Switch ``make_source`` to ``glio_node.synthetic.slide`` once its shared
fixtures exist; nothing else here depends on how the source was made.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid

from glio_node.errors import BadInput
from glio_node.results import (
    NOT_TISSUE,
    Algorithm,
    AnalysisResult,
    CodedClass,
    Heatmap,
    Raster,
    SlideCall,
)
from glio_node.writers import WrittenObjects, write_results
from glio_node.writers.heatmap import QUANTISATION

# tests/ is not a package: load the shared helper by path (registered so dataclasses work)
_spec = importlib.util.spec_from_file_location("tests_dciodvfy", Path(__file__).parents[1] / "dciodvfy.py")
dciodvfy = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("tests_dciodvfy", dciodvfy)
_spec.loader.exec_module(dciodvfy)
needs_dciodvfy = pytest.mark.needs("dciodvfy")

SPACING = 0.0005  # source level: 0.5 µm/px
ROWS, COLS, TILE = 300, 500, 64
ORIGIN = (2.0, 20.0)  # X, Y of the top-left corner of pixel 1\1, mm
ORIENTATION = (0.0, -1.0, 0.0, -1.0, 0.0, 0.0)

REGIONS = tuple(
    CodedClass(n, f"GLIO-R{i}", "99GLIO", n.replace("_", " ").capitalize())
    for i, n in enumerate(["other", "cellular_tumor", "necrosis", "leading_edge"])
)
SUBTYPES = tuple(
    CodedClass(n, f"GLIO-{n[:6].upper()}", "99GLIO", n.capitalize())
    for n in ("classical", "mesenchymal", "neural", "proneural")
)
MGMT = (
    CodedClass("unmethylated", "GLIO-MGMT-U", "99GLIO", "MGMT promoter unmethylated"),
    CodedClass("methylated", "GLIO-MGMT-M", "99GLIO", "MGMT promoter methylated"),
)
EGFR = (
    CodedClass("not_amplified", "GLIO-EGFR-N", "99GLIO", "EGFR not amplified"),
    CodedClass("amplified", "GLIO-EGFR-A", "99GLIO", "EGFR amplified"),
)
DEMO = Algorithm(
    name="glio-demo",
    version="0.1.0",
    sha256="ab" * 32,
    intended_use="DEMO model trained on synthetic slides. Research use only. Not for diagnosis.",
    is_demo=True,
)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_source(
    *, frame_of_reference: bool = True, container: bool = True, seed: str = "slide-1",
    rows: int = ROWS, cols: int = COLS, tile: int = TILE,
) -> Dataset:
    """A minimal VL WSI level (metadata only): the attributes the writers read, as a scanner writes."""
    uid = lambda name: generate_uid(prefix=None, entropy_srcs=["test-writers", seed, name])  # noqa: E731
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = uid("sop")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SM", 1, 1
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "TEST^SLIDE", "T1", "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "120000", "A1", "S1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "test scanner"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = rows, cols
    ds.NumberOfFrames = math.ceil(rows / tile) * math.ceil(cols / tile)
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frame_of_reference:
        ds.FrameOfReferenceUID = uid("frame-of-reference")
        ds.PositionReferenceIndicator = "SLIDE_CORNER"
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = ORIGIN
    ds.TotalPixelMatrixOriginSequence = [origin]
    ds.ImageOrientationSlide = list(ORIENTATION)
    shared, measures, frame_type, path = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [SPACING, SPACING], 0.004
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    path.OpticalPathIdentifier = "1"
    shared.PixelMeasuresSequence = [measures]
    shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
    shared.OpticalPathIdentificationSequence = [path]
    ds.SharedFunctionalGroupsSequence = [shared]
    if container:
        ds.ContainerIdentifier = "SLIDE-0001"
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    specimen = Dataset()
    specimen.SpecimenIdentifier, specimen.SpecimenUID = "SPECIMEN-0001", uid("specimen")
    specimen.IssuerOfTheSpecimenIdentifierSequence, specimen.SpecimenPreparationSequence = [], []
    ds.SpecimenDescriptionSequence = [specimen]
    return ds


def corner_mask(rows: int, cols: int) -> np.ndarray:
    """Glass with one foreground pixel one pixel in from each corner, each a different class."""
    label = np.full((rows, cols), NOT_TISSUE, np.uint8)
    label[1, 1], label[1, cols - 2], label[rows - 2, 1], label[rows - 2, cols - 2] = 0, 1, 2, 3
    label[rows // 2 - 8 : rows // 2 + 8, cols // 2 - 8 : cols // 2 + 8] = 1  # a block for coarse levels
    return label


def make_result(
    algorithm: Algorithm = DEMO,
    *,
    label_mm_per_px: float = 2 * SPACING,
    mgmt_call: CodedClass | None = None,
    heatmap_mm_per_px: float = 64 * SPACING,
) -> AnalysisResult:
    rows, cols = math.ceil(ROWS * SPACING / label_mm_per_px), math.ceil(COLS * SPACING / label_mm_per_px)
    g_rows = math.ceil(ROWS * SPACING / heatmap_mm_per_px)
    g_cols = math.ceil(COLS * SPACING / heatmap_mm_per_px)
    rng = np.random.default_rng(7)

    def grid(n: int) -> Raster:
        p = rng.dirichlet(np.ones(n), size=(g_rows, g_cols))
        p[0, 0] = np.nan  # a tile that was not analysed
        return Raster(p, heatmap_mm_per_px)

    return AnalysisResult(
        algorithm=algorithm,
        region_classes=REGIONS,
        label_map=Raster(corner_mask(rows, cols), label_mm_per_px),
        tissue_area_mm2=0.0123,
        region_area_fraction={"other": 0.1, "cellular_tumor": 0.7, "necrosis": 0.15, "leading_edge": 0.05},
        heatmaps=(
            Heatmap("subtype", SUBTYPES, grid(4)),
            Heatmap("mgmt", MGMT, grid(2)),
            Heatmap("egfr", EGFR, grid(2)),
        ),
        calls=(
            SlideCall("subtype", SUBTYPES, (0.1, 0.6, 0.2, 0.1), 0.5, SUBTYPES[1], temperature=1.7),
            SlideCall("mgmt", MGMT, (0.45, 0.55), 0.6, mgmt_call),
            SlideCall("egfr", EGFR, (0.2, 0.8), 0.5, EGFR[1]),
        ),
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Dataset, AnalysisResult, WrittenObjects]:
    source, result = make_source(), make_result()
    return source, result, write_results([source], result, tmp_path_factory.mktemp("out"))


def _read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


# --- SEG ------------------------------------------------------------------------------------


def test_seg_has_one_coded_segment_per_region_class(written):
    source, result, objects = written
    seg = hd.seg.segread(objects.of_kind("seg")[0].path)
    assert seg.number_of_segments == len(REGIONS)
    for number, region in enumerate(REGIONS, start=1):
        description = seg.get_segment_description(number)
        assert description.segmented_property_type == hd.sr.CodedConcept(
            region.code_value, region.coding_scheme_designator, region.code_meaning
        )
        assert description.segmented_property_category == codes.SCT.Tissue
        algorithm = description.algorithm_identification[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("glio-demo", "0.1.0")
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # CID 7162 AI
    assert seg.SegmentationType == "BINARY"
    assert seg.DimensionOrganizationType == "TILED_SPARSE"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ContainerIdentifier == "SLIDE-0001"
    assert seg.SpecimenDescriptionSequence[0].SpecimenUID == source.SpecimenDescriptionSequence[0].SpecimenUID
    assert seg.PatientName == source.PatientName and seg.PatientID == source.PatientID
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert seg.SeriesNumber == 9001
    assert "AI-generated, research use only" in seg.SeriesDescription
    assert "DEMO (synthetic training)" in seg.SeriesDescription
    assert seg.Manufacturer == "glio-node" and seg.ManufacturerModelName == "glio-demo"
    assert list(seg.SoftwareVersions) == ["glio-node 0.1.0", "glio-demo 0.1.0"]
    assert "Research use only" in seg.ContentDescription


def test_seg_label_map_reads_back_in_place_at_every_corner(written):
    """The SEG's total pixel matrix equals the input, and sits where the label map says.

    The label map is 2x coarser than the source level. Placement is checked physically: the SEG
    keeps the slide's TotalPixelMatrixOrigin (corner of pixel 1\\1), and every frame's offsets are
    that origin plus its pixel offset times the SEG's own spacing, so a SEG pixel (r, c) covers
    exactly source pixels 2r..2r+1, 2c..2c+1.
    """
    source, result, objects = written
    seg = hd.seg.segread(objects.of_kind("seg")[0].path)
    expected = result.label_map.array
    got = seg.get_total_pixel_matrix(combine_segments=True)  # 0 = no segment, n = class n - 1
    got = np.where(got == 0, NOT_TISSUE, got.astype(np.int16) - 1).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == expected.shape

    spacing = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == pytest.approx([2 * SPACING, 2 * SPACING])
    origin = seg.TotalPixelMatrixOriginSequence[0]
    assert (float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)) == pytest.approx(ORIGIN)
    row_dir, col_dir = np.array(ORIENTATION[:3]), np.array(ORIENTATION[3:])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = frame.PlanePositionSlideSequence[0]
        r0 = position.RowPositionInTotalImagePixelMatrix - 1
        c0 = position.ColumnPositionInTotalImagePixelMatrix - 1
        corner = np.array([*ORIGIN, 0.0]) + row_dir * c0 * spacing[1] + col_dir * r0 * spacing[0]
        assert float(position.XOffsetInSlideCoordinateSystem) == pytest.approx(corner[0])
        assert float(position.YOffsetInSlideCoordinateSystem) == pytest.approx(corner[1])
    # The four corner pixels: centre of SEG pixel (r, c) in slide mm -> source pixel indices.
    for r, c in ((1, 1), (1, expected.shape[1] - 2), (expected.shape[0] - 2, 1), (expected.shape[0] - 2, expected.shape[1] - 2)):
        centre = np.array([*ORIGIN, 0.0]) + row_dir * (c + 0.5) * spacing[1] + col_dir * (r + 0.5) * spacing[0]
        offset = centre - np.array([*ORIGIN, 0.0])
        source_col = offset @ row_dir / SPACING  # continuous, 0 = left edge of the source
        source_row = offset @ col_dir / SPACING
        assert (source_row, source_col) == pytest.approx((2 * r + 1, 2 * c + 1))
        assert got[r, c] == expected[r, c] != NOT_TISSUE


def test_seg_pyramid_halves_down_to_one_tile(written):
    source, result, objects = written
    levels = [hd.seg.segread(o.path) for o in objects.of_kind("seg")]
    rows, cols = result.label_map.array.shape
    assert len(levels) >= 2
    assert len({s.PyramidUID for s in levels}) == 1 and len({s.SeriesInstanceUID for s in levels}) == 1
    for k, seg in enumerate(levels):
        assert seg.InstanceNumber == k + 1
        assert (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == (math.ceil(rows / 2**k), math.ceil(cols / 2**k))
        spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert float(spacing[0]) == pytest.approx(result.label_map.mm_per_px * 2**k)
        assert seg.number_of_segments == len(REGIONS)
        assert seg.TotalPixelMatrixOriginSequence[0].XOffsetInSlideCoordinateSystem == ORIGIN[0]
    top = levels[-1]
    assert max(top.TotalPixelMatrixRows, top.TotalPixelMatrixColumns) <= TILE
    assert max(levels[-2].TotalPixelMatrixRows, levels[-2].TotalPixelMatrixColumns) > TILE
    # the 16x16 block in the middle survives the majority vote at its place on level 1
    level1 = levels[1].get_total_pixel_matrix(combine_segments=True)
    r, c = rows // 2 // 2, cols // 2 // 2
    assert (level1[r - 3 : r + 3, c - 3 : c + 3] == 2).all()  # segment 2 = class 1
    assert level1[0, 0] == 0  # single corner pixels lose the vote to glass


def test_seg_writer_peak_memory_is_a_fraction_of_the_label_map(written, tmp_path):
    """A whole slide's label map is gigabytes: the SEG writer may hold no slide-sized copy of it.

    A 4096 x 4096 label map (half glass, four classes in 64-px blobs, as a real map is patchy)
    on a source of 256-px frames: the peak that Python and numpy allocate while writing the
    pyramid stays under 1.6 B per label-map pixel (the encoded BINARY frames of level 0 and
    highdicom's joining them into Pixel Data are about 1 B/px of it). A renumbered copy of the
    label map alone would add 1 B/px (the writer before this test peaked at 2.5 B/px). The label
    map is given back unchanged: the writer renumbers it in place while encoding level 0.
    """
    import dataclasses
    import tracemalloc

    from glio_node.writers.common import prepare_source
    from glio_node.writers.seg import write_seg

    n, tile = 4096, 256
    source = prepare_source([make_source(rows=2 * n, cols=2 * n, tile=tile)])
    rng = np.random.default_rng(0)
    blobs = rng.integers(0, 8, size=(n // 64, n // 64)).astype(np.uint8)
    blobs[blobs >= len(REGIONS)] = NOT_TISSUE
    label = np.repeat(np.repeat(blobs, 64, axis=0), 64, axis=1)
    before = label.copy()
    result = dataclasses.replace(written[1], label_map=Raster(label, 2 * SPACING))
    tracemalloc.start()  # after `written`, which loaded highdicom's lazily read tables
    try:
        levels = write_seg(source, result, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / label.size <= 1.6, f"peak {peak / label.size:.2f} B per label-map pixel"
    assert np.array_equal(label, before)
    level0 = hd.seg.segread(levels[0][0].path).get_total_pixel_matrix(combine_segments=True)
    assert np.array_equal(level0, (label + np.uint8(1)))  # class i -> segment i + 1, glass -> 0
    assert all("PixelData" not in header for _, header in levels)  # on disk, not held for the SR


# --- heatmaps --------------------------------------------------------------------------------


def test_heatmaps_one_series_per_class_map_back_to_probabilities(written):
    source, result, objects = written
    maps = objects.of_kind("heatmap")
    assert [o.series_number for o in maps] == [9010, 9011, 9012, 9013, 9020, 9021, 9030, 9031]
    assert len({o.series_instance_uid for o in maps}) == len(maps)
    written_maps = iter(maps)
    for heatmap in result.heatmaps:
        for index, cls in enumerate(heatmap.classes):
            pm = hd.imread(next(written_maps).path)
            assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
            assert pm.BitsAllocated == 16 and "PixelData" in pm and "FloatPixelData" not in pm
            assert pm.StudyInstanceUID == source.StudyInstanceUID
            assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
            mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
            assert mapping.LUTLabel == cls.name[:16]
            window = pm.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
            assert (float(window.WindowCenter), float(window.WindowWidth)) == (32767.5, 65536.0)
            assert window.WindowCenterWidthExplanation == "probability 0..1"  # one value, not 16 letters
            probabilities = pm.get_total_pixel_matrix()  # real-world values
            expected = np.nan_to_num(heatmap.probabilities.array[:, :, index], nan=0.0)
            assert probabilities.shape == expected.shape
            np.testing.assert_allclose(probabilities, expected, atol=1 / QUANTISATION)
            spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
            assert float(spacing[0]) == pytest.approx(heatmap.probabilities.mm_per_px)
            origin = pm.TotalPixelMatrixOriginSequence[0]
            assert float(origin.XOffsetInSlideCoordinateSystem) == pytest.approx(ORIGIN[0])
            assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
            assert "AI-generated, research use only" in pm.SeriesDescription


# --- SR --------------------------------------------------------------------------------------


def test_sr_reports_calls_probabilities_areas_and_references(written):
    source, result, objects = written
    sr = hd.sr.srread(objects.of_kind("sr")[0].path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesNumber == 9002
    report = sr.content
    groups = report.get_volumetric_roi_measurement_groups() + report.get_image_measurement_groups()
    by_finding = {}
    for group in groups:
        by_finding.setdefault(group.finding_type.meaning if group.finding_type else None, []).append(group)

    tissue = by_finding["Tissue"][0]
    area = tissue.get_measurements(name=codes.SCT.Area)[0]
    assert area.value == pytest.approx(0.0123) and area.unit.value == "mm2"

    seg0 = objects.of_kind("seg")[0]
    regions = report.get_volumetric_roi_measurement_groups()
    assert len(regions) == len(REGIONS)
    for number, region in enumerate(REGIONS, start=1):
        group = next(g for g in regions if g.finding_type.value == region.code_value)
        fraction = group.get_measurements(name=hd.sr.CodedConcept("AREAFRAC", "99GLIO", "Area fraction of tissue"))[0]
        assert fraction.value == pytest.approx(100 * result.region_area_fraction[region.name])
        assert fraction.unit.value == "%"
        reference = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == seg0.sop_instance_uid
        assert reference.ReferencedSegmentNumber == number
        algorithm = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmName)
        assert [a.TextValue for a in algorithm] == ["glio-demo"]

    calls = {}
    for group in report.get_image_measurement_groups():
        for evaluation in group.get_qualitative_evaluations():
            calls[evaluation.name.value] = evaluation.value
    assert calls["GLIO-SUBTYPE"].meaning == "Mesenchymal"
    assert calls["GLIO-EGFR"].value == "GLIO-EGFR-A"
    assert calls["GLIO-MGMT"] == codes.SCT.Indeterminate  # mgmt_call=None: top 0.55 < 0.6

    calibration, temperature = {}, {}
    for group in report.get_image_measurement_groups():
        head = group.finding_type.value
        for evaluation in group.get_qualitative_evaluations(name=hd.sr.CodedConcept("CALIB", "99GLIO", "Probability calibration")):
            calibration[head] = evaluation.value.meaning
        for m in group.get_measurements(name=hd.sr.CodedConcept("CALTEMP", "99GLIO", "Calibration temperature")):
            temperature[head] = m.value
    assert calibration == {
        "GLIO-SUBTYPE": "Temperature scaling fitted on validation slides",
        "GLIO-MGMT": "Not calibrated",
        "GLIO-EGFR": "Not calibrated",
    }
    assert temperature == {"GLIO-SUBTYPE": pytest.approx(1.7), "GLIO-MGMT": 1.0, "GLIO-EGFR": 1.0}

    probabilities = {
        g.finding_type.value: g.get_measurements(name=codes.DCM.Probability)[0].value
        for g in report.get_image_measurement_groups()
        if g.get_measurements(name=codes.DCM.Probability)
    }
    assert probabilities["GLIO-MESENC"] == pytest.approx(0.6)
    assert probabilities["GLIO-MGMT-M"] == pytest.approx(0.55)

    referenced = _evidence_uids(sr)
    assert source.SOPInstanceUID in referenced
    assert all(o.sop_instance_uid in referenced for o in objects if o.kind != "sr")


def _evidence_uids(sr) -> set[str]:
    uids = set()
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(keyword, []):
            for series in study.ReferencedSeriesSequence:
                uids.update(str(i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence)
    return uids


# --- every object ------------------------------------------------------------------------------


@needs_dciodvfy
def test_every_object_passes_dciodvfy(written):
    _, _, objects = written
    kinds = set()
    for written_object in objects:
        report = dciodvfy.assert_valid(written_object.path)
        kinds.add(written_object.kind)
        for line, section in report.allowed:
            print(f"{written_object.kind}: allowed by {section}: {line}")
    assert kinds == {"seg", "heatmap", "sr", "ann"}


def test_uids_are_derived_from_source_bundle_and_kind(written, tmp_path):
    source, result, objects = written
    again = write_results([source], result, tmp_path / "again")
    assert [o.sop_instance_uid for o in again] == [o.sop_instance_uid for o in objects]
    assert [o.series_instance_uid for o in again] == [o.series_instance_uid for o in objects]
    other_bundle = make_result(Algorithm("glio-demo", "0.1.1", "cd" * 32, "x", False))
    other = write_results([source], other_bundle, tmp_path / "other")
    assert not {o.sop_instance_uid for o in other} & {o.sop_instance_uid for o in objects}
    assert all(len(o.sop_instance_uid) <= 64 for o in objects)
    non_demo = _read(other.of_kind("seg")[0].path).SeriesDescription
    assert "DEMO" not in non_demo and "AI-generated, research use only" in non_demo


@pytest.mark.parametrize("is_demo", [True, False], ids=["demo bundle", "trained bundle"])
def test_every_object_names_the_bundle_its_full_sha256_and_the_notices(tmp_path, is_demo):
    """SEG levels, each heatmap, the SR and the bulk annotations, read back: bundle name, version and
    full SHA-256, "research use only", and the synthetic-training notice exactly when the bundle is
    a demo."""
    sha256 = hashlib.sha256(b"a bundle with no repeating digest").hexdigest()
    algorithm = Algorithm("glio-test", "2.3.4", sha256, "Research use only. Not for diagnosis.", is_demo)
    objects = write_results([make_source()], make_result(algorithm), tmp_path)
    assert {o.kind for o in objects} == {"seg", "heatmap", "sr", "ann"}
    assert len(objects.of_kind("heatmap")) == 8

    def check_algorithm_item(item: Dataset) -> None:  # AlgorithmIdentificationSequence / TID 4019
        assert (item.AlgorithmName, item.AlgorithmVersion) == ("glio-test", "2.3.4")
        assert f"bundle_sha256={sha256}" in item.AlgorithmParameters

    for written_object in objects:
        ds = pydicom.dcmread(written_object.path)
        what = f"{written_object.kind} {written_object.path.name}"
        assert ds.ManufacturerModelName == "glio-test", what
        assert "glio-test 2.3.4" in ds.SoftwareVersions, what
        assert ds.SeriesDescription.endswith("; AI-generated, research use only"), what
        assert ds.SeriesDescription.startswith("DEMO (synthetic training) ") == is_demo, what
        [processing] = [
            item for item in ds.ContributingEquipmentSequence
            if item.Manufacturer == "glio-node" and item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        ]
        text = processing.ContributionDescription
        assert processing.ManufacturerModelName == "glio-test", what
        assert f"glio-test 2.3.4, SHA-256 {sha256};" in text, what
        assert "AI-generated, research use only" in text, what
        assert text.startswith("DEMO (synthetic training). ") == is_demo, what
        assert ("DEMO" in ds.SeriesDescription + text) == is_demo, what

        if written_object.kind == "seg":
            seg = hd.seg.segread(written_object.path)
            for number in range(1, seg.number_of_segments + 1):
                check_algorithm_item(seg.get_segment_description(number).algorithm_identification[0])
        elif written_object.kind == "sr":
            groups = hd.sr.srread(written_object.path).content
            groups = groups.get_image_measurement_groups() + groups.get_volumetric_roi_measurement_groups()
            assert groups
            for group in groups:
                [name] = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmName)
                [version] = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmVersion)
                parameters = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmParameters)
                assert (name.TextValue, version.TextValue) == ("glio-test", "2.3.4")
                assert f"bundle_sha256={sha256}" in [p.TextValue for p in parameters]
        elif written_object.kind == "ann":
            groups = hd.ann.annread(written_object.path).get_annotation_groups()
            assert groups
            for group in groups:
                check_algorithm_item(group.algorithm_identification[0])
        else:  # a Parametric Map: no Algorithm Identification, the equipment item above says it
            assert hd.imread(written_object.path).ContentQualification == "RESEARCH"


# --- missing source attributes -----------------------------------------------------------------


def test_source_without_frame_of_reference_gets_a_derived_one(tmp_path):
    source = make_source(frame_of_reference=False, seed="orthanc-dicomizer")
    objects = write_results([source], make_result(), tmp_path)
    frames = {_read(o.path).FrameOfReferenceUID for o in objects if o.kind != "sr"}
    assert len(frames) == 1  # one created frame of reference shared by every overlay
    assert any("no FrameOfReferenceUID" in note for note in objects.notes)
    again = write_results([source], make_result(), tmp_path / "again")
    assert {_read(o.path).FrameOfReferenceUID for o in again if o.kind != "sr"} == frames
    if dciodvfy.DCIODVFY:
        for o in objects:
            dciodvfy.assert_valid(o.path)


def test_source_without_container_identifier_omits_specimen_module(tmp_path):
    objects = write_results([make_source(container=False, seed="no-container")], make_result(), tmp_path)
    for o in objects:
        ds = _read(o.path)
        assert "ContainerIdentifier" not in ds and "SpecimenDescriptionSequence" not in ds
    assert any("specimen" in note for note in objects.notes)
    if dciodvfy.DCIODVFY:
        for o in objects:
            dciodvfy.assert_valid(o.path)


def test_source_without_patient_type2_attributes_writes_them_empty(tmp_path):
    source = make_source(seed="bare")
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        delattr(source, keyword)
    objects = write_results([source], make_result(), tmp_path)
    sr = _read(objects.of_kind("sr")[0].path)
    assert sr.AccessionNumber == "" and sr.PatientSex == ""


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda ds: delattr(ds, "SharedFunctionalGroupsSequence"), "PixelSpacing"),
        (lambda ds: delattr(ds, "TotalPixelMatrixOriginSequence"), "TotalPixelMatrixOriginSequence"),
        (lambda ds: delattr(ds, "TotalPixelMatrixRows"), "TotalPixelMatrixRows"),
        (lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"), "not VL Whole Slide"),
    ],
)
def test_unusable_source_is_bad_input(tmp_path, damage, message):
    source = make_source(seed="damaged")
    damage(source)
    with pytest.raises(BadInput, match=message):
        write_results([source], make_result(), tmp_path)


def test_label_map_that_does_not_fit_the_source_is_refused(tmp_path):
    result = make_result()
    wrong = Raster(result.label_map.array[:50], result.label_map.mm_per_px)
    bad = AnalysisResult(**{**result.__dict__, "label_map": wrong})
    with pytest.raises(ValueError, match="does not cover the source"):
        write_results([make_source()], bad, tmp_path)


# --- ANN and QuPath GeoJSON ----------------------------------------------------------------------


def test_the_ann_puts_each_region_pixel_and_tile_centre_at_its_slide_coordinates(written):
    _, result, objects = written
    [ann_object] = objects.of_kind("ann")
    ann = hd.ann.annread(ann_object.path)
    assert ann.SeriesNumber == 9003 and ann.AnnotationCoordinateType == "3D"
    groups = {g.label: g for g in ann.get_annotation_groups()}
    # Label pixel (row 1, col 1) of "other" spans 1..2 label px = 1..2 µm from the matrix corner,
    # i.e. 0.001..0.002 mm; rows run along slide -X and columns along -Y (ORIENTATION).
    [ring] = groups["Other"].get_graphic_data(hd.ann.AnnotationCoordinateTypeValues.SCOORD3D)
    assert ring[:, 0].min() == pytest.approx(ORIGIN[0] - 0.002) and ring[:, 0].max() == pytest.approx(ORIGIN[0] - 0.001)
    assert ring[:, 1].min() == pytest.approx(ORIGIN[1] - 0.002) and ring[:, 1].max() == pytest.approx(ORIGIN[1] - 0.001)
    names, areas, units = groups["Other"].get_measurements()
    assert areas[0, 0] == pytest.approx(0.001**2) and units[0] == codes.UCUM.SquareMillimeter
    # Subtype tiles: every analysed tile (one was not) once, in the group of its top class.
    probs = result.heatmaps[0].probabilities.array
    analysed = int((~np.isnan(probs[..., 0])).sum())
    subtype_groups = [g for label, g in groups.items() if label.endswith("subtype tiles") or label in {f"{c.code_meaning} tiles" for c in SUBTYPES}]
    assert sum(g.number_of_annotations for g in subtype_groups) == analysed == probs.shape[0] * probs.shape[1] - 1
    top = groups[f"{SUBTYPES[int(np.nanargmax(probs[0, 1]))].code_meaning} tiles"]
    centre = (np.array([1.5, 0.5]) * result.heatmaps[0].probabilities.mm_per_px)  # tile (row 0, col 1): x, y mm
    expected = (ORIGIN[0] - centre[1], ORIGIN[1] - centre[0])
    points = top.get_graphic_data(hd.ann.AnnotationCoordinateTypeValues.SCOORD3D)
    assert any(np.allclose(p[0, :2], expected, atol=1e-6) for p in points)


def test_the_geojson_counts_level0_pixels_and_carries_tiles_calls_and_notices(tmp_path):
    import json

    import shapely
    from shapely.geometry import shape

    from glio_node.writers import result_polygons
    from glio_node.writers.geojson import PixelMatrix, write_geojson

    result = make_result()
    base = PixelMatrix.from_header(make_source())
    path = write_geojson(result, result_polygons(result), base, "1.2.3", "1.2.3.4", tmp_path / "slide.geojson")
    collection = json.loads(path.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["slide.geojson"]  # no temporary file left
    features = {f["properties"]["name"]: f for f in collection["features"]}
    other = shape(features["Other"]["geometry"])
    assert other.is_valid and other.bounds == (2.0, 2.0, 4.0, 4.0)  # label px (1, 1) at 2 level-0 px per label px
    assert features["Other"]["properties"]["objectType"] == "annotation"
    assert features["Tissue"]["properties"]["classification"]["name"] == "Tissue"
    detections = [f for f in collection["features"] if f["properties"]["objectType"] == "detection"]
    grid = result.heatmaps[0].probabilities.array
    assert len(detections) == grid.shape[0] * grid.shape[1] - 1  # the not-analysed tile is left out
    tile = next(d for d in detections if d["properties"]["name"] == "Tile 0,1")
    assert shape(tile["geometry"]).bounds == (64.0, 0.0, 128.0, 64.0)
    assert tile["properties"]["measurements"]["Mesenchymal probability"] == pytest.approx(float(grid[0, 1, 1]))
    last = max(shapely.bounds(shape(d["geometry"]))[2] for d in detections)
    assert last == COLS  # the last column of tiles is cut at the slide's edge
    props = collection["properties"]
    assert props["notice"] == "DEMO (synthetic training); AI-generated, research use only"
    assert props["bundle"] == {"name": "glio-demo", "version": "0.1.0", "sha256": "ab" * 32,
                               "intended_use": DEMO.intended_use}
    assert props["slide_calls"]["mgmt"]["call"] == "indeterminate"
    assert props["slide_calls"]["subtype"]["probabilities"]["Mesenchymal"] == pytest.approx(0.6)
    assert (props["slide_calls"]["subtype"]["calibrated"], props["slide_calls"]["subtype"]["temperature"]) == (True, 1.7)
    assert (props["slide_calls"]["mgmt"]["calibrated"], props["slide_calls"]["mgmt"]["temperature"]) == (False, 1.0)


def test_a_base_level_without_spacing_cannot_give_qupath_coordinates():
    from glio_node.writers.geojson import PixelMatrix

    source = make_source()
    del source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    with pytest.raises(BadInput, match="base level has no TotalPixelMatrixRows/Columns or shared PixelSpacing"):
        PixelMatrix.from_header(source)
