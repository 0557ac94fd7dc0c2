"""A label map becomes polygons QuPath and Slim draw where the pixels are: exact, valid, fast.

The polygons are checked against the pixels they came from (rasterised back at pixel centres),
on hand-made shapes that trip naive tracers (holes, islands in holes, pixels touching only at a
corner) and on random masks; the simplified outlines stay within the stated tolerance; and a
slide-sized label map is polygonised in seconds, not minutes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import shapely
from scipy import ndimage
from shapely.geometry import MultiPolygon

from glio_node.pipeline.polygonise import (
    SIMPLIFY_TOLERANCE_PX,
    _LabelEdges,
    polygonise,
    region_polygons,
    simplify,
)
from glio_node.results import NOT_TISSUE
from glio_node.writers.ann import hole_free_pieces


def rasterise(geometry, shape: tuple[int, int]) -> np.ndarray:
    """Which pixel centres of a (rows, cols) raster lie inside ``geometry``."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return shapely.contains_xy(geometry, cols + 0.5, rows + 0.5)


def test_a_ring_with_an_island_in_its_hole_keeps_both():
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True
    mask[2:7, 2:7] = False  # the hole
    mask[4, 4] = True  # an island inside it
    got = polygonise(mask)
    assert got.is_valid
    assert len(got.geoms) == 2
    ring = max(got.geoms, key=lambda p: p.area)
    assert len(ring.interiors) == 1 and ring.area == 49 - 25
    assert (rasterise(got, mask.shape) == mask).all()


def test_pixels_touching_only_at_a_corner_give_valid_polygons():
    mask = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], bool)  # a checkerboard: every corner crosses
    got = polygonise(mask)
    assert got.is_valid, shapely.is_valid_reason(got)
    assert got.area == 5 and (rasterise(got, mask.shape) == mask).all()


