"""An operator hands glio-node a slide: it is read right, or refused in one line saying why.

Covers every slide flavour our own writer makes, the slides made by two third-party converters,
and every malformed input the analysis must refuse with exit code 2 rather than a traceback.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from slides import SMALL

from glio_node.errors import BadInput
from glio_node.pipeline.levels import LevelInfo, choose_level
from glio_node.runtime.slide_reader import DicomSlide, inspect_files, is_corrupt_data

VARIANTS = {
    "jpeg-full": SMALL,
    "j2k-sparse-shuffled": replace(SMALL, transfer_syntax="jpeg2000", dimension_organization="TILED_SPARSE", shuffle_frames=True),
    "raw-concatenated": replace(SMALL, transfer_syntax="uncompressed", frames_per_file=4),
    "jpeg-sparse-omitted": replace(SMALL, dimension_organization="TILED_SPARSE", omit_background_frames=True, shuffle_frames=True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_flavour_reads_back_the_painted_pixels(slide_cache, name):
    slide = slide_cache.slide(VARIANTS[name])
    with DicomSlide.open([f.parent for f in slide.files[:1]]) as ds:
        assert len(ds.levels) == 3
        assert [round(lvl.um_per_px, 3) for lvl in ds.levels] == [0.5, 1.0, 2.0]
        assert {f.image_flavor for f in ds.context_files} == {"LABEL", "OVERVIEW"}
        level = ds.levels[0]
        frame = ds.read_frame(0, 1, 2)
        painted = slide.render_region(0, 2 * level.frame_cols, level.frame_rows, level.frame_cols, level.frame_rows)
        tolerance = 0 if VARIANTS[name].transfer_syntax == "uncompressed" else 12
        assert np.abs(frame.astype(int) - painted.astype(int)).mean() <= tolerance
        assert ds.decodes[0] == 1


def test_an_omitted_sparse_frame_reads_as_glass(slide_cache):
    slide = slide_cache.slide(VARIANTS["jpeg-sparse-omitted"])
    with DicomSlide.open(slide.files) as ds:
        lvl = ds.levels[0]
        glass = [
            (r, c)
            for r in range(-(-lvl.rows // lvl.frame_rows))
            for c in range(-(-lvl.cols // lvl.frame_cols))
            if not slide.truth_tissue(0.5)[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256].any()
        ]
        assert glass, "the test slide should have an all-glass frame"
        assert ds.read_frame(0, *glass[0]).min() >= 240


@pytest.mark.parametrize("fixture", ["orthanc_slide", "wsidicomizer_slide"])
def test_slides_from_third_party_converters_open(request, fixture):
    converted = request.getfixturevalue(fixture)
    with DicomSlide.open([converted.folder]) as ds:
        assert ds.levels[0].um_per_px == pytest.approx(0.5, rel=1e-3)
        frame = ds.read_frame(0, 0, 0)
        assert frame.shape == (ds.levels[0].frame_rows, ds.levels[0].frame_cols, 3)


REFUSALS = {
    "non_wsi": "not a VL Whole Slide Microscopy image",
    "mixed_series": "belong to 2 series",
    "no_pixel_spacing": "no PixelSpacing",
    "missing_frames": "TILED_FULL with .* of its .* frames",
    "empty": "no files found",
    "non_dicom": "not a DICOM file",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_malformed_input_is_refused_with_a_clear_message(malformed_inputs, case):
    with pytest.raises(BadInput, match=REFUSALS[case]):
        DicomSlide.open([malformed_inputs[case]])


@pytest.mark.parametrize("case", ["truncated", "garbage_jpeg"])
def test_unreadable_frames_are_refused_when_read(malformed_inputs, case):
    with pytest.raises(BadInput, match="truncated or corrupt"):
        with DicomSlide.open([malformed_inputs[case]]) as ds:
            for level in ds.levels:
                for r in range(-(-level.rows // level.frame_rows)):
                    for c in range(-(-level.cols // level.frame_cols)):
                        ds.read_frame(level.index, r, c)


@pytest.mark.parametrize("bug", [TypeError("decode() got an unexpected keyword"), AttributeError("'NoneType' object has no attribute 'mode'"), MemoryError()], ids=lambda e: type(e).__name__)
def test_a_decoder_bug_is_not_bad_input(small_slide, monkeypatch, bug):
    """A bug in decoding good bytes must not tell the operator to re-send the series: the error
    itself comes out (the scheduler retries it and reports it as an internal error)."""
    with DicomSlide.open(small_slide.files) as ds:
        decoder = type(ds._image_data[0].decoder)

        def broken(self, frame):
            raise bug

        monkeypatch.setattr(decoder, "decode", broken)
        with pytest.raises(type(bug)) as raised:
            ds.read_frame(0, 0, 0)
    assert not isinstance(raised.value, BadInput)
    assert any("not a data error" in note for note in raised.value.__notes__)


@pytest.mark.parametrize(("error", "corrupt"), [
    (EOFError("Unexpected end of file"), True),
    (OSError("image file is truncated (3 bytes not processed)"), True),
    (ValueError("cannot reshape array of size 10 into shape (256,256,3)"), True),
    (OSError(5, "Input/output error"), False),  # the disk, not the data: retried
    (FileNotFoundError(2, "No such file or directory"), False),
    (ImportError("no module named openjpeg"), False),  # a codec not installed
    (TypeError("unsupported operand"), False),
    (RuntimeError("thread pool shut down"), False),
])
def test_which_errors_mean_corrupt_bytes(error, corrupt):
    assert is_corrupt_data(error) is corrupt


def test_the_decoding_libraries_own_errors_mean_corrupt_bytes():
    import imagecodecs
    from PIL import Image, UnidentifiedImageError
    from wsidicom.errors import WsiDicomFileError, WsiDicomOutOfBoundsError

    for data, decode in ((b"\xff\xd8 not a jpeg", imagecodecs.jpeg8_decode), (b"not a j2k", imagecodecs.jpeg2k_decode)):
        with pytest.raises(RuntimeError, match=".") as raised:
            decode(data)
        assert is_corrupt_data(raised.value)
    assert is_corrupt_data(UnidentifiedImageError("cannot identify image file"))
    assert is_corrupt_data(Image.DecompressionBombError("frame of 10^12 pixels"))
    assert is_corrupt_data(WsiDicomFileError("f.dcm", "broken offset table"))
    assert not is_corrupt_data(WsiDicomOutOfBoundsError("tile (9, 9)", "(4, 3)"))  # our wrong index


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(BadInput, match="no such file or folder"):
        inspect_files([tmp_path / "nope"])


def _levels(*um: float) -> tuple[LevelInfo, ...]:
    return tuple(LevelInfo(i, 100, 100, 10, 10, u / 1000, ()) for i, u in enumerate(um))


def test_level_choice_uses_a_level_within_ten_percent_as_is():
    level, scale = choose_level(_levels(0.25, 0.5, 1.0, 2.0), 0.52)
    assert (level.index, scale) == (1, 1.0)


def test_level_choice_downsamples_the_next_finer_level_when_none_is_close():
    level, scale = choose_level(_levels(0.25, 0.5, 1.0, 4.0), 2.0)
    assert (level.index, scale) == (2, 2.0)
    level, scale = choose_level(_levels(0.23, 0.92), 0.5)
    assert level.index == 0 and scale == pytest.approx(0.5 / 0.23)


def test_level_choice_refuses_slides_too_coarse_for_the_model():
    with pytest.raises(BadInput, match="finest level is 2 µm/px but the model needs 0.5 µm/px"):
        choose_level(_levels(2.0, 4.0), 0.5)
