"""Export a bundle's Keras networks to ONNX networks of a new bundle (``python -m training export-onnx``).

Every kind: tile networks, two-stage encoders (output ``embeddings``) and ABMIL aggregators
(input ``embeddings`` with a dynamic batch and bag, outputs ``probabilities`` and ``attention``,
one graph per fold).  A source with an out-of-distribution gate keeps it: the gated Keras
classifier is exported with its features layer as one more graph output (``ood_features``,
declared as the network's ``features``), an encoder's gate reads the embeddings as before, and
the reference file and thresholds are the source's.

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
import math
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
    WeightsFile,
    load_bundle,
    write_bundle,
)

from glio_node.manifest import ENCODER_FEATURES
from glio_node.ood import FEATURES_KEY

INPUT_NAME = "tiles"
ENCODER_OUTPUT = ENCODER_FEATURES  # an exported encoder's graph output: "embeddings"


def onnx_spec(spec: NetworkSpec, features_dim: int | None = None) -> NetworkSpec:
    """The same network as an ONNX one: file ``<name>.onnx``; tiles networks: input ``tiles``,
    outputs named by task (and ``ood_features`` (batch, ``features_dim``) when the gate reads it);
    encoders: input ``tiles``, output ``embeddings``; aggregators: input ``embeddings`` (batch,
    bag, D), outputs ``probabilities`` and ``attention`` (runtime/mil.py's names)."""
    from glio_node.runtime.mil import ATTENTION, INPUT_NAME as BAG_NAME, PROBABILITIES  # noqa: PLC0415

    t = spec.tile_size
    if spec.kind == "aggregator":
        head = spec.heads[0]
        folds = tuple(WeightsFile(f"{spec.name}-fold{k}.onnx", None) for k in range(len(spec.folds)))
        return replace(
            spec, runtime="onnx", file=folds[0].file if folds else f"{spec.name}.onnx", sha256=None, folds=folds,
            input=TensorSpec(BAG_NAME, ("batch", "bag", spec.embed_dim), "float32"),
            heads=(replace(head, output=TensorSpec(PROBABILITIES, ("batch", len(head.classes)), "float32")),),
            attention=TensorSpec(ATTENTION, ("batch", "bag"), "float32"),
        )
    tiles = TensorSpec(INPUT_NAME, ("batch", t, t, 3), "float32")
    if spec.kind == "encoder":
        return replace(spec, runtime="onnx", file=f"{spec.name}.onnx", sha256=None, input=tiles, layout="nhwc",
                       output=TensorSpec(ENCODER_OUTPUT, ("batch", spec.embed_dim), "float32"))
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
        input=tiles,
        layout="nhwc",
        heads=heads,
        features=TensorSpec(FEATURES_KEY, ("batch", features_dim), "float32") if features_dim else None,
    )


def export_model(model, spec: NetworkSpec, path: Path) -> None:
    """One Keras model -> one ONNX file with ``onnx_spec(spec)``'s signature (a tiles network or an
    encoder: (batch, T, T, 3) tiles; an aggregator: a (batch, bag, D) bag, both dynamic)."""
    import keras  # noqa: PLC0415

    if spec.kind == "aggregator":
        from glio_node.runtime.mil import INPUT_NAME as BAG_NAME  # noqa: PLC0415

        signature = [keras.InputSpec(shape=(None, None, spec.embed_dim), dtype="float32", name=BAG_NAME)]
    else:
        signature = [keras.InputSpec(shape=(None, spec.tile_size, spec.tile_size, 3), dtype="float32", name=INPUT_NAME)]
    if spec.kind == "encoder" and not isinstance(model.output, dict):
        model = keras.Model(model.inputs, {ENCODER_OUTPUT: model.output}, name=model.name)  # the output's name
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
        files: dict[str, Path | list[Path]] = {}
        networks = []
        gated = m.ood.network if m.ood is not None else None
        for loaded in source.networks:
            if loaded.spec.runtime == "onnx":  # already ONNX (e.g. an imported encoder): copied byte for byte
                files[loaded.spec.name] = [source.path / w.file for w in loaded.spec.folds] or source.path / loaded.spec.file
                networks.append(loaded.spec)
                continue
            model, features_dim = loaded.model, None
            if loaded.spec.name == gated and loaded.spec.kind == "tiles":
                # The gate's features layer becomes one more graph output: same reference, same thresholds.
                from glio_node.runtime.keras_runner import with_features  # noqa: PLC0415

                model = with_features(loaded.model, m.ood.features)
                features_dim = int(math.prod(model.output[FEATURES_KEY].shape[1:]))
            spec = onnx_spec(loaded.spec, features_dim)
            if spec.folds:
                paths = [Path(tmp) / w.file for w in spec.folds]
                for fold, path in zip(model, paths):
                    export_model(fold, loaded.spec, path)
                files[spec.name] = paths
            elif spec.kind == "aggregator":
                path = Path(tmp) / spec.file
                export_model(model[0], loaded.spec, path)
                files[spec.name] = path
            else:
                path = Path(tmp) / spec.file
                export_model(model, loaded.spec, path)
                files[spec.name] = path
            networks.append(spec)
        opsets = sorted({_opset(p) for f in files.values() for p in (f if isinstance(f, list) else [f])})
        how = (
            f" Exported to ONNX by `python -m training export-onnx` from bundle {m.name} {m.version} "
            f"(manifest SHA-256 {source.manifest_sha256}) with Keras {keras.__version__} "
            f"model.export(format='onnx') through tf2onnx {tf2onnx.__version__}, opset {', '.join(map(str, opsets))}."
        )
        ood, reference = None, None
        if m.ood is not None:
            ood = replace(m.ood, sha256=None, features=FEATURES_KEY if m.ood.network in {
                n.name for n in networks if n.features is not None} else m.ood.features)
            reference = source.path / m.ood.file
            how += (f" The out-of-distribution gate on network {m.ood.network!r} is the source's (same reference file, "
                    f"same thresholds), its features now the graph output {ood.features!r}.")
        licences = {n.name: source.path / n.origin.licence_file for n in m.networks if n.origin is not None}
        manifest = replace(
            m,
            format=FORMAT,
            name=name or f"{m.name}-onnx",
            uid=f"2.25.{uuid.uuid4().int}",
            provenance=m.provenance + how,
            created=datetime.now(UTC).replace(microsecond=0),
            networks=tuple(networks),
            ood=ood,
        )
        return write_bundle(out_dir, manifest, files, licences, ood_reference=reference)



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
