"""The device and the runner for each network of a bundle, by its runtime (keras or onnx).

Keras is imported only when the bundle has a Keras network: a bundle of ONNX networks runs
without TensorFlow.
"""

from __future__ import annotations

from glio_node.manifest import Manifest
from glio_node.runtime.loading import LoadedBundle
from glio_node.errors import BadInput

CPU_BATCH_SIZE = 8


def prepare_device(device: str, manifest: Manifest, precision: str = "float32") -> str:
    """Apply ``device`` (auto, cpu, gpu) for the runtimes ``manifest`` uses; return what is used.

    Runs before any network is loaded (Keras must hear of the device before it builds tensors).
    The result is "cpu", "gpu:N" (Keras' GPUs) or "cuda" (ONNX Runtime's), joined with "+" when
    a bundle mixes runtimes that resolved differently.  Raises BadInput for ``gpu`` without one.
    """
    runtimes = {n.runtime for n in manifest.networks}
    if precision != "float32" and "onnx" in runtimes:
        raise BadInput(
            f"--precision {precision} applies to Keras networks; this bundle's ONNX networks run in their "
            "graphs' own dtypes: use --precision float32 (or export the graph in the precision you want)"
        )
    used: list[str] = []
    if "keras" in runtimes:
        from glio_node.runtime.keras_runner import select_device  # noqa: PLC0415

        used.append(select_device(device))  # type: ignore[arg-type]
    if "onnx" in runtimes:
        from glio_node.runtime.onnx_runner import device_name  # noqa: PLC0415

        used.append(device_name(device))
    return "+".join(dict.fromkeys(used)) or "cpu"


def choose_batch_size(bundle: LoadedBundle, used_device: str, precision: str = "float32") -> int:
    """Tiles per model call when the operator gave none: from the device's free memory and the
    Keras networks' activations (``keras_runner.choose_batch_size``); 8 for ONNX networks only."""
    if any(n.spec.runtime == "keras" for n in bundle.networks):
        from glio_node.runtime.keras_runner import choose_batch_size as keras_batch_size  # noqa: PLC0415

        return keras_batch_size(bundle, used_device, precision)
    return CPU_BATCH_SIZE


def bundle_networks(bundle: LoadedBundle, batch_size: int, precision: str = "float32") -> list:
    """The bundle's networks, each with the runner of its runtime, ready for ``pipeline.analyze``."""
    networks = []
    ood = bundle.manifest.ood
    for loaded in bundle.networks:
        if loaded.spec.kind == "aggregator":  # not a tile network: see bundle_aggregators
            continue
        if loaded.spec.kind == "encoder":
            from glio_node.runtime.bag_runner import KerasEncoder, OnnxEncoder  # noqa: PLC0415

            networks.append((OnnxEncoder if loaded.spec.runtime == "onnx" else KerasEncoder)(loaded, batch_size))
            continue
        gated = ood is not None and ood.network == loaded.spec.name
        if loaded.spec.runtime == "onnx":
            from glio_node.runtime.onnx_runner import OnnxNetwork  # noqa: PLC0415

            networks.append(OnnxNetwork(loaded, batch_size, features=gated))
        else:
            from glio_node.runtime.keras_runner import KerasNetwork  # noqa: PLC0415

            features = ood.features if gated else None
            networks.append(KerasNetwork(loaded, batch_size, precision, features))
    return networks


def bundle_aggregators(bundle: LoadedBundle) -> list:
    """The bundle's aggregator heads (``kind = "aggregator"``), ready for ``pipeline.analyze``."""
    from glio_node.runtime.bag_runner import Aggregator  # noqa: PLC0415

    return [Aggregator(n) for n in bundle.networks if n.spec.kind == "aggregator"]
