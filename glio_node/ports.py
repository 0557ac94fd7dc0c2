"""The two ports of the analysis: where pixels come from and what turns tiles into outputs.

``pipeline.analyze`` depends on these protocols only, never on an adapter.  Adapters:

- ``SlideReader``: ``runtime.slide_reader.DicomSlide`` (wsidicom), ``training.tiff_slide.TiffSlide``,
  and the numpy ``glio_node.testing.FakeSlide``;
- ``ModelRunner``: ``runtime.keras_runner.KerasNetwork``, and ``glio_node.testing.FakeRunner``;
  any runtime (ONNX, ...) that offers the same attributes and ``predict`` fits.  A tile encoder
  is a ``ModelRunner`` without heads whose ``predict`` returns ``{"embeddings": (n, D)}`` and
  which says its ``embed_dim`` (``TileEncoder``; ``glio_node.testing.FakeEncoder``);
- ``BagRunner``: a slide-level aggregator head (``runtime.bag_runner``, and
  ``glio_node.testing.FakeAggregator``).

One required primitive per port (``read_frame``, ``predict``); what else a port offers has a
default built on that primitive, so a new adapter is small and may still replace a default
with something faster.  ``tests/unit/test_port_contracts.py`` runs the same checks over every
adapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from glio_node.pipeline.levels import LevelInfo
from glio_node.results import CodedClass


@runtime_checkable
class SlideReader(Protocol):
    """An opened slide: its pyramid levels, and decoded frames by (level, row, column).

    ``levels``: finest first, ``levels[i].index == i``.  ``read_frame`` is the primitive: it
    returns RGB uint8 of the level's full frame size (edge frames padded), so callers paste frames
    without special cases; it must be safe to call from several threads (the pipeline decodes
    ahead of the model in a pool).  The pipeline counts its own reads (decode accounting), so a
    reader need not count.

    Adapters that subclass this protocol inherit the defaults below: ``read_frames`` loops over
    ``read_frame`` (the pipeline reads the tissue level through it); ``gaps`` /
    ``missing_frames_read`` describe a whole slide and ``close`` does nothing; those three are
    for ``job.run_job`` (the notes of an incomplete slide, and releasing the files), the
    pipeline never uses them.
    """

    levels: tuple[LevelInfo, ...]

    def read_frame(self, level: int, frame_row: int, frame_col: int) -> np.ndarray:
        """Decode one frame: (frame_rows, frame_cols, 3) uint8."""
        ...

    def read_frames(self, level: int, positions: Iterable[tuple[int, int]]) -> list[np.ndarray]:
        """Decode several frames of one level, in the order of ``positions`` ((row, col) pairs)."""
        return [self.read_frame(level, row, col) for row, col in positions]

    # What the series lacked (one line each), for a reader that accepts an incomplete series
    # and reads its missing frames as glass; empty for a whole slide.
    gaps: tuple[str, ...] = ()

    @property
    def missing_frames_read(self) -> int:
        """How many frames ``read_frame`` returned as glass because the series lacked them."""
        return 0

    def close(self) -> None:
        """Release files and decoders; the reader is not used afterwards."""


@runtime_checkable
class Head(Protocol):
    """One output of a network: its task, its classes, and when a slide call is too unsure."""

    task: str  # "segmentation" or a classifier task (e.g. "subtype")
    classes: tuple[CodedClass, ...]
    indeterminate_below: float  # a slide call below this probability is "indeterminate"


@runtime_checkable
class ModelRunner(Protocol):
    """A network as the pipeline runs it: its tile geometry, its heads, and ``predict``.

    ``predict`` is the primitive and is already the batch method: ``tiles`` is (n, T, T, 3)
    uint8 with ``T == tile_size`` and 1 <= n <= the batch size the runner was built for (the
    pipeline never sends more).  It returns one array per head, keyed by ``task``:
    ``segmentation`` -> (n, T, T) uint8 class indices; a classifier -> (n, len(classes)) float32
    probabilities.  Each tile's output depends on that tile only (batching does not change it).
    """

    name: str
    tile_size: int  # px per tile side on the analysis raster
    um_per_px: float  # the raster's spacing the network was trained at
    overlap: int  # px shared by neighbouring segmentation tiles (centre-crop stitching)
    heads: tuple[Head, ...]

    def predict(self, tiles: np.ndarray) -> Mapping[str, np.ndarray]: ...


EMBEDDINGS = "embeddings"  # the key of a TileEncoder's predict output


@runtime_checkable
class TileEncoder(ModelRunner, Protocol):
    """A tile network that encodes each tile to one D-vector: ``heads == ()``, ``predict`` ->
    ``{"embeddings": (n, embed_dim) float32}``; its tiles are planned like a classifier's."""

    embed_dim: int


@runtime_checkable
class BagRunner(Protocol):
    """A slide-level head that reads the bag of one encoder's embeddings (attention-MIL).

    ``predict_bag`` is the primitive: ``embeddings`` is (N, D) float16, N >= 1 (every tissue
    tile of the slide, in the pipeline's order); it returns ``probabilities`` (k, C) float32,
    one row per fold model (k = 1 without folds), and ``attention`` (k, N) float32, each row
    softmax over the bag.  The pipeline averages the folds (pipeline/bag.py ``ensemble_call``).
    """

    name: str
    task: str
    classes: tuple[CodedClass, ...]
    encoder: str  # the TileEncoder's name whose bag it reads
    indeterminate_below: float
    max_fold_spread: float  # 1.0: never indeterminate for fold disagreement

    def predict_bag(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
