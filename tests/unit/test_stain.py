"""Stain normalisation (Reinhard, Macenko): the worker and training apply the same exact transform."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from glio_node.bundle import normalize
from glio_node.pipeline.stain import (
    REFERENCE_MEAN,
    REFERENCE_STD,
    estimate_stain_matrix,
    lab_to_rgb,
    macenko,
    reinhard,
    rgb_to_lab,
    tissue_pixels,
)
from glio_node.synthetic.slide import SlideSpec, layout_for, render_patch


def _tiles():
    spec = SlideSpec(width_px=512, height_px=512)
    patch = render_patch(spec, layout_for(spec), 0, 0, 0, 512, 512)
    return patch.reshape(2, 256, 2, 256, 3).transpose(0, 2, 1, 3, 4).reshape(4, 256, 256, 3)


def test_colour_space_round_trips():
    rgb = np.random.default_rng(0).uniform(0.05, 1, size=(50, 3))
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-9)


def test_a_recoloured_slide_is_brought_back_to_the_reference():
    tiles = _tiles()
    # A different staining batch: the tissue darker and bluer; the glass stays white-balanced,
    # as scanners calibrate it.
    recoloured = np.clip(tiles.astype(np.float32) * np.array([0.8, 0.85, 1.0]) + np.array([0, 0, 20]), 0, 255).astype(np.uint8)
    shifted = np.where(tissue_pixels(tiles)[..., None], recoloured, tiles)
    a, b = reinhard(tiles), reinhard(shifted)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 0.25 * np.abs(tiles.astype(int) - shifted.astype(int)).mean()
    stained = tissue_pixels(tiles[0])
    lab = rgb_to_lab(a[0][stained] / 255.0)
    np.testing.assert_allclose(lab.mean(0), REFERENCE_MEAN, atol=0.02)
    np.testing.assert_allclose(lab.std(0), REFERENCE_STD, rtol=0.15)


def test_glass_stays_glass_and_an_empty_tile_is_left_alone():
    white = np.full((64, 64, 3), 245, np.uint8)
    np.testing.assert_array_equal(reinhard(white), white)
    tile = _tiles()[0].copy()
    tile[:, :200] = 242  # mostly glass, a strip of tissue
    out = reinhard(tile)
    np.testing.assert_array_equal(out[:, :200], tile[:, :200])
    strip = out[:, 200:][tissue_pixels(tile[:, 200:])]
    assert strip.mean() > 60  # the tissue is moved to the reference, not crushed to black


def test_the_manifest_normalization_reinhard_applies_it_before_scaling():
    tiles = _tiles()
    np.testing.assert_array_equal(normalize(tiles, "reinhard"), reinhard(tiles).astype(np.float32) / 255.0)
    with pytest.raises(ValueError, match="allowed: scale_0_1, imagenet, reinhard, macenko"):
        normalize(tiles, "vahadane")


# --- Macenko -----------------------------------------------------------------------------------------
#
# Synthetic tiles that obey Beer–Lambert's law exactly: OD = C @ M.T, rendered as
# 256 * exp(-OD) - 1 (the inverse of OD = -ln((I + 1) / 256)) and rounded to uint8.  The stains and
# concentrations are known, so what Macenko estimates can be checked against the truth.


def _unit_columns(*columns):
    m = np.array(columns, np.float64).T
    return m / np.linalg.norm(m, axis=0)


# Ruifrok & Johnston 2001 (colour deconvolution), H and E: a published pair unlike the reference.
RUIFROK = _unit_columns((0.650, 0.704, 0.286), (0.072, 0.990, 0.105))
# Another lab's, bluer haematoxylin and a more purple eosin (made up, but a plausible H&E pair).
OTHER_LAB = _unit_columns((0.55, 0.76, 0.34), (0.18, 0.90, 0.40))
# The reference of the common Macenko implementations (normalizeStaining.py, torchstain), typed
# here from the source rather than imported, so a changed constant fails these tests.
PUBLISHED_REFERENCE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
PUBLISHED_MAX_C = np.array([1.9705, 1.0308])


def _concentrations(seed=0, size=320):
    """(size, size, 2) H and E concentrations: one pixel in twenty pure H, one in twenty pure E."""
    rng = np.random.default_rng(seed)
    c = np.stack([rng.uniform(0.1, 1.5, size * size), rng.uniform(0.1, 1.0, size * size)], axis=1)
    kind = rng.integers(0, 20, size * size)
    c[kind == 0, 1] = 0.0
    c[kind == 1, 0] = 0.0
    return c.reshape(size, size, 2)


def _render(concentrations, stains):
    return np.clip(np.rint(256.0 * np.exp(-concentrations @ stains.T) - 1.0), 0, 255).astype(np.uint8)


def _degrees(a, b):
    """Angle between corresponding columns of two (3, k) matrices."""
    cos = (a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _mean_abs(a, b):
    return np.abs(a.astype(int) - b.astype(int)).mean()


@pytest.mark.parametrize("stains", [RUIFROK, OTHER_LAB, PUBLISHED_REFERENCE], ids=["ruifrok", "other", "reference"])
def test_the_stain_matrix_of_a_beer_lambert_tile_is_recovered_haematoxylin_first(stains):
    estimated = estimate_stain_matrix(_render(_concentrations(), stains))
    assert estimated.shape == (3, 2)
    np.testing.assert_allclose(np.linalg.norm(estimated, axis=0), 1.0, atol=1e-9)
    # H and E are 40 (Ruifrok) / 22 (reference) degrees apart: 3 degrees also checks the order.
    assert np.all(_degrees(estimated, stains) < 3.0), _degrees(estimated, stains)


def test_macenko_re_renders_the_true_concentrations_with_the_reference_stains():
    c = _concentrations()
    out = macenko(_render(c, RUIFROK))
    # What Macenko promises, computed from the true concentrations: each stain scaled so that its
    # 99th percentile is the reference's, rendered with the reference stain vectors.
    expected = _render(c / np.percentile(c.reshape(-1, 2), 99, axis=0) * PUBLISHED_MAX_C, PUBLISHED_REFERENCE)
    assert _mean_abs(out, expected) < 1.5
    assert _mean_abs(_render(c, RUIFROK), expected) > 10  # the test is not trivially passed
    assert np.all(_degrees(estimate_stain_matrix(out), PUBLISHED_REFERENCE) < 3.0)


def test_two_stainings_of_the_same_tissue_become_the_same():
    c = _concentrations(seed=1)
    a = _render(c, RUIFROK)
    b = _render(1.3 * c, OTHER_LAB)  # another lab's dyes, and stained 30 % darker
    assert _mean_abs(a, b) > 15
    assert _mean_abs(macenko(a), macenko(b)) < 1.0


def test_macenko_leaves_glass_alone_and_tiles_without_two_stains_unchanged():
    tile = _render(_concentrations(size=128), RUIFROK)
    tile[:, :48] = (241, 242, 240)  # glass
    out = macenko(tile)
    np.testing.assert_array_equal(out[:, :48], tile[:, :48])
    assert _mean_abs(out[:, 48:], tile[:, 48:]) > 5  # the tissue was renormalised

    glass = np.full((64, 64, 3), 255, np.uint8)
    glass[10:20] = 236
    np.testing.assert_array_equal(macenko(glass), glass)
    with pytest.raises(ValueError, match=r"0 of 4096 pixels .* at least 64"):
        estimate_stain_matrix(glass)

    flat = np.full((64, 64, 3), (180, 90, 160), np.uint8)  # one colour: no plane, no two stains
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NaN cast to uint8 warns
        np.testing.assert_array_equal(macenko(flat), flat)
    with pytest.raises(ValueError, match="do not span two distinct stains"):
        estimate_stain_matrix(flat)


def test_macenko_treats_each_tile_of_a_batch_on_its_own():
    a = _render(_concentrations(seed=2, size=64), RUIFROK)
    b = _render(_concentrations(seed=3, size=64), OTHER_LAB)
    batch = macenko(np.stack([a, b]))
    assert batch.shape == (2, 64, 64, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], macenko(a))
    np.testing.assert_array_equal(batch[1], macenko(b))


def test_the_manifest_normalization_macenko_applies_it_before_scaling():
    tiles = _tiles()
    np.testing.assert_array_equal(normalize(tiles, "macenko"), macenko(tiles).astype(np.float32) / 255.0)
    beer_lambert = _render(_concentrations(size=64), RUIFROK)
    np.testing.assert_array_equal(normalize(beer_lambert, "macenko"), macenko(beer_lambert).astype(np.float32) / 255.0)
    assert not np.array_equal(macenko(beer_lambert), beer_lambert)
