"""Series completeness from instance headers (pure)."""

from __future__ import annotations

from pydicom import Dataset

from glio_node.pipeline.series import is_complete, series_gaps


def level(uid: str, frames: int, *, organization: str = "TILED_FULL", **extra) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.DimensionOrganizationType = organization
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = 1000, 600  # 4 x 3 tiles of 256
    ds.Columns = ds.Rows = 256
    ds.NumberOfFrames = frames
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def test_a_whole_tiled_full_level_has_no_gaps():
    assert series_gaps([level("1.1", 12)]) == []
    assert is_complete([level("1.1", 12)])


def test_missing_frames_of_a_tiled_full_level_are_a_gap():
    [gap] = series_gaps([level("1.1", 12), level("1.2", 9)])
    assert gap.index == 1
    assert "1000x600 px is TILED_FULL with 9 of its 12 frames" in gap.message


def test_a_concatenation_needs_all_its_parts_and_their_frames_add_up():
    parts = [
        level(f"1.{i}", 6, SOPInstanceUIDOfConcatenationSource="1.9", InConcatenationTotalNumber=2)
        for i in (1, 2)
    ]
    assert series_gaps(parts) == []
    [gap] = series_gaps(parts[:1])
    assert "concatenation of 2 instances arrived with only 1" in gap.message


def test_sparse_levels_are_trusted_and_context_images_ignored():
    label = level("1.5", 1)
    label.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    assert series_gaps([level("1.1", 3, organization="TILED_SPARSE"), label]) == []
    assert not is_complete([label])  # no pyramid level at all
