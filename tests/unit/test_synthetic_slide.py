"""A synthetic slide is a valid DICOM WSI that wsidicom reads back as painted, with a known truth.

And the slides that third-party converters make from the same painting open in wsidicom too,
so the node can be tested on slides it did not write itself.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pydicom
import pytest
from slides import (
    DCIODVFY_FRAME_COUNT_FALSE_POSITIVE,
    MALFORMED_BASE,
    MALFORMED_CASES,
    SMALL,
    dciodvfy,
    expected_frame_count,
)
from wsidicom import WsiDicom

from glio_node.synthetic.slide import SlideSpec, write_synthetic_slide
from glio_node.synthetic.textures import Signature

VARIANTS: dict[str, SlideSpec] = {
    "jpeg-tiled-full": SMALL,
    "jpeg2000-lossless": replace(SMALL, transfer_syntax="jpeg2000"),
    "jpeg2000-lossy": replace(SMALL, transfer_syntax="jpeg2000", jpeg2000_lossless=False),
    "uncompressed": replace(SMALL, transfer_syntax="uncompressed"),
    "sparse-shuffled": replace(SMALL, dimension_organization="TILED_SPARSE", shuffle_frames=True),
    "sparse-no-background": replace(
        SMALL, dimension_organization="TILED_SPARSE", shuffle_frames=True, omit_background_frames=True
    ),
    "concatenated": replace(SMALL, frames_per_file=5),
    "concatenated-sparse": replace(
        SMALL, frames_per_file=5, dimension_organization="TILED_SPARSE", shuffle_frames=True
    ),
}
# Largest mean absolute difference (per channel value) between what was painted and what wsidicom
# decodes, per transfer syntax.  The textures have hard nuclei edges, so JPEG's largest single
# errors are large (~50); its mean stays small.
MEAN_TOLERANCE = {"jpeg": 5.0, "jpeg2000": 0.0, "uncompressed": 0.0}
LOSSY_JPEG2000_MEAN_TOLERANCE = 3.0


def _tolerance(spec: SlideSpec) -> float:
    if spec.transfer_syntax == "jpeg2000" and not spec.jpeg2000_lossless:
        return LOSSY_JPEG2000_MEAN_TOLERANCE
    return MEAN_TOLERANCE[spec.transfer_syntax]


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request, slide_cache):
    return slide_cache.slide(VARIANTS[request.param])


@pytest.mark.needs("dciodvfy")
def test_every_variant_passes_dciodvfy(variant):
    spec = variant.spec
    for path in variant.files:
        report = dciodvfy(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        partial = "ConcatenationUID" in ds or spec.omit_background_frames
        errors = [
            e for e in report.errors if not (partial and DCIODVFY_FRAME_COUNT_FALSE_POSITIVE.match(e))
        ]
        assert errors == [], f"{path.name}: {errors}"
        assert report.warnings == (), f"{path.name}: {report.warnings}"


def test_concatenations_add_up_to_the_tile_grid(slide_cache):
    spec = VARIANTS["concatenated"]
    slide = slide_cache.slide(spec)
    parts = [
        pydicom.dcmread(p, stop_before_pixels=True)
        for p in slide.files
        if p.name.startswith("level0-")
    ]
    assert len(parts) == 3
    assert sum(int(ds.NumberOfFrames) for ds in parts) == expected_frame_count(spec, 0)
    assert [int(ds.ConcatenationFrameOffsetNumber) for ds in parts] == [0, 5, 10]
    assert {ds.SOPInstanceUIDOfConcatenationSource for ds in parts} == {
        parts[0].SOPInstanceUIDOfConcatenationSource
    }
    assert [int(ds.InConcatenationNumber) for ds in parts] == [1, 2, 3]


def test_wsidicom_sees_the_pyramid_and_its_spacing(variant):
    with WsiDicom.open(variant.files) as wsi:
        levels = list(wsi.levels)
        assert [level.level for level in levels] == [0, 1, 2]
        assert [level.size.to_tuple() for level in levels] == [(1024, 768), (512, 384), (256, 192)]
        assert [level.mpp.width for level in levels] == pytest.approx([0.5, 1.0, 2.0])
        assert [level.mpp.height for level in levels] == pytest.approx([0.5, 1.0, 2.0])
        assert len(wsi.labels) == 1 and len(wsi.overviews) == 1
        assert wsi.uids.frame_of_reference == variant.frame_of_reference_uid


@pytest.mark.parametrize("level", [0, 1, 2])
def test_wsidicom_reads_back_the_painted_pixels(variant, level):
    x, y, w, h = 37, 21, 200, 150  # straddles tile borders on levels 0 and 1
    with WsiDicom.open(variant.files) as wsi:
        read = np.asarray(wsi.read_region((x, y), level, (w, h)), dtype=np.int16)
    painted = variant.render_region(level, x, y, w, h).astype(np.int16)
    assert np.abs(read - painted).mean() <= _tolerance(variant.spec)


def test_omitted_background_tiles_are_not_stored_and_read_as_glass(slide_cache):
    spec = VARIANTS["sparse-no-background"]
    slide = slide_cache.slide(spec)
    base = pydicom.dcmread(slide.level_files[0], stop_before_pixels=True)
    stored = {
        (int(f.PlanePositionSlideSequence[0].ColumnPositionInTotalImagePixelMatrix),
         int(f.PlanePositionSlideSequence[0].RowPositionInTotalImagePixelMatrix))
        for f in base.PerFrameFunctionalGroupsSequence
    }  # fmt: skip
    tissue = slide.truth_tissue(0.5)
    for tr in range(3):
        for tc in range(4):
            has_tissue = tissue[tr * 256 : (tr + 1) * 256, tc * 256 : (tc + 1) * 256].any()
            assert ((tc * 256 + 1, tr * 256 + 1) in stored) == has_tissue
    assert len(stored) < expected_frame_count(spec, 0), "this layout should leave some glass tiles"


def test_truth_has_the_results_geometry(small_slide):
    labels = small_slide.truth_labels(0.5)
    assert labels.shape == (768, 1024) and labels.dtype == np.uint8
    assert small_slide.truth_labels(2.0).shape == (192, 256)
    assert small_slide.truth_tissue(3.0).shape == (128, 171)  # 1024 * 0.5 / 3 = 170.7 -> rounded up
    tissue = small_slide.truth_tissue(0.5)
    assert tissue.dtype == bool
    assert 0.4 <= tissue.mean() <= 0.6
    assert np.array_equal(labels == 255, ~tissue)
    assert set(np.unique(labels[tissue])) <= set(range(10))


def test_truth_at_a_coarser_spacing_samples_pixel_centres(small_slide):
    fine = small_slide.truth_labels(0.5)
    coarse = small_slide.truth_labels(1.0)
    # Coarse pixel (r, c) has its centre at the corner shared by fine pixels (2r..2r+1, 2c..2c+1):
    # wherever those four agree, the coarse label must agree with them.
    blocks = fine.reshape(384, 2, 512, 2).transpose(0, 2, 1, 3).reshape(384, 512, 4)
    uniform = (blocks == blocks[..., :1]).all(axis=-1)
    assert uniform.mean() > 0.95
    assert np.array_equal(coarse[uniform], blocks[..., 0][uniform])


def test_glass_is_painted_where_truth_says_glass(small_slide):
    pixels = small_slide.render_region(0, 0, 0, 1024, 768).astype(int)
    tissue = small_slide.truth_tissue(0.5)
    glass_rgb = np.array((242, 242, 245))
    assert np.abs(pixels[~tissue] - glass_rgb).max() <= 2
    assert np.abs(pixels[tissue] - glass_rgb).sum(axis=-1).min() > 6


def test_writing_the_same_spec_twice_gives_the_same_files(small_slide, tmp_path):
    again = write_synthetic_slide(SMALL, tmp_path)
    assert (again.study_instance_uid, again.series_instance_uid) == (
        small_slide.study_instance_uid,
        small_slide.series_instance_uid,
    )
    for a, b in zip(small_slide.files, again.files, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_the_slide_carries_obviously_synthetic_identifiers(small_slide):
    ds = pydicom.dcmread(small_slide.level_files[0], stop_before_pixels=True)
    assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == (
        "SYNTHETIC^DEMO",
        "SYNTH-0001",
        "SYNTH0001",
    )
    assert ds.ContainerIdentifier and ds.SpecimenDescriptionSequence[0].SpecimenUID
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    level1 = pydicom.dcmread(small_slide.level_files[1], stop_before_pixels=True)
    assert list(level1.ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]


def test_molecular_signature_changes_the_look_not_the_truth(slide_cache):
    plain = slide_cache.slide(replace(SMALL, levels=1, context_images=False))
    methylated = replace(SMALL, levels=1, context_images=False, signature=Signature(2, True, True))
    other = slide_cache.slide(methylated)
    assert np.array_equal(plain.truth_labels(4.0), other.truth_labels(4.0))
    tissue = plain.truth_tissue(0.5)
    a = plain.render_region(0, 0, 0, 1024, 768)[tissue].astype(float).mean(axis=0)
    b = other.render_region(0, 0, 0, 1024, 768)[tissue].astype(float).mean(axis=0)
    assert b[2] - b[0] > a[2] - a[0] + 20  # MGMT methylated: bluer


def test_spec_rejects_sparse_options_on_tiled_full():
    with pytest.raises(ValueError, match="shuffle_frames and omit_background_frames need TILED_SPARSE"):
        SlideSpec(shuffle_frames=True)
    with pytest.raises(ValueError, match="tile size 100 px must be a positive multiple of 16"):
        SlideSpec(tile_size=100)


# --- slides made by third-party converters ---------------------------------------------------


def test_orthanc_dicomizer_slide_opens_in_wsidicom(orthanc_slide):
    with WsiDicom.open(orthanc_slide.files) as wsi:
        sizes = [level.size.to_tuple() for level in wsi.levels]
        assert sizes == [(2048, 2048), (1024, 1024), (512, 512)]
        assert [level.mpp.width for level in wsi.levels] == pytest.approx([0.5, 1.0, 2.0], rel=1e-6)
        assert wsi.uids.frame_of_reference is None  # the converter writes none
        read = np.asarray(wsi.read_region((300, 200), 0, (300, 300)), dtype=np.int16)
    painted = orthanc_slide.render_region(0, 300, 200, 300, 300).astype(np.int16)
    assert np.abs(read - painted).mean() <= 5.0  # the TIFF's JPEG tiles, copied as they are
    concatenated = [pydicom.dcmread(p, stop_before_pixels=True) for p in orthanc_slide.files]
    base_parts = [ds for ds in concatenated if ds.TotalPixelMatrixColumns == 2048]
    assert len(base_parts) == 2 and all("ConcatenationUID" in ds for ds in base_parts)
    assert sum(int(ds.NumberOfFrames) for ds in base_parts) == 64


def test_wsidicomizer_slide_opens_in_wsidicom(wsidicomizer_slide):
    with WsiDicom.open(wsidicomizer_slide.files) as wsi:
        assert [level.size.to_tuple() for level in wsi.levels] == [(1024, 768), (512, 384), (256, 192)]
        assert [level.mpp.width for level in wsi.levels] == pytest.approx([0.5, 1.0, 2.0])
        assert wsi.levels[0].tile_size.to_tuple() == (512, 512)
        read = np.asarray(wsi.read_region((37, 21), 1, (200, 150)), dtype=np.int16)
    painted = wsidicomizer_slide.render_region(1, 37, 21, 200, 150).astype(np.int16)
    assert np.abs(read - painted).mean() <= 8.0  # two generations of JPEG
    assert wsidicomizer_slide.truth_labels(2.0).shape == (192, 256)


# --- malformed inputs exist as described --------------------------------------------------------


@pytest.mark.parametrize("case", MALFORMED_CASES)
def test_malformed_input_folders_are_built(malformed_inputs, case):
    folder = malformed_inputs[case]
    files = sorted(folder.iterdir())
    assert (files == []) == (case == "empty")
    if case == "missing_frames":
        ds = pydicom.dcmread(folder / "level0.dcm", stop_before_pixels=True)
        assert int(ds.NumberOfFrames) < expected_frame_count(MALFORMED_BASE, 0)
    if case == "mixed_series":
        series = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}
        assert len(series) == 2
    if case == "no_pixel_spacing":
        for f in files:
            measures = pydicom.dcmread(f, stop_before_pixels=True).SharedFunctionalGroupsSequence[0]
            assert "PixelSpacing" not in measures.PixelMeasuresSequence[0]
