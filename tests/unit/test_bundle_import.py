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
