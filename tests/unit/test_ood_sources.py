"""Where an OOD gate's per-tile features come from, and what a manifest may name as that source.

- an ONNX tile network declares an extra graph output whose role is the features
  (``features = { name, shape = ["batch", D], dtype }``); the runner returns it when the gate
  reads the network, and a graph that lacks it is refused at load in one line;
- an encoder's gate reads its embeddings (``[ood] features = "embeddings"``);
- an aggregator sees bags, not tiles, and cannot feed a gate.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_graphs as og
import two_stage

from glio_node import coding
from glio_node.bundle import Manifest, OodSpec, TensorSpec, load_bundle, load_manifest, write_bundle
from glio_node.errors import BundleError
from glio_node.ood import FEATURES_KEY, fit_reference, save_reference
from glio_node.runtime.runners import bundle_networks

FEATURES = TensorSpec("colour", ("batch", 3), "float32")
GATE = OodSpec(network="cls", features="colour", file="ood-reference.npz", sha256=None, slide_threshold=2.0,
               slide_threshold_low=0.5)


def _with_colour_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """The classifier graph with its per-tile mean colour (the node ``mean``) as one more output."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.node.append(helper.make_node("Identity", ["mean"], ["colour"]))
    model.graph.output.append(helper.make_tensor_value_info("colour", TensorProto.FLOAT, ["batch", 3]))
    onnx.checker.check_model(model)
    return model


def _gated_bundle(tmp_path, graph: onnx.ModelProto):
    onnx.save(og.graph("segmentation", len(coding.REGION_CLASSES), seed=1), tmp_path / "seg.onnx")
    onnx.save(graph, tmp_path / "cls.onnx")
    save_reference(fit_reference(np.random.default_rng(0).uniform(0, 1, (50, 3))), tmp_path / "ref.npz")
    m = replace(og.manifest(og.seg_spec(), replace(og.cls_spec(), features=FEATURES)), ood=GATE)
    return write_bundle(tmp_path / "b", m, {"seg": tmp_path / "seg.onnx", "cls": tmp_path / "cls.onnx"},
                        ood_reference=tmp_path / "ref.npz")


def test_an_onnx_classifier_gives_its_declared_features_output_to_the_gate(tmp_path):
    _gated_bundle(tmp_path, _with_colour_output(og.graph("subtype", len(coding.SUBTYPE_CLASSES), seed=2)))
    bundle = load_bundle(tmp_path / "b", "cpu")
    cls = next(n for n in bundle_networks(bundle, 4) if n.name == "cls")
    tiles = np.random.default_rng(1).integers(0, 256, (3, og.TILE, og.TILE, 3), dtype=np.uint8)

    out = cls.predict(tiles)
    assert set(out) == {"subtype", FEATURES_KEY}
    np.testing.assert_allclose(out[FEATURES_KEY], tiles.mean(axis=(1, 2)) / 255.0, atol=1e-5)
    np.testing.assert_allclose(out["subtype"], og.reference("subtype", tiles, len(coding.SUBTYPE_CLASSES), seed=2), atol=1e-5)
    assert bundle.ood is not None and bundle.ood.network == "cls"


def test_a_graph_without_the_declared_features_output_is_refused_at_load_in_one_line(tmp_path):
    _gated_bundle(tmp_path, _with_colour_output(og.graph("subtype", len(coding.SUBTYPE_CLASSES), seed=2)))
    og.swap_graph(tmp_path / "b", "cls", og.graph("subtype", len(coding.SUBTYPE_CLASSES), seed=2))
    with pytest.raises(BundleError, match=r"network 'cls' .* expected inputs .* outputs \[subtype .*, colour float32\[batch, 3\]\]") as info:
        load_bundle(tmp_path / "b", "cpu")
    assert "\n" not in str(info.value)


def _two_stage(ood: OodSpec) -> Manifest:
    return replace(two_stage.manifest(two_stage.seg_spec(), two_stage.encoder_spec(), two_stage.aggregator_spec("egfr")),
                   ood=ood)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _two_stage(replace(GATE, network="encoder", features="embeddings")), None),
        (lambda: _two_stage(replace(GATE, network="encoder", features="features")),
         r"\[ood\] network 'encoder' is an encoder: its features are its embeddings; write features = \"embeddings\""),
        (lambda: _two_stage(replace(GATE, network="egfr-abmil", features="embeddings")),
         r"\[ood\] network 'egfr-abmil' is an aggregator, which sees the slide's bag, not tiles; name its encoder 'encoder'"),
        (lambda: replace(og.manifest(og.seg_spec(), og.cls_spec()), ood=GATE),
         r"\[ood\] network 'cls' is an onnx network: \[ood\] features 'colour' must be its declared features output .* declared: None"),
        (lambda: replace(og.manifest(og.seg_spec(), replace(og.cls_spec(), features=FEATURES)), ood=replace(GATE, features="mean")),
         r"\[ood\] features 'mean' must be its declared features output .* declared: 'colour'"),
        (lambda: replace(two_stage.seg_spec(), features=FEATURES),
         r"input, layout and head outputs are declared for onnx networks only \(and features\)"),
        (lambda: replace(og.cls_spec(), features=TensorSpec("colour", ("batch", "d"), "float32")),
         r"features colour float32\[batch, d\] must be a graph output of shape \[\"batch\", D\] with D an integer"),
        (lambda: replace(two_stage.encoder_spec(), features=FEATURES),
         r"features \(an OOD feature output\) is for onnx tiles networks"),
    ],
    ids=["encoder-ok", "encoder-layer", "aggregator", "onnx-undeclared", "onnx-other-name", "keras-features",
         "dynamic-d", "encoder-features"],
)
def test_a_manifest_names_only_a_per_tile_feature_source(make, message):
    if message is None:
        assert make().ood.features == "embeddings"
        return
    with pytest.raises(BundleError, match=message):
        make()


def test_the_features_output_survives_the_manifests_toml(tmp_path):
    _gated_bundle(tmp_path, _with_colour_output(og.graph("subtype", len(coding.SUBTYPE_CLASSES), seed=2)))
    cls = next(n for n in load_manifest(tmp_path / "b").networks if n.name == "cls")
    assert cls.features == FEATURES
    assert "colour" in [t.name for t in cls.signature()[1]]
