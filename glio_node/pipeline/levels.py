"""Pyramid levels as the pipeline sees them, and which level a network reads.

These live on the pipeline side so the pipeline never imports a reader: a slide reader (the
DICOM one in ``runtime/slide_reader``, the numpy fake in ``glio_node.testing``, the training's
TIFF reader) builds ``LevelInfo`` records; the pipeline only reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glio_node.errors import BadInput

if TYPE_CHECKING:
    import pydicom


@dataclass(frozen=True)
class LevelInfo:
    """A pyramid level as the pipeline sees it (index 0 = finest)."""

    index: int
    rows: int  # TotalPixelMatrixRows
    cols: int  # TotalPixelMatrixColumns
    frame_rows: int
    frame_cols: int
    mm_per_px: float  # square pixels assumed; the larger of row/column spacing if they differ
    # The level's instance headers (several for a concatenation): what the writers derive the
    # outputs from.  Empty for a reader that has no DICOM source (training's TIFF reader).
    headers: tuple[pydicom.Dataset, ...] = ()

    @property
    def um_per_px(self) -> float:
        return self.mm_per_px * 1000.0


def choose_level(levels: tuple[LevelInfo, ...], target_um_per_px: float, tolerance: float = 0.10) -> tuple[LevelInfo, float]:
    """The level to read for a network that wants ``target_um_per_px``, and the downsampling scale.

    The level nearest the target is used as it is when within ``tolerance`` (10 %); otherwise the
    coarsest level that is still finer than the target is read and downsampled by
    ``target / level spacing``.  Raises ``BadInput`` when every level is coarser than that.
    """
    nearest = min(levels, key=lambda lvl: abs(math.log(lvl.um_per_px / target_um_per_px)))
    if abs(nearest.um_per_px - target_um_per_px) <= tolerance * target_um_per_px:
        return nearest, 1.0
    finer = [lvl for lvl in levels if lvl.um_per_px < target_um_per_px]
    if not finer:
        finest = min(lvl.um_per_px for lvl in levels)
        raise BadInput(
            f"the slide's finest level is {finest:.3g} µm/px but the model needs {target_um_per_px:.3g} µm/px; "
            "scan or convert the slide at a higher resolution"
        )
    level = max(finer, key=lambda lvl: lvl.um_per_px)
    return level, target_um_per_px / level.um_per_px
