"""Small ONNX tile networks built with onnx.helper (no TensorFlow), and format-2 bundles of them.

A segmentation network: per pixel, softmax(x @ W + b) over the classes.  A classifier network:
softmax(mean over the tile of x, @ W + b).  ``reference`` computes both with NumPy, so a test
can compare ONNX Runtime's output with an independent result.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from glio_node import coding
from glio_node.bundle import HeadSpec, Manifest, NetworkSpec, TensorSpec, write_bundle

TILE = 16
OPSET = 17


def weights(n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 4, (3, n_classes)).astype(np.float32), rng.normal(0, 1, n_classes).astype(np.float32)


def graph(
    kind: str,
    n_classes: int,
    seed: int = 0,
    layout: str = "nhwc",
    input_name: str = "tiles",
    output_name: str | None = None,
    batch: int | str = "batch",
    dtype: int = TensorProto.FLOAT,
    softmax: bool = True,
) -> onnx.ModelProto:
    """A tile network graph: ``kind`` is "segmentation" or a classifier task (its output name by default)."""
    w, b = weights(n_classes, seed)
    output_name = output_name or kind
    nodes, inits = [], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    x = input_name
    if layout == "nchw":
        nodes.append(helper.make_node("Transpose", [x], ["x_nhwc"], perm=[0, 2, 3, 1]))
        x = "x_nhwc"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], ["x_f32"], to=TensorProto.FLOAT))
        x = "x_f32"
    if kind == "segmentation":
        nodes += [
            helper.make_node("MatMul", [x, "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs" if layout == "nchw" else output_name], axis=-1),
        ]
        if layout == "nchw":
            nodes.append(helper.make_node("Transpose", ["probs"], [output_name], perm=[0, 3, 1, 2]))
            out_shape = [batch, n_classes, TILE, TILE]
        else:
            out_shape = [batch, TILE, TILE, n_classes]
    else:
        nodes += [
            helper.make_node("ReduceMean", [x], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [output_name], axis=-1)
            if softmax
            else helper.make_node("Identity", ["logits"], [output_name]),
        ]
        out_shape = [batch, n_classes]
    in_shape = [batch, 3, TILE, TILE] if layout == "nchw" else [batch, TILE, TILE, 3]
    g = helper.make_graph(
        nodes,
        f"{kind}-net",
        [helper.make_tensor_value_info(input_name, dtype, in_shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def reference(kind: str, tiles: np.ndarray, n_classes: int, seed: int = 0) -> np.ndarray:
    """NumPy: probabilities per pixel (segmentation) or per tile (classifier) for uint8 tiles, x / 255."""
    w, b = weights(n_classes, seed)
    x = tiles.astype(np.float64) / 255.0
    if kind != "segmentation":
        x = x.mean(axis=(1, 2))
    z = x @ w + b
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def seg_spec(layout: str = "nhwc") -> NetworkSpec:
    n = len(coding.REGION_CLASSES)
    image = ["batch", TILE, TILE, 3] if layout == "nhwc" else ["batch", 3, TILE, TILE]
    out = ["batch", TILE, TILE, n] if layout == "nhwc" else ["batch", n, TILE, TILE]
    return NetworkSpec(
        "seg", "seg.onnx", None, TILE, 2.0, 4, "scale_0_1",
        (HeadSpec("segmentation", coding.REGION_CLASSES, output=TensorSpec("segmentation", out, "float32")),),
        runtime="onnx", input=TensorSpec("tiles", image, "float32"), layout=layout,
    )


def cls_spec() -> NetworkSpec:
    n = len(coding.SUBTYPE_CLASSES)
    return NetworkSpec(
        "cls", "cls.onnx", None, TILE, 0.5, 0, "scale_0_1",
        (HeadSpec("subtype", coding.SUBTYPE_CLASSES, indeterminate_below=0.3,
                  output=TensorSpec("subtype", ["batch", n], "float32")),),
        runtime="onnx", input=TensorSpec("tiles", ["batch", TILE, TILE, 3], "float32"),
    )


def manifest(*networks: NetworkSpec) -> Manifest:
    return Manifest(
        name="tiny-onnx", version="1.0.0", uid="2.25.4321",
        intended_use="DEMO test bundle of hand-built ONNX graphs. Research use only.", is_demo=True,
        provenance="made by tests/onnx_graphs.py", created=datetime(2026, 12, 1, tzinfo=timezone.utc),
        networks=networks or (seg_spec(), cls_spec()),
    )


def write_onnx_bundle(out: Path, layout: str = "nhwc") -> Manifest:
    """A format-2 bundle of a segmentation and a classifier ONNX network in ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}-graphs"
    work.mkdir(exist_ok=True)
    onnx.save(graph("segmentation", len(coding.REGION_CLASSES), seed=1, layout=layout), work / "seg.onnx")
    onnx.save(graph("subtype", len(coding.SUBTYPE_CLASSES), seed=2), work / "cls.onnx")
    m = manifest(seg_spec(layout), cls_spec())
    return write_bundle(out, m, {"seg": work / "seg.onnx", "cls": work / "cls.onnx"})


