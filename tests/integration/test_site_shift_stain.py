"""The test site's stain (training/stain_shift.py): drawn reproducibly from a seed, a real change
of the dyes' colour and strength, glass left alone, and the identity when asked for none."""

from __future__ import annotations

import numpy as np
import pytest

from glio_node.pipeline.stain import estimate_stain_matrix, optical_density, tissue_pixels
from glio_node.synthetic.textures import GLASS_RGB
from training.errors import ConfigError
from training.stain_shift import StainShift, apply_stain_shift, draw_shift


def _he_tile(seed: int = 0) -> np.ndarray:
    """A 64 x 64 tile mixing the reference haematoxylin and eosin by Beer-Lambert, with glass."""
    rng = np.random.default_rng(seed)
    stains = draw_shift(StainShift(rotation_deg=0.0, intensity=(1.0, 1.0))).source
    c = rng.uniform(0.0, 1.2, size=(64, 64, 2))
    rgb = np.clip(np.rint(256.0 * np.exp(-(c @ stains.T)) - 1.0), 0, 255).astype(np.uint8)
    rgb[:16] = GLASS_RGB
    return rgb


def test_the_same_seed_draws_the_same_site_and_another_seed_another():
    a, b, c = (draw_shift(StainShift(seed=s)) for s in (3, 3, 4))
    assert np.array_equal(a.matrix, b.matrix) and not np.allclose(a.matrix, c.matrix)
    for d in (a, c):
        assert np.all((10.0 - 1e-6 <= d.rotations_deg) & (d.rotations_deg <= 20.0 + 1e-6))
        assert np.all(d.target >= 0) and np.allclose(np.linalg.norm(d.target, axis=0), 1.0)
        assert np.all((d.intensities <= 0.6 ** 0.5 + 1e-9) | (d.intensities >= 1.6 ** 0.5 - 1e-9)), "never near the identity"


def test_the_shift_turns_the_stain_vectors_as_drawn_and_leaves_glass_alone():
    tile = _he_tile()
    drawn = draw_shift(StainShift(seed=1, rotation_deg=25.0))
    out = apply_stain_shift(tile, drawn)
    assert np.array_equal(out[:16], tile[:16]), "glass"
    stained = tissue_pixels(tile)
    assert np.abs(out[stained].astype(int) - tile[stained]).mean() > 5
    # Macenko's estimate on the shifted tile finds the drawn vectors, not the source's.
    estimated = estimate_stain_matrix(out[16:])
    for i in range(2):
        to_target = np.degrees(np.arccos(np.clip(estimated[:, i] @ drawn.target[:, i], -1, 1)))
        to_source = np.degrees(np.arccos(np.clip(estimated[:, i] @ drawn.source[:, i], -1, 1)))
        assert to_target < to_source and to_target < 6.0, (i, to_target, to_source)
    # The concentrations scale by the drawn intensities (OD of a pure-stain mix is linear in c).
    od_in, od_out = optical_density(tile[stained]), optical_density(out[stained])
    assert np.linalg.norm(od_out, axis=1).mean() != pytest.approx(np.linalg.norm(od_in, axis=1).mean(), rel=0.05)


def test_no_rotation_and_unit_intensity_is_the_identity_and_bad_ranges_are_refused():
    tile = _he_tile(2)
    assert np.array_equal(apply_stain_shift(tile, draw_shift(StainShift(rotation_deg=0.0, intensity=(1.0, 1.0)))), tile)
    with pytest.raises(ConfigError, match=r"intensity \[1.2, 1.6\] must be \[low, high\] with 0 < low <= 1 <= high"):
        StainShift(intensity=(1.2, 1.6))
    with pytest.raises(ConfigError, match="rotation_deg 90 must be in"):
        StainShift(rotation_deg=90)
    with pytest.raises(ConfigError, match="unknown key.*hue"):
        StainShift.from_table({"hue": 3})
