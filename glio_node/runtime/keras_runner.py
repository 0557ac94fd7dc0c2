"""Run a bundle's Keras networks on batches of tiles, on the device the operator chose.

The only module besides ``bundle``/``networks`` that imports Keras.  Networks are plain Keras 3
models (backend-agnostic); device choice is backend-specific and lives here:
``auto`` uses a GPU when the backend sees one, ``cpu`` hides GPUs, ``gpu`` refuses to start
without one.  Batches are padded to a fixed size so the compiled graph is traced once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from glio_node.errors import BadInput

Device = Literal["auto", "cpu", "gpu"]

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def select_device(device: Device) -> str:
    """Apply the device choice before any model is built; return what is used ("cpu" or "gpu:N").

    Must run before Keras creates tensors.  Raises ``BadInput`` for ``gpu`` without a GPU.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise BadInput(f"device {device!r} is not one of auto, cpu, gpu")
    if device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    import keras

    backend = keras.backend.backend()
    gpus: list = []
    if backend == "tensorflow":
        import tensorflow as tf

        if device == "cpu":
            tf.config.set_visible_devices([], "GPU")
        else:
            gpus = tf.config.list_physical_devices("GPU")
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
    elif backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"] if device != "cpu" else []
    elif backend == "torch":
        import torch

        gpus = list(range(torch.cuda.device_count())) if device != "cpu" else []
    if device == "gpu" and not gpus:
        raise BadInput(f"--device gpu was asked for but the {backend} backend sees no GPU; use --device auto or cpu")
    return f"gpu:{len(gpus)}" if gpus else "cpu"


@dataclass
class KerasRunner:
    """Predict with one network: uint8 RGB tiles in, a dict of head outputs out.

    Segmentation heads return class indices per pixel (uint8, argmax of the softmax), so the
    full probability volume never leaves this function; classifier heads return probabilities.
    """

    model: object  # keras.Model
    normalization: str
    batch_size: int
    segmentation_tasks: frozenset[str]

    def __post_init__(self) -> None:
        if self.normalization not in ("scale_0_1", "imagenet"):
            raise BadInput(f"normalization {self.normalization!r} is not one of scale_0_1, imagenet")
        if self.batch_size < 1:
            raise BadInput(f"batch size {self.batch_size} must be at least 1")

    def _normalise(self, tiles: np.ndarray) -> np.ndarray:
        x = tiles.astype(np.float32) / 255.0
        if self.normalization == "imagenet":
            x = (x - _IMAGENET_MEAN) / _IMAGENET_STD
        return x

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """``tiles``: (n, T, T, 3) uint8 with n <= batch_size."""
        n = tiles.shape[0]
        if n > self.batch_size:
            raise ValueError(f"{n} tiles exceed the batch size {self.batch_size}")
        x = self._normalise(tiles)
        if n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), np.float32)])
        outputs = self.model.predict_on_batch(x)
        if not isinstance(outputs, dict):
            raise BadInput("the bundle's network must output a dict keyed by task; re-export the bundle")
        result: dict[str, np.ndarray] = {}
        for task, value in outputs.items():
            value = np.asarray(value)[:n]
            if task in self.segmentation_tasks:
                result[task] = value.argmax(axis=-1).astype(np.uint8)
            else:
                result[task] = value.astype(np.float32)
        return result
