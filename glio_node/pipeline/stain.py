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


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (..., 3) -> Ruderman lαβ (..., 3), float64."""
    lms = np.clip(np.asarray(rgb, np.float64), _FLOOR, None) @ _RGB_TO_LMS.T
    return np.log10(np.clip(lms, _FLOOR, None)) @ _LMS_TO_LAB.T


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab` (not clipped)."""
    return (10.0 ** (np.asarray(lab, np.float64) @ _LAB_TO_LMS.T)) @ _LMS_TO_RGB.T


def reinhard(tiles: np.ndarray, mean=REFERENCE_MEAN, std=REFERENCE_STD) -> np.ndarray:
    """RGB uint8 tiles (N, H, W, 3) or one tile (H, W, 3) -> RGB uint8 with each tile's lαβ
    statistics matched to ``mean``/``std``."""
    x = np.asarray(tiles)
    single = x.ndim == 3
    batch = x[None] if single else x
    lab = rgb_to_lab(batch.astype(np.float64) / 255.0)
    m = lab.mean(axis=(1, 2), keepdims=True)
    s = np.maximum(lab.std(axis=(1, 2), keepdims=True), MIN_STD)
    out = (lab - m) / s * np.asarray(std) + np.asarray(mean)
    rgb = np.clip(np.rint(lab_to_rgb(out) * 255.0), 0, 255).astype(np.uint8)
    return rgb[0] if single else rgb
