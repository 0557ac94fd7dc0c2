"""Run a bundle's ONNX networks with ONNX Runtime, on the device the operator chose.

Nothing here imports Keras or TensorFlow: a bundle of ONNX networks runs on the ``onnxruntime``
wheel alone.  Device choice, as ``--device`` says everywhere: ``auto`` uses the CUDA execution
provider when ONNX Runtime has it (the ``onnxruntime-gpu`` wheel on a machine with a GPU), ``cpu``
uses the CPU provider only, ``gpu`` refuses to start without CUDA.  ``OnnxNetwork`` has the
interface of ``keras_runner.KerasNetwork``, so ``pipeline.analyze`` runs either unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glio_node.normalization import normalize
from glio_node.ood import FEATURES_KEY
from glio_node.runtime.loading import Found, LoadedNetwork
from glio_node.errors import BadInput, BundleError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# ONNX Runtime's type strings -> numpy dtype names, as the manifest writes dtypes.
_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def providers(device: str) -> list[str]:
    """The execution providers for ``device`` (auto, cpu, gpu), best first.

    Raises ``BadInput`` for ``gpu`` when ONNX Runtime has no CUDA provider.
    """
    import onnxruntime as ort  # noqa: PLC0415 - heavy-ish, only when a network is really loaded

    if device not in ("auto", "cpu", "gpu"):
        raise BadInput(f"device {device!r} is not one of auto, cpu, gpu")
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "gpu":
        raise BadInput(
            f"--device gpu was asked for but ONNX Runtime has no CUDA provider (it has {', '.join(available)}); "
            "install onnxruntime-gpu on a machine with a GPU, or use --device auto or cpu"
        )
    return [CPU]


def device_name(device: str) -> str:
    """What ``device`` resolves to for ONNX networks: "cuda" or "cpu" (BadInput as ``providers``)."""
    return "cuda" if providers(device)[0] == CUDA else "cpu"


def open_session(path: str | os.PathLike[str], device: str = "auto"):
    """An ``onnxruntime.InferenceSession`` for a verified ``.onnx`` file on ``device``.

    Raises BundleError when ONNX Runtime cannot parse the graph, BadInput when ``gpu`` was asked
    for and the session could not get the CUDA provider.
    """
    import onnxruntime as ort  # noqa: PLC0415

    wanted = providers(device)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: provider fallbacks are reported by us, not on stderr
    # Idle intra-op threads sleep instead of spinning: the frame decoders run beside the model and
    # a spinning pool takes their cores (measured on 2 busy cores: 5.4 vs 4.1 tiles/s for regions).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    path = Path(path)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types, no common base
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(
            f"ONNX file {path.name} in {path.parent} passed its SHA-256 check but ONNX Runtime cannot load it "
            f"({first}); re-export or re-import the network"
        ) from exc
    if device == "gpu" and CUDA not in session.get_providers():
        raise BadInput(
            f"--device gpu was asked for but ONNX Runtime could not start CUDA for {path.name}; "
            "check the CUDA libraries onnxruntime-gpu needs, or use --device auto or cpu"
        )
    return session


def graph_signature(session) -> tuple[list[Found], list[Found]]:
    """The session's graph inputs and outputs as (name, shape, dtype); dynamic dimensions are
    their symbol (a string) or None."""

    def found(arg) -> Found:
        return arg.name, tuple(arg.shape), _DTYPES.get(arg.type, arg.type)

    return [found(i) for i in session.get_inputs()], [found(o) for o in session.get_outputs()]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@dataclass
class OnnxNetwork:
    """One ONNX bundle network as the pipeline uses it: geometry, heads, and ``predict``.

    As ``KerasNetwork``: segmentation heads return class indices per pixel (uint8, argmax over
    the classes), classifier heads float32 probabilities (the softmax of a head declared
    ``activation = "logits"``).  No padding to ``batch_size``: ONNX
    Runtime runs any batch of a graph with a dynamic batch dimension without retracing.
    """

    loaded: LoadedNetwork
    batch_size: int
    features: bool = False  # the [ood] gate reads this network: also return its declared features output (FEATURES_KEY)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BadInput(f"batch size {self.batch_size} must be at least 1")
        spec = self.loaded.spec
        if spec.runtime != "onnx":
            raise ValueError(f"network {spec.name!r} runs on {spec.runtime}, not onnx")
        self.name, self.tile_size, self.um_per_px = spec.name, spec.tile_size, spec.um_per_px
        self.overlap, self.heads = spec.overlap, spec.heads
        self._input = spec.input.name
        self._dtype = np.dtype(spec.input.dtype)
        self._outputs = [h.output.name for h in spec.heads]
        if self.features:
            if spec.features is None:
                raise BundleError(
                    f"network {spec.name!r}: the [ood] gate reads its features, but it declares no features output; "
                    "add features = { name, shape, dtype } to the network or re-export it"
                )
            self._outputs.append(spec.features.name)
        self._channels_first = spec.layout == "nchw"

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """``tiles``: (n, T, T, 3) uint8 with n <= batch_size."""
        n = tiles.shape[0]
        if n > self.batch_size:
            raise ValueError(f"{n} tiles exceed the batch size {self.batch_size}")
        x = normalize(tiles, self.loaded.spec.normalization)
        if self._channels_first:
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        values = self.loaded.model.run(self._outputs, {self._input: x.astype(self._dtype, copy=False)})
        result: dict[str, np.ndarray] = {}
        if self.features:
            result[FEATURES_KEY] = np.asarray(values[-1], np.float32).reshape(n, -1)
        for head, value in zip(self.heads, values):
            value = np.asarray(value)
            if head.task == "segmentation":  # the argmax of logits is the argmax of their softmax
                result[head.task] = value.argmax(axis=1 if self._channels_first else -1).astype(np.uint8)
            elif head.activation == "logits":
                result[head.task] = _softmax(value).astype(np.float32)
            else:
                result[head.task] = value.astype(np.float32)
        return result