@pytest.mark.parametrize("seed", range(5))
def test_random_masks_come_back_pixel_for_pixel(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        shape = tuple(int(n) for n in rng.integers(1, 24, size=2))
        mask = rng.random(shape) < rng.random()
        got = polygonise(mask)
        assert got.is_valid, shapely.is_valid_reason(got)
        assert got.area == mask.sum()
        assert (rasterise(got, mask.shape) == mask).all()


def test_an_empty_mask_has_no_polygon_and_a_3d_one_is_refused():
    assert polygonise(np.zeros((4, 4), bool)).is_empty
    with pytest.raises(ValueError, match=r"mask must be 2-D \(rows, cols\), got shape \(2, 2, 2\)"):
        polygonise(np.zeros((2, 2, 2), bool))


def test_simplified_outlines_stay_within_the_tolerance_and_keep_their_holes():
    yy, xx = np.mgrid[:200, :200]
    disc = (xx - 100) ** 2 + (yy - 100) ** 2 < 80**2
    hole = (xx - 100) ** 2 + (yy - 100) ** 2 < 20**2
    exact = polygonise(disc & ~hole)
    simple = simplify(exact, SIMPLIFY_TOLERANCE_PX)
    assert simple.is_valid and len(simple.geoms) == 1 and len(simple.geoms[0].interiors) == 1
    assert shapely.hausdorff_distance(exact.boundary, simple.boundary) <= SIMPLIFY_TOLERANCE_PX + 1e-9
    assert shapely.get_num_coordinates(simple) < 0.8 * shapely.get_num_coordinates(exact)
    assert simple.area == pytest.approx(exact.area, rel=0.01)


def test_simplifying_never_collapses_a_single_pixel():
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True
    assert simplify(polygonise(mask), SIMPLIFY_TOLERANCE_PX).area == 1.0


def test_ann_pieces_of_a_polygon_with_holes_have_none_and_cover_the_same_area():
    mask = np.zeros((40, 40), bool)
    mask[2:38, 2:38] = True
    mask[5:10, 5:10] = mask[20:30, 8:12] = mask[25:27, 30:35] = False
    polygons = polygonise(mask)
    assert sum(len(p.interiors) for p in polygons.geoms) == 3
    pieces = hole_free_pieces(polygons)
    assert all(not p.interiors for p in pieces)
    assert shapely.union_all(pieces).symmetric_difference(polygons).area == pytest.approx(0, abs=1e-9)
    assert sum(p.area for p in pieces) == pytest.approx(polygons.area)


def _slide_like_label_map(size: int, seed: int) -> np.ndarray:
    """Ten blob-shaped classes over an irregular piece of tissue, with speckle, like a model's."""
    rng = np.random.default_rng(seed)
    coarse = size // 8
    fields = ndimage.gaussian_filter(rng.random((10, coarse, coarse)), sigma=(0, 6, 6))
    labels = np.argmax(fields, axis=0).astype(np.uint8)
    tissue = ndimage.gaussian_filter(rng.random((coarse, coarse)), 12) > 0.5
    labels[~tissue] = NOT_TISSUE
    label_map = np.repeat(np.repeat(labels, 8, axis=0), 8, axis=1)
    speckle = (rng.random(label_map.shape) < 0.001) & (label_map != NOT_TISSUE)
    label_map[speckle] = rng.integers(0, 10, int(speckle.sum()))
    return label_map


def test_a_4096_px_label_map_is_polygonised_in_seconds_and_agrees_with_its_pixels():
    label_map = _slide_like_label_map(4096, seed=1)
    t0 = time.perf_counter()
    polygons = region_polygons(label_map, 10, mm_per_px=0.002, background=NOT_TISSUE)
    seconds = time.perf_counter() - t0
    print(f"4096x4096 label map, 10 classes + tissue, simplified: {seconds:.1f} s")
    assert seconds < 20  # about 3 s here; a per-pixel Python walk would take minutes
    assert polygons.tissue.is_valid and all(p.is_valid for p in polygons.regions)
    # Agreement on a crop (rasterising 16 Mpx per class would dominate the test).
    crop = (slice(1024, 2048), slice(1024, 2048))
    window = shapely.box(1024, 1024, 2048, 2048)
    truth = label_map[crop]
    back = np.full(truth.shape, NOT_TISSUE, np.uint8)
    for label, geometry in enumerate(polygons.regions):
        part = shapely.transform(geometry.intersection(window), lambda xy: xy - 1024)
        back[rasterise(part, truth.shape)] = label
    inside = truth != NOT_TISSUE
    assert (back[inside] == truth[inside]).mean() >= 0.98
    tissue_back = rasterise(shapely.transform(polygons.tissue.intersection(window), lambda xy: xy - 1024), truth.shape)
    assert (tissue_back == inside).mean() >= 0.99
    assert isinstance(polygons.tissue, MultiPolygon)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (37, 53), (64, 64)])
@pytest.mark.parametrize("band_px", [1, 40, 55 * 3, 1 << 20])
def test_edges_found_band_by_band_are_those_of_the_whole_map(shape, band_px):
    """The label map's edges are found a band of rows at a time (a whole-map padded copy and
    comparison would be 2 B per label-map pixel): any band height gives the same edges in the
    same order, hence the same polygons, as one band over the whole map."""
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    label_map = rng.integers(0, 4, size=shape).astype(np.uint8)
    label_map[label_map == 3] = NOT_TISSUE
    whole = _LabelEdges(label_map, NOT_TISSUE, band_px=(shape[0] + 2) * (shape[1] + 2))
    banded = _LabelEdges(label_map, NOT_TISSUE, band_px=band_px)
    for name in ("v_i", "v_j", "v_a", "v_b", "h_i", "h_j", "h_a", "h_b"):
        assert np.array_equal(getattr(banded, name), getattr(whole, name)), name
    # and the edges are right: every pixel of each class comes back from its polygons
    polygons = region_polygons(label_map, 3, mm_per_px=1.0, background=NOT_TISSUE, tolerance_px=0)
    for label, geometry in enumerate(polygons.regions):
        assert np.array_equal(rasterise(geometry, shape), label_map == label)
