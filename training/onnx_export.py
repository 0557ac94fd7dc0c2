"""Export a bundle's Keras networks to ONNX networks of a new bundle (``python -m training export-onnx``).

Route: Keras 3's own ``model.export(path, format="onnx")``.  On the TensorFlow backend it traces
the model's ``call`` into a ``tf.function`` and converts that with ``tf2onnx`` (1.17), after
patching tf2onnx for NumPy 2 itself (keras/src/export/tf2onnx_lib.py): so ``tf2onnx`` must be
installed, but none of its open TF >= 2.16 breakages (they are in its Keras-model and SavedModel
front ends, which this route does not use) are met.  The input is named ``tiles`` with a dynamic
batch; the outputs keep the Keras output dict's keys, the head tasks.  docs/model-bundle.md says
why this route and how parity with the Keras bundle is tested.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
import warnings
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from glio_node.bundle import (
    FORMAT,
    Manifest,
    NetworkSpec,
    TensorSpec,
    load_bundle,
    write_bundle,
)

INPUT_NAME = "tiles"


def onnx_spec(spec: NetworkSpec) -> NetworkSpec:
    """The same network as an ONNX one: file ``<name>.onnx``, input ``tiles``, outputs named by task."""
    t = spec.tile_size
    heads = tuple(
        replace(
            h,
            output=TensorSpec(
                h.task,
                ("batch", t, t, len(h.classes)) if h.task == "segmentation" else ("batch", len(h.classes)),
                "float32",
            ),
        )
        for h in spec.heads
    )
    return replace(
        spec,
        runtime="onnx",
        file=f"{spec.name}.onnx",
        sha256=None,
        input=TensorSpec(INPUT_NAME, ("batch", t, t, 3), "float32"),
        layout="nhwc",
        heads=heads,
    )


def export_model(model, spec: NetworkSpec, path: Path) -> None:
    """One Keras model -> one ONNX file with ``onnx_spec(spec)``'s signature."""
    import keras  # noqa: PLC0415

    signature = [keras.InputSpec(shape=(None, spec.tile_size, spec.tile_size, 3), dtype="float32", name=INPUT_NAME)]
    tf2onnx_log = logging.getLogger("tf2onnx")
    level = tf2onnx_log.level
    tf2onnx_log.setLevel(logging.ERROR)  # it logs every rewrite at INFO
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Keras' NumPy-2 patch of tf2onnx touches np.object
            model.export(str(path), format="onnx", input_signature=signature, verbose=False)
    finally:
        tf2onnx_log.setLevel(level)


def _opset(path: Path) -> int:
    import onnx  # noqa: PLC0415

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_bundle(bundle_dir: Path, out_dir: Path, name: str | None = None) -> Manifest:
    """Write a new bundle in ``out_dir`` holding ``bundle_dir``'s networks as ONNX networks.

    Geometry, heads, classes, validation figures and intended use are the source bundle's; the
    name is ``name`` (default ``<source name>-onnx``), the UID new, the provenance the source's
    followed by how it was exported.  Returns the written manifest.  Raises BundleError.
    """
    import keras  # noqa: PLC0415
    import tf2onnx  # noqa: PLC0415 - the converter Keras' export uses; fail here, clearly, if absent

    source = load_bundle(bundle_dir, "cpu")
    m = source.manifest
    with tempfile.TemporaryDirectory(prefix="glio-export-") as tmp:
        files: dict[str, Path] = {}
        networks = []
        for loaded in source.networks:
            spec = onnx_spec(loaded.spec)
            path = Path(tmp) / spec.file
            export_model(loaded.model, loaded.spec, path)
            files[spec.name] = path
            networks.append(spec)
        opsets = sorted({_opset(p) for p in files.values()})
        how = (
            f" Exported to ONNX by `python -m training export-onnx` from bundle {m.name} {m.version} "
            f"(manifest SHA-256 {source.manifest_sha256}) with Keras {keras.__version__} "
            f"model.export(format='onnx') through tf2onnx {tf2onnx.__version__}, opset {', '.join(map(str, opsets))}."
        )
        if m.ood is not None:  # the worker takes OOD features from keras networks only, so far
            how += " The source's out-of-distribution gate was not carried over (ONNX networks cannot feed it yet)."
        manifest = replace(
            m,
            format=FORMAT,
            name=name or f"{m.name}-onnx",
            uid=f"2.25.{uuid.uuid4().int}",
            provenance=m.provenance + how,
            created=datetime.now(UTC).replace(microsecond=0),
            networks=tuple(networks),
            ood=None,
        )
        return write_bundle(out_dir, manifest, files)



def export_keras_file(model_path: Path, out_path: Path) -> tuple[Path, list, list]:
    """One ``.keras`` model with one tile input (e.g. ``python -m training encoder``'s encoder) ->
    one ``.onnx`` graph: input ``tiles`` float32 (batch, T, T, 3), the model's outputs as Keras'
    export names them (``output_0`` for a single tensor).  Returns the path and the graph's
    (name, shape, dtype) inputs and outputs as ONNX Runtime reads them back."""
    import keras  # noqa: PLC0415

    from glio_node.runtime.onnx_runner import graph_signature, open_session  # noqa: PLC0415

    model = keras.saving.load_model(model_path, safe_mode=True, compile=False)
    shape = tuple(model.inputs[0].shape[1:])
    if len(model.inputs) != 1 or len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
        raise ValueError(f"{model_path}: input {[tuple(i.shape) for i in model.inputs]} is not one (batch, T, T, 3) tile input")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tile = int(shape[0])
    tf2onnx_log = logging.getLogger("tf2onnx")
    level = tf2onnx_log.level
    tf2onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            signature = [keras.InputSpec(shape=(None, tile, tile, 3), dtype="float32", name=INPUT_NAME)]
            model.export(str(out_path), format="onnx", input_signature=signature, verbose=False)
    finally:
        tf2onnx_log.setLevel(level)
    inputs, outputs = graph_signature(open_session(out_path, "cpu"))
    return out_path, inputs, outputs
