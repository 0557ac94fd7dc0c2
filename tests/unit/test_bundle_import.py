"""``glio-node models import`` as a new bundle, and what it refuses (the offline run against a copy
of the demo bundle is in tests/integration/test_onnx_bundles.py)."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_graphs as og
import pytest

from glio_node.bundle import load_bundle, verify_bundle
from glio_node.bundle_import import import_onnx, licence_title
from glio_node.cli import main
from glio_node.errors import BundleError

NETWORK = """
[bundle]
name = "lab-regions"
version = "3.0"
intended_use = "Research use only. Region segmentation by the lab's own network."
is_demo = false

[network]
name = "regions"
tile_size = 16
um_per_px = 2.0
overlap = 4
normalization = "scale_0_1"
input = { name = "tiles", shape = ["batch", 16, 16, 3], dtype = "float32" }

[[network.heads]]
task = "segmentation"
activation = "softmax"
output = { name = "segmentation", shape = ["batch", 16, 16, 10], dtype = "float32" }
"""


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    onnx.save(og.graph("segmentation", 10, seed=1), tmp_path / "lab.onnx")
    (tmp_path / "LICENSE").write_text("\n  MIT License\n\nCopyright (c) 2026 The Lab\n")
    (tmp_path / "network.toml").write_text(NETWORK)
    return {"onnx": tmp_path / "lab.onnx", "licence": tmp_path / "LICENSE", "network": tmp_path / "network.toml"}


def test_an_import_makes_a_new_bundle_that_names_source_and_licence(files, tmp_path, capsys):
    out = tmp_path / "lab-regions"
    argv = ["models", "import", "--onnx", str(files["onnx"]), "--licence", str(files["licence"]),
            "--source", "The Lab, regions v3", "--network", str(files["network"]), "--out", str(out)]
    assert main(argv) == 0
    assert f"ok          lab-regions 3.0 (format 2) in {out}" in capsys.readouterr().out
    manifest = verify_bundle(out)
    network = manifest.networks[0]
    assert (network.runtime, network.file, network.origin.licence_file) == ("onnx", "regions.onnx", "regions.LICENCE.txt")
    assert network.origin.licence_name == "MIT License"
    assert manifest.uid.startswith("2.25.") and not manifest.is_demo
    origins = load_bundle(out, "cpu").algorithm.origins
    assert [(o.network, o.source, o.licence_name) for o in origins] == [("regions", "The Lab, regions v3", "MIT License")]
    assert origins[0].licence_sha256 == network.origin.licence_sha256


def test_a_new_bundle_needs_its_bundle_table(files, tmp_path):
    files["network"].write_text(NETWORK.split("[network]")[0].replace('version = "3.0"\n', "") + "[network]" + NETWORK.split("[network]")[1])
    with pytest.raises(BundleError, match=r"a new bundle needs \[bundle\] version \(or pass --into BUNDLE"):
        import_onnx(files["onnx"], files["licence"], "x", files["network"], tmp_path / "b")


def test_the_import_sets_file_runtime_and_origin_itself(files, tmp_path):
    files["network"].write_text(NETWORK.replace('name = "regions"\n', 'name = "regions"\nfile = "mine.onnx"\n'))
    with pytest.raises(BundleError, match=r"'file' is set by the import; remove it from \[network\]"):
        import_onnx(files["onnx"], files["licence"], "x", files["network"], tmp_path / "b")


def test_a_graph_that_differs_from_the_network_table_is_refused_before_anything_is_written(files, tmp_path):
    files["network"].write_text(NETWORK.replace('output = { name = "segmentation"', 'output = { name = "labels"'))
    with pytest.raises(BundleError, match=r"expected inputs .* outputs \[labels float32\[batch, 16, 16, 10\]\], found .* outputs \[segmentation "):
        import_onnx(files["onnx"], files["licence"], "x", files["network"], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_an_empty_licence_is_refused():
    with pytest.raises(BundleError, match=r"the licence file is empty"):
        licence_title("\n  \n")
    assert licence_title("  GNU   GENERAL PUBLIC LICENSE\nVersion 3") == "GNU GENERAL PUBLIC LICENSE"


ENCODER_NETWORK = """
[network]
name = "encoder"
kind = "encoder"
tile_size = 32
um_per_px = 2.0
overlap = 0
normalization = "imagenet"
embed_dim = 32
input = { name = "tiles", shape = ["batch", 32, 32, 3], dtype = "float32" }
output = { name = "embeddings", shape = ["batch", 32], dtype = "float32" }
"""


def _onnx_encoder(embed_dim: int = 32) -> onnx.ModelProto:
    """(batch, 32, 32, 3) -> the tile's mean colour through a (3, D) matrix: (batch, D)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(3, embed_dim)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("ReduceMean", ["tiles"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "W"], ["embeddings"])],
        "encoder", [helper.make_tensor_value_info("tiles", TensorProto.FLOAT, ["batch", 32, 32, 3])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", embed_dim])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_an_onnx_encoder_imported_into_a_two_stage_bundle_replaces_its_encoder_and_drops_its_gate(tmp_path):
    """The lab's ONNX encoder into a bundle of a Keras encoder (gated) and ABMIL heads with folds."""
    from dataclasses import replace

    import numpy as np
    import two_stage

    from glio_node.bundle import OodSpec, write_bundle
    from glio_node.ood import fit_reference, save_reference

    base = tmp_path / "two-stage"
    two_stage.write_two_stage_bundle(base, fold_models=two_stage.agreeing_folds())
    save_reference(fit_reference(np.random.default_rng(0).normal(size=(20, 32))), tmp_path / "ref.npz")
    gated = tmp_path / "gated"
    m = verify_bundle(base)
    models = {n.name: [base / w.file for w in n.folds] if n.folds else base / n.file for n in m.networks}
    write_bundle(gated, replace(m, ood=OodSpec("encoder", "embeddings", "ood-reference.npz", None, 2.0)), models,
                 ood_reference=tmp_path / "ref.npz")
    onnx.save(_onnx_encoder(), tmp_path / "enc.onnx")
    (tmp_path / "LICENSE").write_text("Apache License 2.0\n")
    (tmp_path / "encoder.toml").write_text(ENCODER_NETWORK)

    written, replaced = import_onnx(tmp_path / "enc.onnx", tmp_path / "LICENSE", "The Lab, encoder v2",
                                    tmp_path / "encoder.toml", tmp_path / "out", into=gated)

    assert replaced == ["encoder"]
    encoder = next(n for n in written.networks if n.name == "encoder")
    assert (encoder.kind, encoder.runtime, encoder.origin.source) == ("encoder", "onnx", "The Lab, encoder v2")
    heads = {n.name: n for n in written.networks if n.kind == "aggregator"}
    assert len(heads["egfr-abmil"].folds) == 2 and heads["mgmt-abmil"].encoder == "encoder"
    assert written.ood is None and "out-of-distribution gate (network 'encoder') was dropped" in written.provenance
    assert "trained on the replaced encoder's embeddings" in written.provenance
    load_bundle(tmp_path / "out", "cpu")  # every graph and model loads against its manifest
