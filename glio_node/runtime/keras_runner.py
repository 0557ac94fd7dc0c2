"""Run a bundle's Keras networks on batches of tiles, on the device the operator chose.

The only module besides ``bundle``/``networks`` that imports Keras.  Networks are plain Keras 3
models (backend-agnostic); device choice is backend-specific and lives here:
``auto`` uses a GPU when the backend sees one, ``cpu`` hides GPUs, ``gpu`` refuses to start
without one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np

from glio_node.bundle import LoadedBundle, LoadedNetwork, normalize
from glio_node.errors import BadInput, BundleError
from glio_node.ood import FEATURES_KEY

Device = Literal["auto", "cpu", "gpu"]

@contextlib.contextmanager
def _native_stderr_silenced():
    """TensorFlow's C++ runtime prints start-up chatter (oneDNN, CUDA probing) straight to file
    descriptor 2, before and despite TF_CPP_MIN_LOG_LEVEL.  Operators read that as errors, so it
    is hidden while the backend starts, unless GLIO_DEBUG is set."""
    if os.environ.get("GLIO_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def select_device(device: Device) -> str:
    """Apply the device choice before any model is built; return what is used ("cpu" or "gpu:N").

    Must run before Keras creates tensors.  Raises ``BadInput`` for ``gpu`` without a GPU.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise BadInput(f"device {device!r} is not one of auto, cpu, gpu")
    if device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _native_stderr_silenced():
        return _select_device(device)


def _select_device(device: Device) -> str:
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
class KerasNetwork:
    """One bundle network as the pipeline uses it (a :class:`glio_node.ports.ModelRunner`):
    geometry, heads, and ``predict``.

    Segmentation heads return class indices per pixel (uint8, argmax of the softmax), so the full
    probability volume never leaves this class; classifier heads return probabilities.  Batches
    are padded to ``batch_size`` so the backend traces one input shape only.
    """

    loaded: LoadedNetwork
    batch_size: int
    features: str | None = None  # [ood] features: also return this layer's output per tile (FEATURES_KEY)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BadInput(f"batch size {self.batch_size} must be at least 1")
        spec = self.loaded.spec
        if spec.runtime != "keras":
            raise ValueError(f"network {spec.name!r} runs on {spec.runtime}: use runtime/runners.bundle_networks")
        self.name, self.tile_size, self.um_per_px = spec.name, spec.tile_size, spec.um_per_px
        self.overlap, self.heads = spec.overlap, spec.heads
        self._model = self.loaded.model if self.features is None else with_features(self.loaded.model, self.features)

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """``tiles``: (n, T, T, 3) uint8 with n <= batch_size."""
        n = tiles.shape[0]
        if n > self.batch_size:
            raise ValueError(f"{n} tiles exceed the batch size {self.batch_size}")
        x = normalize(tiles, self.loaded.spec.normalization)
        if n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), np.float32)])
        outputs = self._model.predict_on_batch(x)
        result: dict[str, np.ndarray] = {}
        for task, value in outputs.items():
            value = np.asarray(value)[:n]
            if task == FEATURES_KEY:
                value = value.reshape(n, -1)
            result[task] = value.argmax(axis=-1).astype(np.uint8) if task == "segmentation" else value.astype(np.float32)
        return result


def with_features(model, layer: str):
    """``model`` with one more output, ``FEATURES_KEY``: the output of ``layer`` (the OOD gate's
    features, e.g. the classifier's global-average-pooled ``"features"``).  Same weights, one pass."""
    import keras

    try:
        output = model.get_layer(layer).output
    except ValueError:
        names = [lyr.name for lyr in model.layers]
        raise BundleError(
            f"[ood] features layer {layer!r} is not a layer of network {model.name!r} (layers: {', '.join(names[-8:])}, ...); "
            "fix the manifest's [ood] features or re-fit the reference"
        ) from None
    return keras.Model(model.inputs, {**model.output, FEATURES_KEY: output}, name=f"{model.name}_with_features")


def bundle_networks(bundle: LoadedBundle, batch_size: int) -> list[KerasNetwork]:
    """The bundle's networks, ready for ``pipeline.analyze``; Keras networks only (a bundle that
    may hold ONNX networks goes through ``runtime/runners.bundle_networks``)."""
    return [KerasNetwork(n, batch_size) for n in bundle.networks]
