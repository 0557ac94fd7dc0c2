"""Plain TIFF slides of research collections are cut into exactly the tiles their DICOM twin gives.

The reference is glio-node's own synthetic slide: ``write_synthetic_slide`` writes it as a DICOM
WSI with uncompressed (lossless) frames, and the test paints the very same pixels (the writer's
``render_patch``, tile by tile) into a TIFF.  So the DICOM path, which the worker uses, is the
reference for cells, tiles and labels, and the painted image itself is an independent reference
for the pixels of tiles read without resizing.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from glio_node.synthetic.slide import SlideSpec, SyntheticSlide, layout_for, render_patch, write_synthetic_slide
from slides import write_pyramidal_tiff
from training.dataset import load_dataset, validate_dataset
from training.tiff_slide import FLAT_FRAME, TiffSlide, UnknownSpacingError
from training.tiles import TileSpec, extract_slide, load_or_extract

SLIDE = SlideSpec(
    width_px=1536, height_px=1024, um_per_px=0.5, tile_size=256, levels=2,
    transfer_syntax="uncompressed", context_images=False, seed=11,
)
MASK_UM = 8.0
CM = 10_000.0  # µm per cm


def painted_level(slide: SyntheticSlide, level: int) -> np.ndarray:
    """The RGB pixels of a level exactly as the DICOM writer painted them (tile by tile)."""
    geo = slide.spec.level_geometries()[level]
    t = geo.tile_size
    out = np.empty((geo.tile_rows * t, geo.tile_columns * t, 3), np.uint8)
    for tr in range(geo.tile_rows):
        for tc in range(geo.tile_columns):
            out[tr * t : (tr + 1) * t, tc * t : (tc + 1) * t] = slide.render_region(level, tc * t, tr * t, t, t)
    return out[: geo.rows, : geo.columns]


def crop(image: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """Tile (row, col) of a grid without overlap, white past the image edge (the worker's glass)."""
    out = np.full((size, size, 3), 255, np.uint8)
    part = image[row * size : (row + 1) * size, col * size : (col + 1) * size]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def write_dataset(root: Path, slide_id: str, labels_csv: str, mask: np.ndarray | None) -> Path:
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text(labels_csv)
    if mask is not None:
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / f"{slide_id}.png")
    return root


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(dicom dataset, tiff dataset, levels as painted): one slide, same mask, two formats."""
    base = tmp_path_factory.mktemp("twins")
    slide = write_synthetic_slide(SLIDE, base / "dicom" / "slides" / "S")
    mask = slide.truth_labels(MASK_UM)
    csv_text = "slide_id,patient_id,subtype,mgmt,egfr\nS,P,,,\n"
    dicom = write_dataset(base / "dicom", "S", csv_text, mask)
    tiff = write_dataset(base / "tiff", "S", csv_text, mask)
    levels = [painted_level(slide, k) for k in range(2)]
    with tifffile.TiffWriter(tiff / "slides" / "S.tif") as w:
        for k, image in enumerate(levels):
            px_per_cm = CM / (SLIDE.um_per_px * 2**k)
            w.write(
                image, tile=(256, 256), photometric="rgb", compression="zlib",
                resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                subifds=1 if k == 0 else None, subfiletype=0 if k == 0 else 1, metadata=None,
            )
    return dicom, tiff, levels


@pytest.mark.parametrize(
    "spec, level",
    [
        (TileSpec(um_per_px=1.0, tile_size=128, min_tissue=0.5), 1),  # level 1 as it is
        (TileSpec(um_per_px=0.5, tile_size=256, min_tissue=0.0), 0),  # level 0 as it is, every tissue tile
        (TileSpec(um_per_px=2.0, tile_size=64, min_tissue=0.5), None),  # level 1 resized by 1/2
    ],
)
def test_a_pyramidal_tiff_gives_the_tiles_of_its_dicom_twin(twins, spec, level):
    dicom_root, tiff_root, painted = twins
    dicom_rec, tiff_rec = load_dataset(dicom_root)[0], load_dataset(tiff_root)[0]
    assert dicom_rec.is_dicom and not tiff_rec.is_dicom
    dicom, tiff = extract_slide(dicom_rec, spec, dicom_root), extract_slide(tiff_rec, spec, tiff_root)

    assert len(dicom.cells) > 5
    np.testing.assert_array_equal(tiff.cells, dicom.cells)
    np.testing.assert_array_equal(tiff.images, dicom.images)
    np.testing.assert_array_equal(tiff.labels, dicom.labels)
    # TIFF tiles are decoded one at a time, as DICOM frames are: the same frames, no whole level.
    assert tiff.frames_decoded == dicom.frames_decoded > 0
    if level is not None:  # no resizing: each tile is a crop of the painted level
        for (r, c), tile in zip(tiff.cells, tiff.images):
            np.testing.assert_array_equal(tile, crop(painted[level], r, c, spec.tile_size))


def test_the_pyramid_levels_and_spacings_match_the_dicom_twin(twins):
    from glio_node.runtime.slide_reader import DicomSlide

    dicom_root, tiff_root, _ = twins
    with DicomSlide.open([dicom_root / "slides" / "S"]) as d, TiffSlide.open(tiff_root / "slides" / "S.tif") as t:
        expected = [(lvl.rows, lvl.cols, lvl.frame_rows, lvl.frame_cols, lvl.um_per_px) for lvl in d.levels]
        assert [(lvl.rows, lvl.cols, lvl.frame_rows, lvl.frame_cols, lvl.um_per_px) for lvl in t.levels] == expected
        assert expected == [(1024, 1536, 256, 256, 0.5), (512, 768, 256, 256, 1.0)]
        np.testing.assert_array_equal(t.read_frame(1, 1, 2), d.read_frame(1, 1, 2))
        assert t.decodes == {1: 1}


def test_a_flat_tiff_with_its_spacing_in_labels_csv_is_extracted_and_cached_by_that_spacing(twins, tmp_path):
    _, _, painted = twins
    root = write_dataset(tmp_path / "flat", "F", "slide_id,patient_id,subtype,mgmt,egfr,um_per_px\nF,P,,,,0.5\n", None)
    (root / "masks").mkdir()
    Image.fromarray(np.full((128, 192), 255, np.uint8)).save(root / "masks" / "F.png")  # unlabelled, right aspect
    tifffile.imwrite(root / "slides" / "F.tif", painted[0], photometric="rgb", rowsperstrip=64)  # strips
    with tifffile.TiffFile(root / "slides" / "F.tif") as tif:  # tifffile's default: 1 pixel per no unit
        assert not tif.pages[0].is_tiled and tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE

    records, problems = validate_dataset(root)
    assert problems == [] and records[0].um_per_px == 0.5
    spec = TileSpec(um_per_px=0.5, tile_size=256, min_tissue=0.5)
    shard = load_or_extract(records[0], spec, root, tmp_path / "cache")
    assert len(shard.cells) > 5 and shard.frames_decoded > 0
    for (r, c), tile in zip(shard.cells, shard.images):
        np.testing.assert_array_equal(tile, crop(painted[0], r, c, 256))
    assert load_or_extract(records[0], spec, root, tmp_path / "cache").frames_decoded == 0
    # Another spacing in labels.csv is another slide to the cache: 0.25 µm/px halves the tissue's size.
    finer = load_or_extract(replace(records[0], um_per_px=0.25), spec, root, tmp_path / "cache")
    assert finer.frames_decoded > 0 and len(finer.cells) < len(shard.cells)


def test_a_tiff_without_spacing_is_a_problem_naming_the_slide_and_the_column(twins, tmp_path):
    _, _, painted = twins
    root = write_dataset(tmp_path / "nospacing", "F", "slide_id,patient_id,um_per_px\nF,P,\nG,P,abc\nH,P,-1\n", np.full((128, 192), 255, np.uint8))
    for name in "FGH":
        tifffile.imwrite(root / "slides" / f"{name}.tif", painted[0][:64, :96], photometric="rgb")
    shutil.copy(root / "masks" / "F.png", root / "masks" / "G.png")

    records, problems = validate_dataset(root)
    text = [str(p) for p in problems]
    assert "labels.csv line 3: um_per_px 'abc' must be a positive number of micrometres per pixel (or empty to read it from the slide)" in text
    assert any(t.startswith("labels.csv line 4: um_per_px '-1' must be a positive number") for t in text)
    for name in "FGH":  # a bad value is no value: each slide is still reported for its spacing
        assert any(t.startswith(f"slides/{name}.tif: records no pixel spacing") and "um_per_px column of labels.csv" in t for t in text)
    assert len(problems) == 5, text  # and the mask of F (right aspect) is no problem
    assert validate_dataset(root, check_images=False)[1] == problems[:2]  # spacing needs the file opened
    with pytest.raises(UnknownSpacingError, match=r"F\.tif: records no pixel spacing .* um_per_px column of labels\.csv"):
        extract_slide(records[0], TileSpec(um_per_px=0.5, tile_size=64), root)


def test_an_aperio_svs_description_gives_the_spacing_of_the_base_level_only(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (1024, 768, 3), np.uint8)
    path = tmp_path / "s.svs"
    head = "Aperio Image Library v12.0.15 \r\n"
    with tifffile.TiffWriter(path) as w:
        w.write(image, tile=(256, 256), photometric="rgb", description=head + "768x1024 [0,0 768x1024] (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990|Filename = s", metadata=None)
        w.write(image[::8, ::8], photometric="rgb", description=head + "96x128 -> 96x128 - ", metadata=None)  # thumbnail
        # Reduced SVS levels repeat the base MPP in their own description: it must not be taken as theirs.
        w.write(image[::4, ::4], tile=(256, 256), photometric="rgb", description=head + "768x1024 -> 192x256 - |AppMag = 20|MPP = 0.4990", metadata=None)
    with TiffSlide.open(path) as slide:
        assert [(lvl.rows, lvl.cols) for lvl in slide.levels] == [(1024, 768), (256, 192)]
        assert [lvl.um_per_px for lvl in slide.levels] == pytest.approx([0.499, 1.996])
        np.testing.assert_array_equal(slide.read_frame(1, 0, 0)[:256, :192], image[::4, ::4])
    with TiffSlide.open(path, um_per_px=0.25) as slide:  # labels.csv overrides the file
        assert [lvl.um_per_px for lvl in slide.levels] == pytest.approx([0.25, 1.0])


@pytest.mark.parametrize(
    "unit, res, expected",
    [
        ("CENTIMETER", 20_000.0, 0.5),
        ("INCH", 101_600.0, 0.25),
        ("INCH", 72.0, None),  # what image editors write
        ("INCH", 96.0, None),
        ("NONE", 20_000.0, None),
    ],
)
def test_resolution_tags_give_the_spacing_unless_they_are_defaults(tmp_path, unit, res, expected):
    path = tmp_path / "r.tif"
    tifffile.imwrite(path, np.full((64, 96, 3), 200, np.uint8), photometric="rgb", resolution=(res, res), resolutionunit=unit)
    if expected is None:
        with pytest.raises(UnknownSpacingError, match="um_per_px column"):
            TiffSlide.open(path)
    else:
        with TiffSlide.open(path) as slide:
            assert slide.levels[0].um_per_px == pytest.approx(expected)


def test_reduced_levels_with_the_base_levels_tags_are_scaled_by_their_size(tmp_path):
    """Some writers copy the base level's resolution to every level; trusting it would read a
    4x coarser level as if it had the base spacing."""
    image = np.full((512, 512, 3), 90, np.uint8)
    path = tmp_path / "copied.tif"
    with tifffile.TiffWriter(path) as w:
        for k, step in enumerate((1, 4)):
            w.write(image[::step, ::step], tile=(128, 128), photometric="rgb", resolution=(CM / 0.5, CM / 0.5),
                    resolutionunit="CENTIMETER", subfiletype=1 if k else 0, metadata=None)
    with TiffSlide.open(path) as slide:
        assert [lvl.um_per_px for lvl in slide.levels] == pytest.approx([0.5, 2.0])


def test_a_pyramid_written_as_separate_plain_pages_is_read_as_levels(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (400, 600, 3), np.uint8)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as w:  # tifffile's own metadata: three separate series
        for step in (1, 2, 4):
            w.write(image[::step, ::step], tile=(128, 128), photometric="rgb", resolution=(CM / 0.5, CM / 0.5), resolutionunit="CENTIMETER")
        w.write(image[:50, :50], photometric="rgb")  # same file, other aspect: not a level
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == 4 and len(tif.series[0].levels) == 1
    with TiffSlide.open(path) as slide:
        assert [(lvl.rows, lvl.cols, lvl.um_per_px) for lvl in slide.levels] == [(400, 600, 0.5), (200, 300, 1.0), (100, 150, 2.0)]
        np.testing.assert_array_equal(slide.read_frame(2, 0, 1)[:100, :22], image[::4, ::4][:, 128:])


def read_level(slide: TiffSlide, level: int = 0) -> np.ndarray:
    """A whole level assembled from its frames (past the edge included)."""
    info = slide.levels[level]
    n_r, n_c = -(-info.rows // info.frame_rows), -(-info.cols // info.frame_cols)
    return np.concatenate(
        [np.concatenate([slide.read_frame(level, r, c) for c in range(n_c)], axis=1) for r in range(n_r)], axis=0
    )


def padded(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.full((rows, cols, 3), 255, np.uint8)
    out[: image.shape[0], : image.shape[1]] = image
    return out


rgb = np.random.default_rng(2).integers(0, 256, (300, 200, 3), np.uint8)
alpha = np.random.default_rng(3).integers(0, 256, (300, 200), np.uint8)
alpha[:10] = 0  # fully transparent rows: glass
a = alpha[..., None].astype(np.float64) / 255
OVER_WHITE = np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)  # unassociated alpha composited on white
GREY = np.repeat(rgb[..., :1], 3, axis=-1)


@pytest.mark.parametrize(
    "data, kwargs, expected",
    [
        (rgb[..., 0], dict(photometric="minisblack"), GREY),
        (255 - rgb[..., 0], dict(photometric="miniswhite"), GREY),
        (np.dstack([rgb, alpha]), dict(photometric="rgb", extrasamples=["unassalpha"]), OVER_WHITE),
        (np.dstack([rgb, np.full_like(alpha, 255)]), dict(photometric="rgb", extrasamples=["assocalpha"]), rgb),
        (np.dstack([rgb, alpha]), dict(photometric="rgb", extrasamples=["unspecified"]), rgb),  # not alpha: dropped
        (np.moveaxis(rgb, -1, 0), dict(photometric="rgb", planarconfig="separate"), rgb),
    ],
    ids=["grey", "miniswhite", "rgba", "premultiplied-opaque", "extra-sample", "planar"],
)
@pytest.mark.parametrize("layout", ["tiled", "strips"])
def test_pixels_become_rgb_with_white_past_the_edge(tmp_path, data, kwargs, expected, layout):
    path = tmp_path / "p.tif"
    extra = dict(tile=(128, 128)) if layout == "tiled" else dict(rowsperstrip=32)
    tifffile.imwrite(path, data, compression="zlib", resolution=(CM / 0.5, CM / 0.5), resolutionunit="CENTIMETER", **kwargs, **extra)
    with TiffSlide.open(path) as slide:
        frame = 128 if layout == "tiled" else FLAT_FRAME
        assert (slide.levels[0].frame_rows, slide.levels[0].frame_cols) == (frame, frame)
        whole = read_level(slide)
        assert whole.dtype == np.uint8 and whole.shape[2] == 3
        np.testing.assert_array_equal(whole, padded(expected, *whole.shape[:2]))
        assert sum(slide.decodes.values()) == (3 * 2 if layout == "tiled" else 1)


def test_ycbcr_jpeg_tiles_of_a_converter_style_pyramid_are_read_as_rgb(tmp_path):
    """The pyramid tests/slides.py feeds the DICOM converters: JPEG tiles in YCbCr, one IFD per level."""
    spec = SlideSpec(width_px=512, height_px=384, levels=2, context_images=False)
    path = write_pyramidal_tiff(spec, tmp_path / "ycbcr.tif")
    with TiffSlide.open(path) as slide:
        assert [(lvl.rows, lvl.cols, lvl.um_per_px) for lvl in slide.levels] == [(384, 512, 0.5), (192, 256, 1.0)]
        painted = render_patch(spec, layout_for(spec), 0, 256, 0, 256, 256).astype(np.int16)
        got = slide.read_frame(0, 0, 1).astype(np.int16)
        assert np.abs(got - painted).mean() < 4  # JPEG quality 95, chroma subsampled


def test_other_sample_types_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint16), photometric="rgb", resolution=(CM, CM), resolutionunit="CENTIMETER")
    with pytest.raises(ValueError, match=r"deep\.tif: samples are 16-bit uint16 .* only 8-bit"):
        TiffSlide.open(path)
    cmyk = tmp_path / "cmyk.tif"
    tifffile.imwrite(cmyk, np.zeros((64, 64, 4), np.uint8), photometric="separated", resolution=(CM, CM), resolutionunit="CENTIMETER")
    with pytest.raises(ValueError, match=r"cmyk\.tif: photometric SEPARATED with 4 sample\(s\)"):
        TiffSlide.open(cmyk)


def test_a_spacing_on_a_dicom_slides_row_is_a_problem_not_silently_ignored(twins, tmp_path):
    dicom_root, _, _ = twins
    root = tmp_path / "dicom"
    shutil.copytree(dicom_root, root)
    (root / "labels.csv").write_text("slide_id,patient_id,um_per_px\nS,P,0.25\n")
    records, problems = validate_dataset(root, check_images=False)
    assert [str(p) for p in problems] == ["labels.csv line 2: um_per_px is for TIFF slides only: a DICOM slide's spacing is its PixelSpacing; leave the cell empty"]
    assert records[0].um_per_px is None