def swap_graph(bundle_dir: Path, network: str, model: onnx.ModelProto) -> None:
    """Replace a network's .onnx file and re-hash it in the manifest, as someone who re-exported
    a graph and "fixed" the hash by hand would: the manifest's declared signature stays."""
    from glio_node.bundle import load_manifest, sha256_file

    spec = next(n for n in load_manifest(bundle_dir).networks if n.name == network)
    path = bundle_dir / spec.file
    onnx.save(model, path)
    text = (bundle_dir / "manifest.toml").read_text()
    (bundle_dir / "manifest.toml").write_text(text.replace(spec.sha256, sha256_file(path)))



def attention_graph(embed_dim: int, n_classes: int, seed: int = 0, bag: int | str = "bag") -> onnx.ModelProto:
    """An attention-MIL aggregator: ``embeddings`` (1, bag, D) -> ``attention`` (1, bag) =
    softmax over the bag of x @ v, and ``probabilities`` (1, C) = softmax((attention @ x) @ W)."""
    v, w = attention_weights(embed_dim, n_classes, seed)
    nodes = [
        helper.make_node("MatMul", ["embeddings", "v"], ["scores3"]),  # (1, bag, 1)
        helper.make_node("Squeeze", ["scores3", "axis2"], ["scores"]),  # (1, bag)
        helper.make_node("Softmax", ["scores"], ["attention"], axis=-1),
        helper.make_node("Unsqueeze", ["attention", "axis1"], ["attention3"]),  # (1, 1, bag)
        helper.make_node("MatMul", ["attention3", "embeddings"], ["pooled3"]),  # (1, 1, D)
        helper.make_node("Squeeze", ["pooled3", "axis1"], ["pooled"]),  # (1, D)
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    init = [numpy_helper.from_array(v, "v"), numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"), numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    g = helper.make_graph(
        nodes, "abmil-ish",
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [1, bag, embed_dim])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, n_classes]),
         helper.make_tensor_value_info("attention", TensorProto.FLOAT, [1, bag])],
        init,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def bag_attention_graph(embed_dim: int, n_classes: int, seed: int = 0, bag: int | str = "bag") -> onnx.ModelProto:
    """``attention_graph`` without the slide dimension (a TRIDENT-style head): ``embeddings``
    (bag, D) -> ``attention`` (bag,) and ``probabilities`` (C,); the same weights, so
    ``attention_reference`` holds for it too."""
    v, w = attention_weights(embed_dim, n_classes, seed)
    nodes = [
        helper.make_node("MatMul", ["embeddings", "v"], ["scores2"]),  # (bag, 1)
        helper.make_node("Squeeze", ["scores2", "axis1"], ["scores"]),  # (bag,)
        helper.make_node("Softmax", ["scores"], ["attention"], axis=0),
        helper.make_node("MatMul", ["attention", "embeddings"], ["pooled"]),  # (D,)
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),  # (C,)
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=0),
    ]
    init = [numpy_helper.from_array(v, "v"), numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    g = helper.make_graph(
        nodes, "abmil-bag-only",
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [bag, embed_dim])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [n_classes]),
         helper.make_tensor_value_info("attention", TensorProto.FLOAT, [bag])],
        init,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def attention_weights(embed_dim: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (embed_dim, 1)).astype(np.float32), rng.normal(0, 1, (embed_dim, n_classes)).astype(np.float32)


def attention_reference(x: np.ndarray, embed_dim: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """NumPy of ``attention_graph`` on a bag x (N, D): (probabilities (C,), attention (N,))."""
    v, w = attention_weights(embed_dim, n_classes, seed)
    s = (x.astype(np.float64) @ v)[:, 0]
    a = np.exp(s - s.max()); a /= a.sum()
    z = (a @ x) @ w
    p = np.exp(z - z.max()); p /= p.sum()
    return p, a
