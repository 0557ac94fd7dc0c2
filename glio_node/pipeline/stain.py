"""Stain normalisation shared by training and the worker: Reinhard (2001) and Macenko (2009).

Slides from different scanners and staining batches differ in colour more than a small network
tolerates.  Both methods here are exact, cheap and per tile, so training and inference apply the
very same function; a bundle asks for one with ``normalization = "reinhard"`` or ``"macenko"``
in its manifest.

- Reinhard et al. 2001 moves each tile's colour statistics in the decorrelated lαβ space
  (Ruderman et al. 1998) to those of a reference: per channel, (x - mean) / std * ref_std +
  ref_mean.  It knows nothing of stains: it matches colour statistics.
- Macenko et al. 2009 ("A method for normalizing histology slides for quantitative analysis")
  models the tile with Beer–Lambert's law: each pixel's optical density is a non-negative mix of
  two stain vectors, haematoxylin and eosin.  It estimates the tile's two stain vectors and
  each pixel's concentrations, then re-renders the same concentrations (scaled so the darkest
  1 % match the reference's) with a reference pair of stain vectors.  The tissue's structure
  (how much of each stain a pixel took up) is kept; only the dyes' colours and strength change.

Both leave glass (told by :func:`tissue_pixels`) as it is and out of their statistics.  Pure
NumPy, no I/O.  The references are fixed constants (below) so that a manifest string names the
whole transform: Reinhard's are the lαβ statistics of glio-node's synthetic H&E-like textures,
not of any real stain; Macenko's are the published reference of the method's common
implementations (see :data:`REFERENCE_STAIN_MATRIX`).
"""

from __future__ import annotations

import numpy as np

_RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS_TO_LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]])
_LMS_TO_RGB = np.linalg.inv(_RGB_TO_LMS)
_LAB_TO_LMS = np.linalg.inv(_LMS_TO_LAB)
_FLOOR = 1.0 / 255.0  # log of 0 is undefined; darker than 1/255 is black anyway

# lαβ mean and standard deviation of the reference (glio-node synthetic tissue).
REFERENCE_MEAN = (-0.5025, -0.0049, 0.0387)
REFERENCE_STD = (0.3017, 0.0573, 0.0287)
MIN_STD = 1e-4  # a flat tile (all one colour) is shifted, not stretched to infinity
GLASS_SATURATION = 0.08  # HSV saturation below this is glass (as the tissue detector's floor)
MIN_TISSUE_PIXELS = 64  # fewer stained pixels than this: no statistics worth matching


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (..., 3) -> Ruderman lαβ (..., 3), float64."""
    lms = np.clip(np.asarray(rgb, np.float64), _FLOOR, None) @ _RGB_TO_LMS.T
    return np.log10(np.clip(lms, _FLOOR, None)) @ _LMS_TO_LAB.T


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab` (not clipped)."""
    return (10.0 ** (np.asarray(lab, np.float64) @ _LAB_TO_LMS.T)) @ _LMS_TO_RGB.T


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """bool (..., H, W): pixels that are stained, not glass: HSV saturation at least
    ``GLASS_SATURATION``.  Glass is bright and grey on every scanner; stain is not."""
    x = np.asarray(rgb)
    # Max and min channel by channel in the input's own type, then float: the same values as
    # converting first and reducing the last axis, twenty times faster on a tile.
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hi = np.maximum(np.maximum(r, g), b).astype(np.float64)
    lo = np.minimum(np.minimum(r, g), b).astype(np.float64)
    return (hi - lo) >= GLASS_SATURATION * np.maximum(hi, 1e-6)


