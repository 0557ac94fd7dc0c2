"""Reinhard stain normalisation: the worker and training apply the same exact transform."""

from __future__ import annotations

import numpy as np
import pytest

from glio_node.bundle import normalize
from glio_node.pipeline.stain import (
    REFERENCE_MEAN,
    REFERENCE_STD,
    lab_to_rgb,
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
    with pytest.raises(ValueError, match="allowed: scale_0_1, imagenet, reinhard"):
        normalize(tiles, "macenko")
