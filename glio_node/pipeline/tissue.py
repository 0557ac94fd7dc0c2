"""Tissue detection on a low-resolution image of the slide, so that glass never reaches a model.

Otsu's threshold on saturation (H&E-stained tissue is coloured, glass is grey-white) combined
with an optical-density floor (very dark debris and pen marks are not glass either, but faint
tissue is), then a morphological clean-up: closing, hole filling, and removal of objects smaller
than ``min_object_mm2``.  Pure functions on arrays; the pipeline decides which level to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Otsu's threshold is kept within these bounds.  Below the floor nothing is tissue (an all-glass
# image has a meaningless Otsu threshold).  The ceiling matters when the tissue itself has two
# colour populations (pale stroma and deep-red vessels, say): Otsu then splits the tissue rather
# than tissue from glass, and pale tissue (saturation ~0.12) would be lost.  Glass stays < 0.05.
MIN_SATURATION = 0.06
MAX_SATURATION = 0.10
# Look for tissue on a level near this spacing: 8 µm/px resolves 0.01 mm² objects with ~150 px.
TISSUE_UM_PER_PX = 8.0


@dataclass(frozen=True)
class TissueMask:
    """A bool mask over the slide (top-left aligned with the total pixel matrix)."""

    mask: np.ndarray
    mm_per_px: float

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * self.mm_per_px**2

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    mx = rgb.max(axis=2)
    mn = rgb.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def detect_tissue(rgb: np.ndarray, mm_per_px: float, min_object_mm2: float = 0.01) -> TissueMask:
    """Tissue mask of an RGB uint8 image whose pixels are ``mm_per_px`` wide."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"tissue detection needs an RGB image, got shape {rgb.shape}")
    sat = _saturation(rgb)
    threshold = min(max(otsu_threshold(sat), MIN_SATURATION), MAX_SATURATION)
    od = -np.log10(np.clip(rgb.astype(np.float32), 1, 255) / 255.0).mean(axis=2)
    mask = (sat >= threshold) | (od > 1.0)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes * mm_per_px**2 >= min_object_mm2
        mask = keep[labels]
    return TissueMask(mask=mask.astype(bool), mm_per_px=mm_per_px)


def resample_mask(mask: TissueMask, rows: int, cols: int, mm_per_px: float, row0: int = 0) -> np.ndarray:
    """Nearest-neighbour resample of the tissue mask onto raster rows ``row0 .. row0+rows``.

    The raster has pixels ``mm_per_px`` wide, top-left aligned like the mask; raster pixels past
    the mask's edge are glass.  Called band by band so that no slide-sized mask is built.
    """
    f = mm_per_px / mask.mm_per_px
    ri = ((np.arange(row0, row0 + rows) + 0.5) * f).astype(np.intp)
    ci = ((np.arange(cols) + 0.5) * f).astype(np.intp)
    mh, mw = mask.mask.shape
    out = np.zeros((rows, cols), dtype=bool)
    rv, cv = ri < mh, ci < mw
    out[np.ix_(rv, cv)] = mask.mask[np.ix_(ri[rv], ci[cv])]
    return out
