"""Two-stage bundles built in the tests: a tiny Keras tile encoder (a few convolutions and global
pooling to D=32, random weights) and ABMIL heads from glio_node/runtime/mil.py, written with
glio_node.bundle.write_bundle, with or without a tiny segmentation network beside them (a
bundle needs none: an encoder and its heads alone analyse a slide).

Random weights are enough: the tests check plumbing (shapes, the bag, the attention map, the
outputs), not skill.  ``disagreeing_folds`` makes two fold models whose calls differ on any bag.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from glio_node import coding
from glio_node.bundle import HeadSpec, Manifest, NetworkSpec, TensorSpec, WeightsFile

EMBED_DIM = 32
ENCODER_TILE = 32
ENCODER_UM_PER_PX = 2.0


def build_encoder(tile: int = ENCODER_TILE, embed_dim: int = EMBED_DIM, seed: int = 0):
    """(None, tile, tile, 3) -> (None, embed_dim): three strided convolutions and global pooling."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    x_in = keras.Input((tile, tile, 3), name="tiles")
    x = x_in
    for i, filters in enumerate((8, 16, embed_dim)):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name=f"conv{i}")(x)
    x = layers.GlobalAveragePooling2D(name="embeddings")(x)
    return keras.Model(x_in, x, name="encoder")


def build_head(n_classes: int, seed: int, bias: np.ndarray | None = None, embed_dim: int = EMBED_DIM):
    """An ABMIL head with random weights; ``bias`` (C,) set on the classifier makes its call fixed."""
    import keras

    from glio_node.runtime.mil import build_abmil

    keras.utils.set_random_seed(seed)
    model = build_abmil(embed_dim, n_classes, hidden=16, attention_dim=8, dropout=0.0)
    if bias is not None:
        dense = model.get_layer("classifier")
        kernel, _ = dense.get_weights()
        dense.set_weights([kernel * 0.0, np.asarray(bias, np.float32)])
    return model


def disagreeing_folds(n_classes: int = 2):
    """Two fold models: one all but certain of class 0, the other of class 1, on any bag."""
    return [build_head(n_classes, 1, bias=_onehot(n_classes, 0) * 8.0), build_head(n_classes, 2, bias=_onehot(n_classes, 1) * 8.0)]


def agreeing_folds(n_classes: int = 2):
    """Two fold models that both call class 1 with about the same probability."""
    return [build_head(n_classes, 1, bias=_onehot(n_classes, 1) * 4.0), build_head(n_classes, 2, bias=_onehot(n_classes, 1) * 4.1)]


def _onehot(n: int, i: int) -> np.ndarray:
    v = np.zeros(n, np.float32)
    v[i] = 1.0
    return v


def seg_spec() -> NetworkSpec:
    return NetworkSpec("regions", "regions.keras", None, 32, 8.0, 8, "scale_0_1", (HeadSpec("segmentation", coding.REGION_CLASSES),))


def encoder_spec(runtime: str = "keras") -> NetworkSpec:
    onnx = runtime == "onnx"
    t = ENCODER_TILE
    return NetworkSpec(
        "encoder", "encoder.onnx" if onnx else "encoder.keras", None, t, ENCODER_UM_PER_PX, 0, "imagenet", (),
        runtime=runtime, kind="encoder", embed_dim=EMBED_DIM,
        input=TensorSpec("tiles", ("batch", t, t, 3), "float32") if onnx else None,
        output=TensorSpec("embeddings", ("batch", EMBED_DIM), "float32") if onnx else None,
    )


def aggregator_spec(task: str, folds: int = 1, max_fold_spread: float = 1.0, indeterminate_below: float = 0.0) -> NetworkSpec:
    classes = {"egfr": coding.EGFR_CLASSES, "mgmt": coding.MGMT_CLASSES, "subtype": coding.SUBTYPE_CLASSES}[task]
    files = tuple(WeightsFile(f"{task}-abmil-fold{k}.keras", None) for k in range(folds)) if folds > 1 else ()
    return NetworkSpec(
        f"{task}-abmil", files[0].file if files else f"{task}-abmil.keras", None, None, None, None, None,
        (HeadSpec(task, classes, indeterminate_below=indeterminate_below, max_fold_spread=max_fold_spread),),
        kind="aggregator", embed_dim=EMBED_DIM, encoder="encoder", folds=files,
    )


def onnx_aggregator_spec(task: str, batched: bool = True) -> NetworkSpec:
    """An aggregator head as an ONNX graph (tests/onnx_graphs.py ``attention_graph`` when
    ``batched``, ``bag_attention_graph`` otherwise): its declared signature, the bag dynamic."""
    spec = aggregator_spec(task)
    n = len(spec.heads[0].classes)
    lead = (1,) if batched else ()
    return replace(
        spec, runtime="onnx", file=f"{task}-abmil.onnx",
        input=TensorSpec("embeddings", (*lead, "bag", EMBED_DIM), "float32"),
        attention=TensorSpec("attention", (*lead, "bag"), "float32"),
        heads=(replace(spec.heads[0], output=TensorSpec("probabilities", (*lead, n), "float32")),),
    )


def manifest(*networks: NetworkSpec) -> Manifest:
    return Manifest(
        name="two-stage",
        version="0.0.1",
        uid="2.25.4242",
        intended_use="DEMO two-stage test bundle with random weights. Research use only.",
        is_demo=True,
        provenance="built by tests/two_stage.py: random weights, no training",
        created=datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc),
        networks=networks,
    )


def seg_model():
    from glio_node.runtime.networks import build_unet

    return build_unet(32, 10, depth=2, base_filters=2)


def write_two_stage_bundle(out: Path, encoder=None, fold_models=None, max_fold_spread: float = 1.0, regions: bool = True):
    """A bundle of the encoder and ABMIL heads for egfr (k folds when ``fold_models`` is given)
    and mgmt, and a segmentation net unless ``regions`` is False; returns the written manifest."""
    from glio_node.bundle import write_bundle

    egfr_folds = list(fold_models) if fold_models is not None else None
    networks = (
        *((seg_spec(),) if regions else ()),
        encoder_spec("onnx" if isinstance(encoder, (str, Path)) else "keras"),
        aggregator_spec("egfr", folds=len(egfr_folds) if egfr_folds else 1, max_fold_spread=max_fold_spread),
        aggregator_spec("mgmt"),
    )
    models = {
        **({"regions": seg_model()} if regions else {}),
        "encoder": encoder if encoder is not None else build_encoder(),
        "egfr-abmil": egfr_folds if egfr_folds else build_head(2, 11),
        "mgmt-abmil": build_head(2, 12),
    }
    return write_bundle(out, manifest(*networks), models)


def export_encoder_onnx(model, path: Path) -> str:
    """The Keras encoder as an ONNX graph by the project's export route (training/onnx_export.py:
    Keras' own ``model.export(format="onnx")``); returns the graph's output name."""
    import onnx

    from training.onnx_export import export_model

    export_model(model, encoder_spec(), path)
    return onnx.load(str(path)).graph.output[0].name