def reinhard(tiles: np.ndarray, mean=REFERENCE_MEAN, std=REFERENCE_STD) -> np.ndarray:
    """RGB uint8 tiles (N, H, W, 3) or one tile (H, W, 3) -> RGB uint8 with each tile's lαβ
    statistics, over its stained pixels, matched to ``mean``/``std``.

    Glass is left as it is and does not count in the statistics: otherwise a mostly-empty tile
    would have its glass turned pink and its tissue near-black.  Glass is told by its low
    saturation, which assumes the scanner white-balanced it (they calibrate on glass).  A tile with fewer than
    ``MIN_TISSUE_PIXELS`` stained pixels is returned unchanged.
    """
    x = np.asarray(tiles)
    single = x.ndim == 3
    batch = (x[None] if single else x).astype(np.uint8, copy=False)
    out = batch.copy()
    for i, tile in enumerate(batch):
        stained = tissue_pixels(tile)
        if stained.sum() < MIN_TISSUE_PIXELS:
            continue
        lab = rgb_to_lab(tile[stained].astype(np.float64) / 255.0)  # (K, 3)
        m = lab.mean(axis=0)
        sd = np.maximum(lab.std(axis=0), MIN_STD)
        moved = (lab - m) / sd * np.asarray(std) + np.asarray(mean)
        out[i][stained] = np.clip(np.rint(lab_to_rgb(moved) * 255.0), 0, 255).astype(np.uint8)
    return out[0] if single else out


# --- Macenko ---------------------------------------------------------------------------------------
#
# Optical density, natural log, with the (I + 1) / 256 convention: OD = -ln((I + 1) / 256), so
# white (255) is exactly 0 and black (0) is finite (ln 256 = 5.55); the inverse is
# I = 256 * exp(-OD) - 1.  The natural log (rather than Macenko's log10) keeps the published
# constants below verbatim: the reference implementations use np.log, and the log base only scales
# OD and concentrations together (log10 would need BETA and REFERENCE_MAX_C divided by ln 10; the
# transform would be the same).

REFERENCE_STAIN_MATRIX = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
"""Reference stain vectors, (3, 2): columns haematoxylin and eosin, rows R, G, B optical density.

Not glio-node's invention: the H&E reference ``HERef`` of the Macenko implementation most others
copy, Mitko Veta's MATLAB github.com/mitkovetta/staining-normalization, as ported in the widely
copied ``normalizeStaining.py`` (github.com/schaugf/HEnorm_python) and in torchstain.  Those use
Io = 240 where glio-node uses 256 (white-balanced glass is 255 here), so their output is about 6 %
darker; the stain vectors and concentrations are the same."""
REFERENCE_MAX_C = (1.9705, 1.0308)
"""99th-percentile haematoxylin and eosin concentrations of the reference (``maxCRef`` of the same
implementations), in natural-log optical density units."""
BETA = 0.15  # OD (natural log) below which a pixel is too faint for its direction to mean anything
ALPHA = 1.0  # percentile of the angles taken as the extreme stain directions (1 and 99): robust to outliers
MAX_CONDITION = 1e6  # stain vectors this close to parallel give no usable concentrations

