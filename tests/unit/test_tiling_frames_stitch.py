"""The tiled path gives the same answer as looking at the whole image at once.

A pathologist must never see a seam or a shifted region because the slide was cut into tiles:
these tests compare the frame reader, the tile grid and the stitcher with naive references.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from glio_node.pipeline.frames import GLASS, FramePlan, LevelGeometry, TileRequest, iter_tiles
from glio_node.pipeline.stitch import HeatmapStitcher, SegmentationStitcher, region_fractions, slide_call
from glio_node.pipeline.tiling import TileGrid, level_window, raster_shape
from glio_node.pipeline.tissue import TissueMask, detect_tissue, resample_mask
from glio_node.results import NOT_TISSUE, CodedClass


def _framed(image: np.ndarray, frame: int):
    """A fake level made of frames cut from ``image``; counts decodes per frame."""
    decodes: Counter = Counter()

    def read_frame(level: int, fr: int, fc: int) -> np.ndarray:
        decodes[(level, fr, fc)] += 1
        out = np.full((frame, frame, 3), 255, np.uint8)
        part = image[fr * frame : (fr + 1) * frame, fc * frame : (fc + 1) * frame]
        out[: part.shape[0], : part.shape[1]] = part
        return out

    return read_frame, decodes


def _image(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (rows, cols, 3), dtype=np.uint8)


@pytest.mark.parametrize("overlap", [0, 16, 32])
def test_tiles_match_direct_crops_and_each_frame_is_decoded_once(overlap):
    image = _image(300, 410)
    grid = TileGrid(raster_rows=300, raster_cols=410, tile_size=64, overlap=overlap)
    geo = LevelGeometry(size=(300, 410), frame_size=(50, 50))
    requests = [
        TileRequest(0, r, c, 0, level_window(grid, r, c, 1.0), 64) for r in range(grid.rows) for c in range(grid.cols)
    ]
    plan = FramePlan(requests, {0: geo})
    read_frame, decodes = _framed(image, 50)
    padded = np.pad(image, ((64, 64), (64, 64), (0, 0)), constant_values=GLASS)
    seen = 0
    for req, tile in iter_tiles(plan, read_frame, threads=3, lookahead=5):
        y, x = grid.tile_origin(req.row, req.col)
        np.testing.assert_array_equal(tile, padded[y + 64 : y + 128, x + 64 : x + 128])
        seen += 1
    assert seen == grid.rows * grid.cols
    assert set(decodes.values()) == {1}
    assert len(decodes) == plan.distinct_frames == 6 * 9


def _frames_held(plan: FramePlan) -> int:
    """Most frames decoded and still awaited by a later tile at any point of the plan."""
    first: dict = {}
    for i, keys in enumerate(plan.frames):
        for key in keys:
            first.setdefault(key, i)
    events = sorted([(i, 1) for i in first.values()] + [(plan.last_use[k] + 1, -1) for k in first])
    held = most = 0
    for _, step in events:
        held += step
        most = max(most, held)
    return most


@pytest.mark.parametrize("overlap", [0, 16])
def test_a_wide_level_is_read_in_column_strips_holding_a_strip_wide_band(overlap):
    # 4096 x 64 frames of 64 px (a wide, short level), tiles of 80 px: the grid and the frames meet
    # every 320 px, so without overlap strips of 320 px or more share no frame; with overlap no
    # boundary is clean and the level is read in rows, as before.
    rows, cols, frame = 640, 4096, 64
    image = _image(rows, cols)
    grid = TileGrid(raster_rows=rows, raster_cols=cols, tile_size=80, overlap=overlap)
    geo = LevelGeometry(size=(rows, cols), frame_size=(frame, frame))
    requests = [TileRequest(0, r, c, 0, level_window(grid, r, c, 1.0), 80) for r in range(grid.rows) for c in range(grid.cols)]
    plan = FramePlan(requests, {0: geo}, strip_px=512)
    by_rows = FramePlan(requests, {0: geo}, strip_px=10**9)
    read_frame, decodes = _framed(image, frame)
    padded = np.pad(image, ((80, 80), (80, 80), (0, 0)), constant_values=GLASS)
    for req, tile in iter_tiles(plan, read_frame, threads=2, lookahead=8):
        y, x = grid.tile_origin(req.row, req.col)
        np.testing.assert_array_equal(tile, padded[y + 80 : y + 160, x + 80 : x + 160])
    assert set(decodes.values()) == {1} and len(decodes) == plan.distinct_frames  # still decoded once each
    if overlap:
        assert plan.strip_widths[0] is None and _frames_held(plan) == _frames_held(by_rows)
    else:
        assert plan.strip_widths[0] == 640  # 10 frames: the first multiple of 320 px past 512
        assert _frames_held(plan) <= 2 * 640 // frame  # two frame rows of one strip
        assert _frames_held(by_rows) >= cols // frame  # a frame row of the whole level


def test_a_finer_level_is_read_and_downsampled_to_the_network_tile():
    image = _image(256, 256, seed=1)
    grid = TileGrid(raster_rows=64, raster_cols=64, tile_size=32, overlap=0)  # raster at 4x coarser
    requests = [TileRequest(0, r, c, 0, level_window(grid, r, c, 4.0), 32) for r in range(2) for c in range(2)]
    plan = FramePlan(requests, {0: LevelGeometry((256, 256), (64, 64))})
    read_frame, decodes = _framed(image, 64)
    tiles = {(req.row, req.col): tile for req, tile in iter_tiles(plan, read_frame)}
    box = image.reshape(64, 4, 64, 4, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_allclose(tiles[(1, 0)], box[32:64, 0:32], atol=1)
    assert set(decodes.values()) == {1}


def test_reader_errors_reach_the_caller():
    grid = TileGrid(raster_rows=100, raster_cols=100, tile_size=50, overlap=0)
    plan = FramePlan([TileRequest(0, 0, 0, 0, level_window(grid, 0, 0, 1.0), 50)], {0: LevelGeometry((100, 100), (50, 50))})

    def broken(level, fr, fc):
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        list(iter_tiles(plan, broken))


def _receptive_model(tile: np.ndarray) -> np.ndarray:
    """A stand-in network with a 5x5 receptive field: class = 3x3-then-3x3 box mean, binned."""
    grey = tile.astype(np.int64).sum(axis=2)  # integers: no rounding that depends on position
    box = np.ones((3, 3), np.int64)
    smooth = ndimage.convolve(ndimage.convolve(grey, box, mode="nearest"), box, mode="nearest")
    return np.digitize(smooth, [81 * 3 * 64, 81 * 3 * 128, 81 * 3 * 192]).astype(np.uint8)


def test_centre_crop_stitching_equals_the_whole_image_result():
    image = _image(333, 271, seed=2)
    grid = TileGrid(raster_rows=333, raster_cols=271, tile_size=48, overlap=8)
    pad = 64
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=GLASS)
    reference = _receptive_model(padded)[pad:-pad, pad:-pad]
    stitcher = SegmentationStitcher(grid)
    for r in range(grid.rows):
        for c in range(grid.cols):
            y, x = grid.tile_origin(r, c)
            stitcher.add(r, c, _receptive_model(padded[y + pad : y + pad + 48, x + pad : x + pad + 48]))
    np.testing.assert_array_equal(stitcher.label_map, reference)


def test_without_overlap_the_same_model_shows_seams():
    """The check above can fail: with no overlap, tile edges see padding instead of neighbours."""
    image = _image(200, 200, seed=3)
    grid = TileGrid(raster_rows=200, raster_cols=200, tile_size=48, overlap=0)
    padded = np.pad(image, ((64, 64), (64, 64), (0, 0)), constant_values=GLASS)
    reference = _receptive_model(padded)[64:-64, 64:-64]
    stitcher = SegmentationStitcher(grid)
    for r in range(grid.rows):
        for c in range(grid.cols):
            y, x = grid.tile_origin(r, c)
            stitcher.add(r, c, _receptive_model(padded[y + 64 : y + 112, x + 64 : x + 112]))
    assert (stitcher.label_map != reference).any()


def test_grid_rejects_impossible_overlap():
    with pytest.raises(ValueError, match="overlap 256 px must be .* smaller than the tile, 256 px"):
        TileGrid(raster_rows=10, raster_cols=10, tile_size=256, overlap=256)
    with pytest.raises(ValueError, match="overlap 3 px must be even"):
        TileGrid(raster_rows=10, raster_cols=10, tile_size=256, overlap=2 + 1)


def test_only_cells_with_tissue_are_selected():
    tissue = np.zeros((40, 40), bool)  # 10 µm/px mask
    tissue[0:20, 0:20] = True  # top-left 200x200 µm: 2x2 tiles of 100 µm
    grid = TileGrid(raster_rows=200, raster_cols=200, tile_size=50, overlap=0)  # 2 µm/px raster
    cells = grid.cells_with_tissue(tissue, 0.010, 0.002, 0.0)
    assert cells.sum() == 4 and cells[:2, :2].all()
    half = grid.cells_with_tissue(tissue, 0.010, 0.002, 0.5)
    assert half[:2, :2].all() and half.sum() == 4
    tissue[:] = False
    tissue[0:2, 0:2] = True  # 4 % of the first tile
    assert grid.cells_with_tissue(tissue, 0.010, 0.002, 0.0).sum() == 1
    assert grid.cells_with_tissue(tissue, 0.010, 0.002, 0.5).sum() == 0


def test_float_noise_in_a_converters_spacing_selects_the_same_cells():
    """OrthancWSIDicomizer stores 0.5 µm/px as 0.000500000024 mm (float32): the tiles chosen must
    not move by a mask pixel because of it."""
    rng = np.random.default_rng(2)
    tissue = rng.random((128, 128)) < 0.5  # 8 µm/px mask of a 2048-px slide at 0.5 µm/px
    grid = TileGrid(raster_rows=2048, raster_cols=2048, tile_size=256, overlap=0)
    exact = grid.cells_with_tissue(tissue, 0.008, 0.0005, 0.5)
    noisy = grid.cells_with_tissue(tissue, 0.00800000036, 0.000500000024, 0.5)
    assert 0 < exact.sum() < exact.size
    np.testing.assert_array_equal(noisy, exact)


def test_a_raster_is_not_a_pixel_larger_because_of_float_noise_in_the_spacing():
    # 2.0 µm/px read from a 0.5 µm/px level that a converter stored as 0.000500000024 mm
    assert raster_shape(2048, 1536, 2.0 / 0.500000024) == (512, 384)
    assert raster_shape(2048, 1536, 2.0 / 0.5) == (512, 384)
    assert raster_shape(1000, 999, 2.8) == (358, 357)  # a real fraction still rounds up
    assert raster_shape(2049, 2048, 4.0) == (513, 512)  # and a real remainder too


def test_tissue_is_found_and_glass_is_not():
    rng = np.random.default_rng(4)
    img = np.full((200, 300, 3), 242, np.uint8) + rng.integers(0, 4, (200, 300, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:200, 0:300]
    blob = (yy - 100) ** 2 / 60**2 + (xx - 120) ** 2 / 90**2 < 1
    img[blob] = (200, 140, 190)
    img[5:7, 280:282] = (200, 140, 190)  # a 4-px speck: dust, removed
    mask = detect_tissue(img, mm_per_px=0.008)
    assert abs(mask.mask.sum() - blob.sum()) / blob.sum() < 0.02
    assert not mask.mask[5:7, 280:282].any()
    assert mask.area_mm2 == pytest.approx(blob.sum() * 0.008**2, rel=0.02)
    empty = detect_tissue(np.full((50, 50, 3), 240, np.uint8), 0.008)
    assert not empty.mask.any()


def test_mask_resampling_is_top_left_aligned():
    m = np.zeros((10, 10), bool)
    m[2, 3] = True
    mask = TissueMask(m, 0.008)
    up = resample_mask(mask, 40, 40, 0.002)
    assert up[8:12, 12:16].all() and up.sum() == 16
    band = resample_mask(mask, 4, 40, 0.002, row0=8)
    np.testing.assert_array_equal(band, up[8:12])


def test_slide_calls_are_indeterminate_below_threshold():
    classes = tuple(CodedClass(n, n, "99GLIO", n) for n in ("a", "b"))
    assert slide_call("mgmt", classes, np.array([0.9, 0.1]), 0.7).call == classes[0]
    assert slide_call("mgmt", classes, np.array([0.6, 0.4]), 0.7).call is None
    assert slide_call("mgmt", classes, None, 0.7).call is None
    heat = HeatmapStitcher(TileGrid(raster_rows=20, raster_cols=20, tile_size=10, overlap=0), 2)
    assert heat.slide_probabilities() is None
    heat.add(0, 1, np.array([0.2, 0.8]))
    heat.add(1, 1, np.array([0.4, 0.6]))
    np.testing.assert_allclose(heat.slide_probabilities(), [0.3, 0.7])


def test_region_fractions_count_tissue_only():
    classes = tuple(CodedClass(n, n, "99GLIO", n) for n in ("a", "b", "c"))
    lm = np.full((10, 10), NOT_TISSUE, np.uint8)
    lm[:2] = 0
    lm[2:4] = 2
    assert region_fractions(lm, classes) == {"a": 0.5, "b": 0.0, "c": 0.5}
