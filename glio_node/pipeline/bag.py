"""The bag of a slide's tile embeddings, and the slide call of a fold ensemble: pure numpy.

A two-stage task (docs/model-bundle.md) encodes every tissue tile of a slide to a D-vector and
hands the whole bag to attention-MIL heads.  The bag is the one slide-sized thing it holds, so it
is preallocated once, from the number of tissue cells (known from the tissue mask before any
tile is decoded), as float16: **N x D x 2 bytes** (100,000 tiles x 1,024 dims = 205 MB; x 768 =
154 MB).  Tiles are not kept: the encoder's output row is copied in and the tile batch is
dropped.  ``bench/mil_memory.py`` measures the bound.
"""

from __future__ import annotations

import numpy as np

from glio_node.results import CodedClass, SlideCall, Task
from glio_node.pipeline.stitch import slide_call


def bag_bytes(n_tiles: int, embed_dim: int) -> int:
    """Bytes of the preallocated bag: N x D float16."""
    return int(n_tiles) * int(embed_dim) * np.dtype(np.float16).itemsize


class EmbeddingBag:
    """A bounded float16 (capacity, D) buffer of embeddings with each row's grid cell.

    ``add`` copies rows in as they come back from the encoder (in any order: tiles arrive frame
    by frame); filling past ``capacity`` is a pipeline bug and raises.  ``embeddings`` and
    ``cells`` are views of the filled rows.
    """

    def __init__(self, capacity: int, embed_dim: int):
        if capacity < 0 or embed_dim < 1:
            raise ValueError(f"bag capacity {capacity} and embed_dim {embed_dim} must be >= 0 and >= 1")
        self._embeddings = np.zeros((capacity, embed_dim), np.float16)
        self._cells = np.zeros((capacity, 2), np.int32)
        self.count = 0

    @property
    def capacity(self) -> int:
        return self._embeddings.shape[0]

    @property
    def nbytes(self) -> int:
        return self._embeddings.nbytes

    def add(self, rows: np.ndarray, cols: np.ndarray, embeddings: np.ndarray) -> None:
        n = len(rows)
        if self.count + n > self.capacity:
            raise ValueError(f"bag of {self.capacity} tiles overfilled by {self.count + n - self.capacity}")
        if embeddings.shape != (n, self._embeddings.shape[1]):
            raise ValueError(f"embeddings of shape {embeddings.shape}; the bag holds ({n}, {self._embeddings.shape[1]})")
        self._embeddings[self.count : self.count + n] = embeddings  # cast to float16 here
        self._cells[self.count : self.count + n, 0] = rows
        self._cells[self.count : self.count + n, 1] = cols
        self.count += n

    @property
    def embeddings(self) -> np.ndarray:
        return self._embeddings[: self.count]

    @property
    def cells(self) -> np.ndarray:
        """(count, 2) int32 grid (row, column) of each embedding."""
        return self._cells[: self.count]


def fold_spread(fold_probabilities: np.ndarray) -> float:
    """max - min across folds of the probability each fold gives the mean's top class (0 for one)."""
    p = np.asarray(fold_probabilities, np.float64)
    top = int(np.argmax(p.mean(axis=0)))
    return float(p[:, top].max() - p[:, top].min())


def ensemble_call(
    task: Task,
    classes: tuple[CodedClass, ...],
    fold_probabilities: np.ndarray | None,
    threshold: float,
    max_fold_spread: float,
) -> SlideCall:
    """The slide call of k fold models: the mean of their probabilities, indeterminate below
    ``threshold`` (reason "low_probability") or when their spread exceeds ``max_fold_spread``
    (reason "fold_disagreement", which wins: the folds do not agree on what the slide is)."""
    if fold_probabilities is None:  # no tissue: no bag
        return slide_call(task, classes, None, threshold)
    p = np.asarray(fold_probabilities, np.float64)
    call = slide_call(task, classes, p.mean(axis=0), threshold)
    spread = fold_spread(p)
    reason = None
    if spread > max_fold_spread:
        reason = "fold_disagreement"
    elif call.call is None:
        reason = "low_probability"
    return SlideCall(
        task=call.task, classes=call.classes, probabilities=call.probabilities, threshold=threshold,
        call=None if reason else call.call, folds=len(p), fold_spread=spread,
        max_fold_spread=max_fold_spread, indeterminate_reason=reason,
    )
