"""Bundle format 2 with ONNX networks: the manifest, the signature check, SHA-256 before parsing,
the ONNX runner, and a path that never imports TensorFlow.

The graphs are built with onnx.helper (tests/onnx_graphs.py) and run by the real ONNX Runtime;
their NumPy reference is computed independently.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto

import onnx_graphs as og

from glio_node import coding
from glio_node.bundle import (
    NetworkSpec,
    TensorSpec,
    load_bundle,
    load_manifest,
    verify_bundle,
    write_bundle,
)
from glio_node.errors import BadInput, BundleError
from glio_node.runtime import onnx_runner
from glio_node.runtime.onnx_runner import OnnxNetwork

ROOT = Path(__file__).resolve().parents[2]
N_REGIONS = len(coding.REGION_CLASSES)


@pytest.fixture
def onnx_bundle(tmp_path) -> Path:
    og.write_onnx_bundle(tmp_path / "tiny-onnx")
    return tmp_path / "tiny-onnx"


def _tiles(n: int = 5, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, og.TILE, og.TILE, 3), dtype=np.uint8)


# --- the manifest ------------------------------------------------------------------------------------


def test_a_format_2_manifest_names_each_networks_runtime_and_signature(onnx_bundle):
    text = (onnx_bundle / "manifest.toml").read_text()
    assert text.count('runtime = "onnx"') == 2 and "format = 2" in text
    manifest = load_manifest(onnx_bundle)
    seg = manifest.network_for("segmentation")
    assert (seg.runtime, seg.kind, seg.file, seg.layout) == ("onnx", "tiles", "seg.onnx", "nhwc")
    assert str(seg.input) == f"tiles float32[batch, {og.TILE}, {og.TILE}, 3]"
    assert str(seg.head("segmentation").output) == f"segmentation float32[batch, {og.TILE}, {og.TILE}, {N_REGIONS}]"
    assert manifest == verify_bundle(onnx_bundle)


def test_format_1_bundles_still_load_as_keras_networks(tmp_path):
    from format_1 import format_1_copy

    manifest = load_manifest(format_1_copy(ROOT / "models" / "glio-demo", tmp_path / "v1"))
    assert manifest.format == 1
    assert {(n.runtime, n.kind, n.input) for n in manifest.networks} == {("keras", "tiles", None)}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"input": None}, r"network 'seg': an onnx network must declare its graph input, e\.g\. input = "),
        ({"file": "seg.keras"}, r"network 'seg': file 'seg\.keras' must be .* ending in \.onnx for runtime 'onnx'"),
        ({"runtime": "torch"}, r"network 'seg': runtime 'torch' is unknown; allowed: keras, onnx"),
        ({"kind": "slides"}, r"network 'seg': kind 'slides' is unknown; allowed: tiles, encoder, aggregator"),
        ({"layout": "nchw"}, r"network 'seg': input tiles float32\[batch, 16, 16, 3\] must have shape \['batch', 3, 16, 16\] \(layout nchw"),
        ({"input": TensorSpec("tiles", [1, 16, 16, 3], "float32")}, r"input tiles float32\[1, 16, 16, 3\] must have shape \['batch', 16, 16, 3\]"),
        ({"input": TensorSpec("segmentation", ["batch", 16, 16, 3], "float32")}, r"input and output names repeat: \['segmentation', 'segmentation'\]"),
    ],
)
def test_network_specs_refuse_a_signature_their_geometry_does_not_imply(change, message):
    with pytest.raises(BundleError, match=message):
        replace(og.seg_spec(), **change)


def test_a_head_output_must_carry_its_class_count():
    head = og.seg_spec().heads[0]
    wrong = replace(head, output=TensorSpec("segmentation", ["batch", 16, 16, 3], "float32"))
    with pytest.raises(BundleError, match=rf"head 'segmentation' output .* must have shape \['batch', 16, 16, {N_REGIONS}\]"):
        replace(og.seg_spec(), heads=(wrong,))


def test_a_keras_network_declares_no_signature():
    with pytest.raises(BundleError, match=r"input, layout and head outputs are declared for onnx networks only"):
        NetworkSpec("k", "k.keras", None, 16, 1.0, 0, "scale_0_1", og.cls_spec().heads)


def test_tensor_specs_refuse_unknown_dtypes_and_bad_dimensions():
    with pytest.raises(BundleError, match=r"dtype 'int64' is not supported; allowed: float32, float16"):
        TensorSpec("x", ["batch", 3], "int64")
    with pytest.raises(BundleError, match=r"dimension 0 of shape \['batch', 0\] must be a positive integer or a name"):
        TensorSpec("x", ["batch", 0], "float32")


def test_a_format_2_manifest_requires_the_runtime_key(onnx_bundle):
    path = onnx_bundle / "manifest.toml"
    path.write_text(path.read_text().replace('runtime = "onnx"\n', "", 1))
    with pytest.raises(BundleError, match=r"\[\[networks\]\] #1 lacks required key\(s\) \['runtime'\]"):
        load_manifest(onnx_bundle)


def test_format_1_knows_no_runtime_key(onnx_bundle):
    path = onnx_bundle / "manifest.toml"
    path.write_text(path.read_text().replace("format = 2", "format = 1", 1))
    with pytest.raises(BundleError, match=r"\[\[networks\]\] #1 has unknown key\(s\) \['input', 'kind', 'layout', 'runtime'\]"):
        load_manifest(onnx_bundle)


# --- the graph's signature against the manifest --------------------------------------------------------


@pytest.mark.parametrize(
    "model, found",
    [
        (og.graph("segmentation", N_REGIONS, output_name="probs"), rf"outputs \[probs float32\[batch, 16, 16, {N_REGIONS}\]\]"),
        (og.graph("segmentation", N_REGIONS + 1), rf"outputs \[segmentation float32\[batch, 16, 16, {N_REGIONS + 1}\]\]"),
        (og.graph("segmentation", N_REGIONS, input_name="image"), r"inputs \[image float32\[batch, 16, 16, 3\]\]"),
        (og.graph("segmentation", N_REGIONS, batch=1), r"inputs \[tiles float32\[1, 16, 16, 3\]\]"),
        (og.graph("segmentation", N_REGIONS, dtype=TensorProto.UINT8), r"inputs \[tiles uint8\[batch, 16, 16, 3\]\]"),
        (og.graph("segmentation", N_REGIONS, layout="nchw"), r"inputs \[tiles float32\[batch, 3, 16, 16\]\]"),
    ],
    ids=["output-renamed", "class-count", "input-renamed", "fixed-batch", "uint8-input", "channels-first"],
)
def test_a_graph_that_differs_from_its_manifest_is_refused_in_one_line(onnx_bundle, model, found):
    og.swap_graph(onnx_bundle, "seg", model)
    verify_bundle(onnx_bundle)  # the hashes are right: only the signature is wrong
    expected = (
        rf"network 'seg' \(seg\.onnx\): the ONNX graph's signature does not match the manifest: "
        rf"expected inputs \[tiles float32\[batch, 16, 16, 3\]\] outputs \[segmentation float32\[batch, 16, 16, {N_REGIONS}\]\], "
        rf"found .*{found}"
    )
    with pytest.raises(BundleError, match=expected) as info:
        load_bundle(onnx_bundle, "cpu")
    assert "\n" not in str(info.value)


def test_write_bundle_refuses_an_onnx_file_with_another_signature(tmp_path):
    import onnx

    onnx.save(og.graph("segmentation", N_REGIONS, output_name="probs"), tmp_path / "seg.onnx")
    with pytest.raises(BundleError, match=r"network 'seg' .* found inputs .* outputs \[probs "):
        write_bundle(tmp_path / "b", og.manifest(og.seg_spec()), {"seg": tmp_path / "seg.onnx"})
    assert not (tmp_path / "b").exists()


# --- SHA-256 before anything parses ---------------------------------------------------------------------


def test_an_onnx_file_with_one_byte_changed_is_refused_before_onnx_runtime_reads_it(onnx_bundle, monkeypatch):
    path = onnx_bundle / "cls.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))

    def must_not_parse(*args, **kwargs):
        raise AssertionError("onnxruntime.InferenceSession made for an unverified bundle")

    monkeypatch.setattr(onnxruntime, "InferenceSession", must_not_parse)
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(BundleError, match=rf"weights file cls\.onnx .* fails its SHA-256 check: .* file has {actual}"):
        load_bundle(onnx_bundle, "cpu")


def test_a_graph_onnx_runtime_cannot_parse_is_named_after_its_hash_passed(onnx_bundle):
    (onnx_bundle / "cls.onnx").write_bytes(b"not a graph")
    og_text = (onnx_bundle / "manifest.toml").read_text()
    sha = load_manifest(onnx_bundle).network_for("subtype").sha256
    (onnx_bundle / "manifest.toml").write_text(og_text.replace(sha, hashlib.sha256(b"not a graph").hexdigest()))
    with pytest.raises(BundleError, match=r"ONNX file cls\.onnx .* passed its SHA-256 check but ONNX Runtime cannot load it"):
        load_bundle(onnx_bundle, "cpu")


# --- the runner -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_onnx_networks_predict_what_their_numpy_reference_says(tmp_path, layout):
    og.write_onnx_bundle(tmp_path / "b", layout=layout)
    bundle = load_bundle(tmp_path / "b", "cpu")
    seg = OnnxNetwork(bundle.network_for("segmentation"), batch_size=8)
    cls = OnnxNetwork(bundle.network_for("subtype"), batch_size=8)
    assert (seg.name, seg.tile_size, seg.um_per_px, seg.overlap) == ("seg", og.TILE, 2.0, 4)
    assert [h.task for h in cls.heads] == ["subtype"]
    tiles = _tiles()
    labels = seg.predict(tiles)["segmentation"]
    probs = cls.predict(tiles)["subtype"]
    assert labels.dtype == np.uint8 and labels.shape == (5, og.TILE, og.TILE)
    ref = og.reference("segmentation", tiles, N_REGIONS, seed=1)
    top2 = np.sort(ref, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-5  # float32 may swap near-ties
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], ref.argmax(axis=-1)[clear])
    assert probs.dtype == np.float32 and probs.shape == (5, 4)
    np.testing.assert_allclose(probs, og.reference("subtype", tiles, 4, seed=2), atol=1e-5)
    with pytest.raises(ValueError, match=r"9 tiles exceed the batch size 8"):
        cls.predict(_tiles(9))


def test_cpu_is_always_there_and_gpu_needs_cuda():
    assert onnx_runner.providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert onnx_runner.providers("gpu")[0] == "CUDAExecutionProvider"
        assert onnx_runner.providers("auto")[0] == "CUDAExecutionProvider"
    else:
        assert onnx_runner.providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(BadInput, match=r"--device gpu was asked for but ONNX Runtime has no CUDA provider"):
            onnx_runner.providers("gpu")
    with pytest.raises(BadInput, match=r"device 'tpu' is not one of auto, cpu, gpu"):
        onnx_runner.providers("tpu")


def test_loading_and_running_an_onnx_bundle_never_imports_tensorflow(onnx_bundle):
    script = f"""
