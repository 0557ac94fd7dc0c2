"""Two-stage networks as the pipeline runs them: tile encoders (``ports.TileEncoder``) and
attention-MIL aggregator heads (``ports.BagRunner``), for both runtimes.

An encoder is a tile network whose one output is the embedding, so it reuses the tile runners'
normalisation and batching; an aggregator runs its fold models one after the other on the whole
bag (one slide per call: the bag dimension is dynamic, B = 1).  The bag arrives as float16; a Keras head gets it as it is
(Keras casts it to float32 inside the call: handing it a float32 copy cost 200 MB more at
100,000 x 1,024), an ONNX head a copy in its input's dtype.  The call's transient memory is a
few times the bag (docs/benchmarks.md, "MIL bag memory").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glio_node.normalization import normalize
from glio_node.runtime.loading import LoadedNetwork
from glio_node.errors import BadInput
from glio_node.ports import EMBEDDINGS
from glio_node.runtime.keras_runner import KerasNetwork
from glio_node.runtime.onnx_runner import OnnxNetwork, _softmax


class KerasEncoder(KerasNetwork):
    """A Keras ``kind = "encoder"`` network: (n, T, T, 3) uint8 -> ``{"embeddings": (n, D) float32}``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.embed_dim = self.loaded.spec.embed_dim

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        n = tiles.shape[0]
        if n > self.batch_size:
            raise ValueError(f"{n} tiles exceed the batch size {self.batch_size}")
        x = normalize(tiles, self.loaded.spec.normalization)
        if n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), np.float32)])
        return {EMBEDDINGS: np.asarray(self.loaded.model.predict_on_batch(x))[:n].astype(np.float32)}


class OnnxEncoder(OnnxNetwork):
    """An ONNX ``kind = "encoder"`` network: its declared ``output`` is the embedding."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.embed_dim = self.loaded.spec.embed_dim
        self._outputs = [self.loaded.spec.output.name]

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        n = tiles.shape[0]
        if n > self.batch_size:
            raise ValueError(f"{n} tiles exceed the batch size {self.batch_size}")
        x = normalize(tiles, self.loaded.spec.normalization)
        if self._channels_first:
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        (value,) = self.loaded.model.run(self._outputs, {self._input: x.astype(self._dtype, copy=False)})
        return {EMBEDDINGS: np.asarray(value, np.float32)}


@dataclass
class Aggregator:
    """A ``kind = "aggregator"`` network (a :class:`glio_node.ports.BagRunner`): each fold model
    on the bag, keras (runtime/mil.py's contract) or onnx (its declared signature: [1, bag, D] ->
    [1, C], [1, bag], or bag-only [bag, D] -> [C], [bag])."""

    loaded: LoadedNetwork

    def __post_init__(self) -> None:
        spec = self.loaded.spec
        if spec.kind != "aggregator":
            raise ValueError(f"network {spec.name!r} is a {spec.kind} network, not an aggregator")
        head = spec.heads[0]
        self.name, self.task, self.classes, self.encoder = spec.name, head.task, head.classes, spec.encoder
        self.indeterminate_below, self.max_fold_spread = head.indeterminate_below, head.max_fold_spread
        self._activation = head.activation

    def predict_bag(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) float16 -> probabilities (k, C), attention (k, N), float32, one row per fold."""
        spec = self.loaded.spec
        n = len(embeddings)
        if n < 1 or embeddings.shape[1] != spec.embed_dim:
            raise BadInput(f"aggregator {self.name!r}: a bag of shape {embeddings.shape}; it reads (N >= 1, {spec.embed_dim})")
        probabilities, attention = [], []
        for model in self.loaded.model:
            if spec.runtime == "onnx":
                x = embeddings.astype(np.dtype(spec.input.dtype))
                if len(spec.input.shape) == 3:  # [1, bag, D]; a bag-only graph reads [bag, D]
                    x = x[None]
                p, a = model.run([spec.heads[0].output.name, spec.attention.name], {spec.input.name: x})
                p = _softmax(np.asarray(p)) if self._activation == "logits" else np.asarray(p)
            else:
                out = model(embeddings[None], training=False)  # float16 in: Keras casts it on the way
                p, a = np.asarray(out["probabilities"]), np.asarray(out["attention"])
            probabilities.append(p.reshape(-1).astype(np.float32))
            attention.append(a.reshape(-1).astype(np.float32))
        return np.stack(probabilities), np.stack(attention)
