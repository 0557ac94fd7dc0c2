"""A research collection holds a slide as a pyramidal TIFF; the hospital's PACS holds the same
slide as DICOM made by a third-party converter (OrthancWSIDicomizer, which copies the TIFF's JPEG
tiles as they are).  Training must cut the same tiles from either, so a model trained on the
collection sees what the worker will see in production."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from slides import ORTHANC_SPEC, write_pyramidal_tiff

from training.dataset import validate_dataset
from training.tiles import TileSpec, extract_slide


@pytest.fixture(scope="module")
def twin_datasets(orthanc_slide, slide_cache, tmp_path_factory):
    """Two datasets of one slide: the TIFF we rendered, and OrthancWSIDicomizer's DICOM of it."""
    tiff = slide_cache.folder(f"tiff-{abs(hash(ORTHANC_SPEC)):x}", lambda p: write_pyramidal_tiff(ORTHANC_SPEC, p / "slide.tiff")) / "slide.tiff"
    root = tmp_path_factory.mktemp("converted")
    for name in ("tiff", "dicom"):
        (root / name / "slides").mkdir(parents=True)
        (root / name / "labels.csv").write_text("slide_id,patient_id,subtype,mgmt,egfr\nS,P,classical,,\n")
    shutil.copy(tiff, root / "tiff" / "slides" / "S.tiff")
    shutil.copytree(orthanc_slide.folder, root / "dicom" / "slides" / "S")
    return root / "tiff", root / "dicom"


@pytest.mark.parametrize(("um_per_px", "tile_size"), [(0.5, 256), (2.0, 64), (1.4, 96)])
def test_a_tiff_and_its_orthanc_conversion_give_the_same_training_tiles(twin_datasets, um_per_px, tile_size):
    tiff_root, dicom_root = twin_datasets
    (tiff_rec,), problems_t = validate_dataset(tiff_root)
    (dicom_rec,), problems_d = validate_dataset(dicom_root)
    assert problems_t == problems_d == []
    assert not tiff_rec.is_dicom and dicom_rec.is_dicom
    spec = TileSpec(um_per_px=um_per_px, tile_size=tile_size, min_tissue=0.5)
    tiff, dicom = extract_slide(tiff_rec, spec, tiff_root), extract_slide(dicom_rec, spec, dicom_root)

    assert len(dicom.cells) > 10
    np.testing.assert_array_equal(tiff.cells, dicom.cells)
    # The same JPEG bytes, decoded by imagecodecs (tifffile) and by wsidicom's decoder: equal up
    # to the decoders' rounding.
    diff = np.abs(tiff.images.astype(np.int16) - dicom.images.astype(np.int16))
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())
