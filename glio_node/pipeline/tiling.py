"""Tile grids on the analysis raster, and which source frames each tile needs.

Pure functions and frozen records, no I/O.  Two coordinate systems meet here:

- the *analysis raster*: pixels at the network's spacing, (0, 0) at the top-left corner of the
  slide's total pixel matrix (glio_node.results' geometry convention);
- the *source level*: the pyramid level we read, whose pixels are ``scale`` times smaller
  (``scale`` = 1 when a level is within 10 % of the network's spacing, > 1 when we read a finer
  level and downsample).

A segmentation grid uses centre-crop stitching: tile ``i`` starts at ``i * stride - overlap // 2``
and keeps its centre ``[i * stride, (i + 1) * stride)``, so every raster pixel is predicted by
exactly one tile at least ``overlap // 2`` px from that tile's edge, and no seam can appear.
A classifier grid (overlap 0) keeps whole tiles: one heatmap pixel per tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

_SNAP = 1e-6  # relative: pixel coordinates and areas this close to an integer are that integer (float noise in spacings)


def _snap(v: float) -> float:
    """``v`` rounded when it is within ``_SNAP`` (relative) of an integer.  Converters store
    spacings with float noise (OrthancWSIDicomizer: 0.000500000024 mm for 0.5 µm/px), so an edge
    or a size that is an integer in exact arithmetic computes as 15.99999999 or 512.00002; floor
    and ceil would then move it by a whole pixel."""
    r = round(v)
    return float(r) if abs(v - r) < _SNAP * max(1.0, abs(v)) else v


def raster_shape(level_rows: int, level_cols: int, scale: float) -> tuple[int, int]:
    """(rows, cols) of a network's raster: a level of ``level_rows`` x ``level_cols`` px read at
    ``scale`` level px per raster px (``choose_level``).  2048 px at 2.0 / 0.500000024 is 512
    raster px, not 513."""
    return math.ceil(_snap(level_rows / scale)), math.ceil(_snap(level_cols / scale))


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``tile_size`` px over a raster of ``raster_rows`` x ``raster_cols`` px."""

    raster_rows: int
    raster_cols: int
    tile_size: int
    overlap: int  # px shared by neighbouring tiles; even, < tile_size

    def __post_init__(self) -> None:
        if self.tile_size <= 0:
            raise ValueError(f"tile size {self.tile_size} px must be positive")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(
                f"overlap {self.overlap} px must be at least 0 and smaller than the tile, "
                f"{self.tile_size} px"
            )
        if self.overlap % 2:
            raise ValueError(f"overlap {self.overlap} px must be even (half is cropped each side)")
        if self.raster_rows <= 0 or self.raster_cols <= 0:
            raise ValueError(f"raster {self.raster_rows}x{self.raster_cols} px is empty")

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    @property
    def rows(self) -> int:
        return math.ceil(self.raster_rows / self.stride)

    @property
    def cols(self) -> int:
        return math.ceil(self.raster_cols / self.stride)

    def tile_origin(self, row: int, col: int) -> tuple[int, int]:
        """Raster (y, x) of the tile's top-left pixel; may be negative at the top/left edge."""
        half = self.overlap // 2
        return row * self.stride - half, col * self.stride - half

    def kept_region(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Raster (y0, x0, y1, x1) that this tile's prediction is written to (clipped)."""
        y0, x0 = row * self.stride, col * self.stride
        return y0, x0, min(y0 + self.stride, self.raster_rows), min(x0 + self.stride, self.raster_cols)

    def cells_with_tissue(
        self, tissue: np.ndarray, tissue_mm_per_px: float, raster_mm_per_px: float, min_fraction: float
    ) -> np.ndarray:
        """Bool (rows, cols): tiles whose kept region holds tissue.

        ``tissue`` is a bool mask over the slide (top-left aligned) with pixels
        ``tissue_mm_per_px`` wide; the raster's pixels are ``raster_mm_per_px`` wide.  A tile is
        kept when its kept region holds any tissue (``min_fraction`` 0) or at least
        ``min_fraction`` of it is tissue.  Parts of a region beyond the mask count as glass.
        """
        f = raster_mm_per_px / tissue_mm_per_px  # mask px per raster px
        # A tile edge on a mask pixel edge must not move by a mask pixel with the spacing's float
        # noise (_snap), or the same slide's tiles would be scored on different windows.
        mh, mw = tissue.shape
        out = np.zeros((self.rows, self.cols), dtype=bool)
        # Summed-area table: one pass over the mask, O(1) per tile.
        sat = np.pad(tissue.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        for r in range(self.rows):
            for c in range(self.cols):
                y0, x0, y1, x1 = self.kept_region(r, c)
                my0, mx0 = min(int(_snap(y0 * f)), mh - 1), min(int(_snap(x0 * f)), mw - 1)
                my1 = max(my0 + 1, min(mh, math.ceil(_snap(y1 * f))))
                mx1 = max(mx0 + 1, min(mw, math.ceil(_snap(x1 * f))))
                n = sat[my1, mx1] - sat[my0, mx1] - sat[my1, mx0] + sat[my0, mx0]
                area = max(1.0, _snap((y1 - y0) * (x1 - x0) * f * f))
                out[r, c] = n > 0 if min_fraction <= 0 else n / area >= min_fraction
        return out


@dataclass(frozen=True)
class LevelWindow:
    """Where a tile lies on the source level: the (y0, x0, y1, x1) px box to read, then resize
    to ``tile_size`` when ``scale`` != 1.  The box may stick out of the level; the reader pads."""

    y0: int
    x0: int
    y1: int
    x1: int


def level_window(grid: TileGrid, row: int, col: int, scale: float) -> LevelWindow:
    """The source-level box that tile (row, col) of ``grid`` covers."""
    ty, tx = grid.tile_origin(row, col)
    return LevelWindow(
        y0=round(ty * scale),
        x0=round(tx * scale),
        y1=round((ty + grid.tile_size) * scale),
        x1=round((tx + grid.tile_size) * scale),
    )


def frames_for_window(
    window: LevelWindow, frame_size: tuple[int, int], level_size: tuple[int, int]
) -> Iterator[tuple[int, int]]:
    """(frame_row, frame_col) of every frame of the level that the window overlaps.

    ``frame_size`` and ``level_size`` are (rows, cols) in px.  Parts of the window outside the
    level need no frame.
    """
    fh, fw = frame_size
    lh, lw = level_size
    y0, x0 = max(window.y0, 0), max(window.x0, 0)
    y1, x1 = min(window.y1, lh), min(window.x1, lw)
    if y1 <= y0 or x1 <= x0:
        return
    for fr in range(y0 // fh, (y1 - 1) // fh + 1):
        for fc in range(x0 // fw, (x1 - 1) // fw + 1):
            yield fr, fc
