"""Reinhard stain normalisation (Reinhard et al. 2001), shared by training and the worker.

Slides from different scanners and staining batches differ in colour more than a small network
tolerates.  Reinhard's method moves each tile's colour statistics in the decorrelated lαβ space
(Ruderman et al. 1998) to those of a reference: per channel, (x - mean) / std * ref_std +
ref_mean.  It is exact, cheap and per tile, so training and inference apply the very same
function; a bundle asks for it with ``normalization = "reinhard"`` in its manifest.

Pure NumPy, no I/O.  The reference statistics are fixed constants (below) so that a manifest
string names the whole transform; they are the lαβ statistics of glio-node's synthetic H&E-like
textures, not of any real stain.
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
    x = np.asarray(rgb, np.float64)
    hi, lo = x.max(axis=-1), x.min(axis=-1)
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