import sys
import numpy as np
from glio_node.bundle import load_bundle
from glio_node.runtime.runners import bundle_networks, prepare_device
bundle = load_bundle({str(onnx_bundle)!r}, "cpu")
print(prepare_device("cpu", bundle.manifest))
for network in bundle_networks(bundle, 4):
    network.predict(np.zeros((2, 16, 16, 3), np.uint8))
heavy = sorted(m for m in ("tensorflow", "keras", "jax", "torch") if m in sys.modules)
print("heavy:", heavy)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["cpu", "heavy: []"]


def test_each_runner_refuses_a_network_of_the_other_runtime(onnx_bundle):
    from glio_node.runtime.keras_runner import KerasNetwork

    loaded = load_bundle(onnx_bundle, "cpu").network_for("subtype")
    with pytest.raises(ValueError, match=r"network 'cls' runs on onnx: use runtime/runners\.bundle_networks"):
        KerasNetwork(loaded, 4)
    with pytest.raises(ValueError, match=r"network 'cls' runs on keras, not onnx"):
        keras_spec = NetworkSpec("cls", "cls.keras", None, 16, 0.5, 0, "scale_0_1", (replace(og.cls_spec().heads[0], output=None),))
        OnnxNetwork(replace(loaded, spec=keras_spec), 4)


def test_a_classifier_graph_that_ends_in_logits_gets_its_softmax_from_the_runner(tmp_path):
    import onnx

    onnx.save(og.graph("subtype", 4, seed=2, softmax=False), tmp_path / "cls.onnx")
    spec = og.cls_spec()
    spec = replace(spec, heads=(replace(spec.heads[0], activation="logits"),))
    write_bundle(tmp_path / "b", og.manifest(spec), {"cls": tmp_path / "cls.onnx"})
    assert 'activation = "logits"' in (tmp_path / "b" / "manifest.toml").read_text()
    network = OnnxNetwork(load_bundle(tmp_path / "b", "cpu").network_for("subtype"), 8)
    tiles = _tiles()
    np.testing.assert_allclose(network.predict(tiles)["subtype"], og.reference("subtype", tiles, 4, seed=2), atol=1e-5)


def test_keras_heads_must_output_softmax():
    head = replace(og.cls_spec().heads[0], activation="logits", output=None)
    with pytest.raises(BundleError, match=r"network 'k': activation 'logits' is for onnx networks"):
        NetworkSpec("k", "k.keras", None, 16, 1.0, 0, "scale_0_1", (head,))