_OD_OF_UINT8 = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)  # a lookup: uint8 -> OD


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) -> optical density -ln((I + 1) / 256), float64 (..., 3); 255 -> 0."""
    return _OD_OF_UINT8[np.asarray(rgb, np.uint8)]


def _dense_enough(od: np.ndarray) -> np.ndarray:
    """bool (...): pixels with an OD norm of at least ``BETA``, dense enough for their direction
    to be more than quantisation noise.  The norm, not "every channel", is tested: pure eosin
    hardly absorbs red, so a per-channel test would drop nearly all of it and leave the eosin
    direction to chance."""
    return np.einsum("...c,...c->...", od, od) >= BETA * BETA


def _fit_stain_matrix(od: np.ndarray) -> np.ndarray | None:
    """OD of usable pixels (K, 3) -> unit stain vectors (3, 2), haematoxylin first; None when the
    pixels do not span a plane (one colour) or give two near-parallel vectors."""
    # The plane of the two largest singular vectors of OD (uncentred, as Macenko: Beer–Lambert
    # mixes are a cone through the origin, not a cloud around the mean).  eigh of the 3x3 second
    # moment matrix is the SVD's right side without an SVD of K rows.
    eigenvalues, eigenvectors = np.linalg.eigh(od.T @ od)  # ascending
    if not np.all(np.isfinite(eigenvalues)) or eigenvalues[1] <= 1e-12 * eigenvalues[2]:
        return None
    plane = eigenvectors[:, [2, 1]]
    # The first vector is the Perron vector of a non-negative matrix: make it point into positive
    # OD, so every pixel projects onto it positively and its angle lies in (-90°, 90°), no wrap.
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    projected = od @ plane
    phi = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(phi, [ALPHA, 100.0 - ALPHA])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Haematoxylin (blue-purple) absorbs red more than eosin (pink) does.
    stains = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo], axis=1)
    stains /= np.linalg.norm(stains, axis=0)
    if not np.all(np.isfinite(stains)) or np.linalg.cond(stains) > MAX_CONDITION:
        return None
    return stains


def estimate_stain_matrix(rgb_pixels: np.ndarray) -> np.ndarray:
    """RGB uint8 pixels (..., 3) -> the two stain vectors (3, 2), unit length, columns
    haematoxylin and eosin, as Macenko et al. 2009 estimate them: glass and pixels fainter than
    ``BETA`` are left out; the remaining optical densities are projected onto the plane of their
    two largest singular vectors; the directions at the ``ALPHA`` and 100 - ``ALPHA`` percentiles of
    the angle in that plane are the stains; the one absorbing more red is haematoxylin.

    Raises ValueError when fewer than ``MIN_TISSUE_PIXELS`` pixels are usable or they do not
    give two distinct stains (a tile of one colour).
    """
    rgb = np.asarray(rgb_pixels, np.uint8).reshape(-1, 3)
    od = optical_density(rgb)
    usable = tissue_pixels(rgb) & _dense_enough(od)
    if usable.sum() < MIN_TISSUE_PIXELS:
        raise ValueError(
            f"{int(usable.sum())} of {len(rgb)} pixels are stained and dense enough to estimate stains from; "
            f"at least {MIN_TISSUE_PIXELS} are needed"
        )
    stains = _fit_stain_matrix(od[usable])
    if stains is None:
        raise ValueError(f"the {int(usable.sum())} usable pixels do not span two distinct stains (one colour only)")
    return stains


def macenko(tiles: np.ndarray, stain_matrix=REFERENCE_STAIN_MATRIX, max_concentrations=REFERENCE_MAX_C) -> np.ndarray:
    """RGB uint8 tiles (N, H, W, 3) or one tile (H, W, 3) -> RGB uint8, each tile's stains
    re-rendered with ``stain_matrix`` (3, 2: haematoxylin and eosin columns, OD per unit
    concentration) and ``max_concentrations`` (their 99th-percentile concentrations).

    Per tile: the stain vectors are estimated (:func:`estimate_stain_matrix`); every tissue
    pixel's two concentrations are the least-squares solution of OD = stains @ c; each stain's
    concentrations are scaled so their 99th percentile over the tissue becomes the reference's
    (over the tissue, not the tile, so how much glass a tile shows does not change how its tissue
    is rendered); the pixel is rendered as 256 * exp(-stain_matrix @ c) - 1.  Glass is left as it
    is.  A tile with fewer than ``MIN_TISSUE_PIXELS`` usable pixels, or with one colour only, is
    returned unchanged: there are no two stains to separate.
    """
    x = np.asarray(tiles)
    single = x.ndim == 3
    batch = (x[None] if single else x).astype(np.uint8, copy=False)
    reference = np.asarray(stain_matrix, np.float64)
    reference_max = np.asarray(max_concentrations, np.float64)
    out = batch.copy()
    for i, tile in enumerate(batch):
        pixels = tile.reshape(-1, 3)
        tissue = np.flatnonzero(tissue_pixels(pixels))
        od = optical_density(pixels[tissue])  # (K, 3), tissue only
        dense = _dense_enough(od)
        if dense.sum() < MIN_TISSUE_PIXELS:
            continue
        stains = _fit_stain_matrix(od[dense])
        if stains is None:
            continue
        concentrations = od @ np.linalg.pinv(stains).T  # (K, 2), least squares
        tile_max = np.percentile(concentrations, 99, axis=0)
        if not np.all(tile_max > 0):  # a stain absent from the tissue: nothing to scale
            continue
        rendered = 256.0 * np.exp(-(concentrations * (reference_max / tile_max)) @ reference.T) - 1.0
        if not np.all(np.isfinite(rendered)):
            continue
        out[i].reshape(-1, 3)[tissue] = np.clip(np.rint(rendered), 0, 255).astype(np.uint8)
    return out[0] if single else out
