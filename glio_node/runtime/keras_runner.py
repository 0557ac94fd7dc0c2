"""Run a bundle's Keras networks on batches of tiles, on the device the operator chose.

The only module besides ``bundle``/``networks`` that imports Keras.  Networks are plain Keras 3
models (backend-agnostic); device choice is backend-specific and lives here:
``auto`` uses a GPU when the backend sees one, ``cpu`` hides GPUs, ``gpu`` refuses to start
without one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np

from glio_node.normalization import normalize
from glio_node.runtime.loading import LoadedBundle, LoadedNetwork
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


Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16")
CPU_BATCH_SIZE = 8  # on a CPU a bigger batch buys nothing and holds more tiles in memory
_MAX_GPU_BATCH = 256
_GPU_MEMORY_SHARE = 0.5  # of the free device memory, for activations (weights and workspace beside)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; ``BadInput`` naming the allowed ones."""
    if precision not in PRECISIONS:
        raise BadInput(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def _with_precision(model, precision: str):
    """A copy of ``model`` computing in ``precision`` (Keras mixed policy: float32 weights,
    ``precision`` activations); the output layers keep their float32 policy, so softmax and the
    argmax after it are float32, whatever the body computes in."""
    import keras

    if precision == "float32":
        return model
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    outputs = set(copy.output_names) if hasattr(copy, "output_names") else set()
    policy = keras.dtype_policies.DTypePolicy(f"mixed_{precision}")
    for layer in copy.layers:
        if layer.name in outputs or isinstance(layer, keras.layers.InputLayer):
            continue
        layer.dtype_policy = policy
    return copy


def _on_device(model, normalization: str, precision: str):
    """The network as one device function: RGB uint8 tiles in, normalised in the graph, the
    network (in ``precision``), then argmax in the graph for segmentation heads, so only class
    indices (uint8, one byte per pixel) come back to the host, never the probability volume.

    Stain normalisations (reinhard, macenko) are numpy code of the pipeline: those networks take
    float32 tiles normalised on the host, and only the argmax moves to the device.
    """
    import keras
    from keras import ops

    from glio_node.normalization import IMAGENET_MEAN, IMAGENET_STD

    body = _with_precision(model, precision)
    shape = tuple(model.inputs[0].shape[1:])
    on_host = normalization in ("reinhard", "macenko")
    inputs = keras.Input(shape=shape, dtype="float32" if on_host else "uint8", name="tiles")
    x = inputs
    if not on_host:
        x = ops.cast(inputs, "float32") / 255.0
        if normalization == "imagenet":
            x = (x - ops.convert_to_tensor(IMAGENET_MEAN, "float32")) / ops.convert_to_tensor(IMAGENET_STD, "float32")
    outputs = body(x)
    result = {}
    for task, value in outputs.items():
        value = ops.cast(value, "float32")
        result[task] = ops.cast(ops.argmax(value, axis=-1), "uint8") if task == "segmentation" else value
    return keras.Model(inputs, result, name=f"{model.name}_on_device"), on_host


@dataclass
class KerasNetwork:
    """One bundle network as the pipeline uses it (a :class:`glio_node.ports.ModelRunner`):
    geometry, heads, and ``predict``.

    ``predict`` runs one device function (:func:`_on_device`): uint8 tiles go in, normalisation,
    the network and the segmentation argmax run on the device, and segmentation heads return
    class indices per pixel (uint8), classifier heads probabilities (float32).  Batches are padded
    to ``batch_size`` so the backend traces one input shape only.  ``precision`` is the compute
    dtype of the network's body (softmax and argmax stay float32).
    """

    loaded: LoadedNetwork
    batch_size: int
    precision: str = "float32"
    features: str | None = None  # [ood] features: also return this layer's output per tile (FEATURES_KEY)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BadInput(f"batch size {self.batch_size} must be at least 1")
        check_precision(self.precision)
        spec = self.loaded.spec
        if spec.runtime != "keras":
            raise ValueError(f"network {spec.name!r} runs on {spec.runtime}: use runtime/runners.bundle_networks")
        self.name, self.tile_size, self.um_per_px = spec.name, spec.tile_size, spec.um_per_px
        self.overlap, self.heads = spec.overlap, spec.heads
        model = self.loaded.model if self.features is None else with_features(self.loaded.model, self.features)
        if spec.kind != "tiles":  # an encoder's one embedding output: runtime/bag_runner.KerasEncoder runs the model itself
            self._device_fn, self._normalize_on_host = None, True
            return
        self._device_fn, self._normalize_on_host = _on_device(model, spec.normalization, self.precision)

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """``tiles``: (n, T, T, 3) uint8 with n <= batch_size."""
        n = tiles.shape[0]
        if n > self.batch_size:
            raise ValueError(f"{n} tiles exceed the batch size {self.batch_size}")
        x = normalize(tiles, self.loaded.spec.normalization) if self._normalize_on_host else np.asarray(tiles, np.uint8)
        if n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        outputs = self._device_fn.predict_on_batch(x)
        return {
            task: np.asarray(value)[:n].reshape(n, -1) if task == FEATURES_KEY else np.asarray(value)[:n]
            for task, value in outputs.items()
        }


def activation_bytes_per_tile(model, precision: str = "float32") -> int:
    """Bytes of every layer's output for one tile at ``precision``: what a batch costs on the
    device beyond the weights (inference keeps no gradients; this over-counts the buffers the
    backend frees as it goes, which is the safe side)."""
    item = 4 if precision == "float32" else 2
    total = 0
    for layer in model.layers:
        outs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        for out in outs:
            dims = [d for d in tuple(out.shape)[1:] if d is not None]
            total += int(np.prod(dims)) if dims else 1
    return total * item


def free_device_memory(used_device: str) -> int | None:
    """Free memory of the first GPU in bytes, or None on the CPU or when the backend cannot say."""
    if not used_device.startswith("gpu"):
        return None
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            stats = next(d for d in jax.devices() if d.platform == "gpu").memory_stats() or {}
            if "bytes_limit" in stats:
                return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        elif backend == "torch":
            import torch

            return int(torch.cuda.mem_get_info()[0])
        elif backend == "tensorflow":
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout
            return int(out.split()[0]) * 1024 * 1024
    except (OSError, ValueError, StopIteration, RuntimeError, subprocess.SubprocessError):
        return None
    return None


def choose_batch_size(bundle: LoadedBundle, used_device: str, precision: str = "float32") -> int:
    """Tiles per model call when the operator gave none: 8 on the CPU; on a GPU the largest power
    of two whose activations (the bundle's costliest network) fit half the free device memory,
    between 8 and 256; 8 when the backend cannot tell the free memory."""
    free = free_device_memory(used_device)
    if free is None:
        return CPU_BATCH_SIZE
    per_tile = max(activation_bytes_per_tile(n.model, precision) for n in bundle.networks if n.spec.runtime == "keras")
    fits = int(free * _GPU_MEMORY_SHARE // max(per_tile, 1))
    batch = CPU_BATCH_SIZE
    while batch * 2 <= min(fits, _MAX_GPU_BATCH):
        batch *= 2
    return batch


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


def bundle_networks(bundle: LoadedBundle, batch_size: int, precision: str = "float32") -> list[KerasNetwork]:
    """The bundle's networks, ready for ``pipeline.analyze``; Keras networks only (a bundle that
    may hold ONNX networks goes through ``runtime/runners.bundle_networks``)."""
    return [KerasNetwork(n, batch_size, precision) for n in bundle.networks]
