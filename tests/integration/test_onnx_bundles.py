"""Our Keras networks as ONNX networks, a hospital's ONNX network imported air-gapped, and
bundles whose graph does not match their manifest refused in one line.

- ``python -m training export-onnx`` turns models/glio-demo into an ONNX bundle; the same tiles
  through both give the same probabilities (1e-4) and labels (>= 99.9 % of pixels), and a slide
  gets the same calls;
- ``glio-node models import`` runs inside a network namespace with no interface (``unshare -rn``):
  it needs nothing but its files; the licence and source it records are named in the outputs;
- ``glio-node models verify`` and ``glio-node analyze`` refuse a bundle whose graph has another
  signature than its manifest declares, with one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

import onnx_graphs as og
from dciodvfy import assert_valid

from glio_node import coding
from glio_node.bundle import load_bundle, load_manifest, verify_bundle
from glio_node.ood import FEATURES_KEY
from glio_node.pipeline.analyze import AnalysisOptions, analyze
from glio_node.runtime.runners import bundle_networks, prepare_device
from glio_node.runtime.slide_reader import DicomSlide
from glio_node.synthetic.textures import Signature, render

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "glio-demo"
pytestmark = pytest.mark.slow
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}


def _run(*args: str, wrap: tuple[str, ...] = (), timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*wrap, sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def onnx_demo(tmp_path_factory) -> Path:
    """models/glio-demo exported by the training command, as a user would run it."""
    out = tmp_path_factory.mktemp("export") / "glio-demo-onnx"
    done = _run("-m", "training", "export-onnx", "--bundle", str(DEMO), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote bundle glio-demo-onnx {load_manifest(DEMO).version} (format 2) to {out}" in done.stdout
    return out


@pytest.fixture(scope="module")
def both(onnx_demo):
    prepare_device("cpu", load_manifest(DEMO))
    keras_bundle, onnx_bundle = load_bundle(DEMO, "cpu"), load_bundle(onnx_demo, "cpu")
    return (keras_bundle, bundle_networks(keras_bundle, 8)), (onnx_bundle, bundle_networks(onnx_bundle, 8))


def _textured_tiles(tile: int, um_per_px: float, n: int) -> np.ndarray:
    """Tiles painted by the synthetic textures the demo was trained on: every region class,
    three molecular signatures, some glass."""
    tiles = []
    for i in range(n):
        labels = np.full((tile, tile), i % 10, np.int64)
        labels[: tile // 2, : tile // 3] = (i + 3) % 10
        tissue = np.ones((tile, tile), bool)
        tissue[:, -tile // 8 :] = i % 4 != 0
        signature = Signature(subtype=i % 4, mgmt_methylated=bool(i % 2), egfr_amplified=bool(i % 3 == 0))
        tiles.append(render(labels, i * tile * um_per_px, 0.0, um_per_px, signature, tissue, seed=i))
    return np.stack(tiles)


def test_the_export_is_a_format_2_bundle_of_onnx_networks_with_the_demos_geometry(onnx_demo):
    demo, exported = load_manifest(DEMO), verify_bundle(onnx_demo)
    assert exported.format == 2 and {n.runtime for n in exported.networks} == {"onnx"}
    assert [(n.name, n.tile_size, n.um_per_px, n.overlap, n.normalization, n.heads[0].classes) for n in exported.networks] == [
        (n.name, n.tile_size, n.um_per_px, n.overlap, n.normalization, n.heads[0].classes) for n in demo.networks
    ]
    assert "model.export(format='onnx') through tf2onnx" in exported.provenance
    assert exported.uid != demo.uid and exported.validation == demo.validation


def test_the_same_tiles_give_the_same_probabilities_and_labels_in_keras_and_onnx(both):
    (_, keras_nets), (_, onnx_nets) = both
    for k, o in zip(keras_nets, onnx_nets):
        assert (k.name, k.tile_size) == (o.name, o.tile_size)
        tiles = _textured_tiles(k.tile_size, k.um_per_px, 8)
        kout, oout = k.predict(tiles), o.predict(tiles)
        # a network the demo's OOD gate reads also returns its features, from both runtimes
        assert set(kout) == set(oout) == {h.task for h in k.heads} | ({FEATURES_KEY} & set(kout))
        for task in kout:
            if task == FEATURES_KEY:
                np.testing.assert_allclose(oout[task], kout[task], rtol=1e-4, atol=1e-5)
            elif task == "segmentation":
                same = (kout[task] == oout[task]).mean()
                assert same >= 0.999, f"{task}: labels agree on {100 * same:.3f} % of pixels"
                assert len(np.unique(kout[task])) >= 5  # the tiles exercise many classes, not one
            else:
                np.testing.assert_allclose(oout[task], kout[task], atol=1e-4, rtol=0)
                assert oout[task].dtype == np.float32


def test_probabilities_of_every_pixel_agree_within_1e4(both):
    """Below the argmax: the segmentation softmax itself, straight from both models."""
    (kb, _), (ob, _) = both
    from glio_node.bundle import normalize

    spec = kb.network_for("segmentation").spec
    x = normalize(_textured_tiles(spec.tile_size, spec.um_per_px, 4), spec.normalization)
    keras_probs = np.asarray(kb.network_for("segmentation").model.predict_on_batch(x)["segmentation"])
    (onnx_probs,) = ob.network_for("segmentation").model.run(["segmentation"], {"tiles": x})
    assert np.abs(onnx_probs - keras_probs).max() < 1e-4


def test_a_slide_gets_the_same_calls_and_regions_from_both_bundles(both, small_slide):
    results = []
    for bundle, networks in both:
        with DicomSlide.open(small_slide.files) as slide:
            result, stats, _ = analyze(slide, networks, bundle.algorithm, AnalysisOptions(batch_size=8))
        assert all(n.tiles_inferred > 0 for n in stats.networks)
        results.append(result)
    keras_result, onnx_result = results
    assert [(c.task, c.call) for c in onnx_result.calls] == [(c.task, c.call) for c in keras_result.calls]
    for kc, oc in zip(keras_result.calls, onnx_result.calls):
        np.testing.assert_allclose(oc.probabilities, kc.probabilities, atol=1e-4)
    same = (onnx_result.label_map.array == keras_result.label_map.array).mean()
    assert same >= 0.999, f"label maps agree on {100 * same:.3f} % of pixels"
    assert onnx_result.algorithm.name == "glio-demo-onnx" and keras_result.algorithm.name == "glio-demo"


def test_glio_node_analyze_with_the_onnx_bundle_runs_without_tensorflow(onnx_demo, small_slide, tmp_path):
    out = tmp_path / "results"
    script = (
        "import sys; from glio_node.cli import main; "
        f"rc = main(['analyze', *{[str(f) for f in small_slide.files]!r}, '--out', {str(out)!r}, "
        f"'--models', {str(onnx_demo)!r}, '--device', 'cpu', '--json']); "
        "print('heavy:', sorted(m for m in ('tensorflow', 'keras') if m in sys.modules), file=sys.stderr); sys.exit(rc)"
    )
    done = _run("-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "heavy: []" in done.stderr
    summary = json.loads(done.stdout)
    assert summary["bundle"] == f"glio-demo-onnx {load_manifest(DEMO).version}" and summary["device"] == "cpu"
    assert {pydicom.dcmread(f).Modality for f in summary["files"]} == {"SEG", "SR", "OT", "ANN"}


# --- air-gapped import ---------------------------------------------------------------------------------


def _no_network_wrapper() -> tuple[str, ...]:
    """``unshare -rn``: a new user and network namespace with no interface but a downed loopback.

    Proven here, not assumed: a server listening in this namespace must be unreachable from it.
    """
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept()[0].close(), daemon=True).start()
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"
    reachable = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
    isolated = subprocess.run(["unshare", "-rn", sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    server.close()
    assert reachable.returncode == 0, "the probe cannot even reach this namespace's loopback"
    assert isolated.returncode != 0 and "Network is unreachable" in isolated.stderr, (
        "unshare -rn did not cut the network off; this test needs a kernel that allows user namespaces"
    )
    return ("unshare", "-rn")


NETWORK_TOML = """
[network]
name = "hospital-regions"
tile_size = 320
um_per_px = 2.0
overlap = 32
normalization = "scale_0_1"
input = { name = "tiles", shape = ["batch", 320, 320, 3], dtype = "float32" }

[[network.heads]]
task = "segmentation"
activation = "softmax"
output = { name = "segmentation", shape = ["batch", 320, 320, 10], dtype = "float32" }
"""
SOURCE = "Pathology lab of St Elsewhere, regions net v3 (2026-10), handed over on a USB stick"


@pytest.fixture(scope="module")
def imported(onnx_demo, tmp_path_factory) -> Path:
    """A hospital's segmentation network (here: our exported one) imported into a copy of the demo, offline."""
    work = tmp_path_factory.mktemp("import")
    (work / "LICENCE.txt").write_text("Apache License\nVersion 2.0, January 2004\n(full text here)\n")
    (work / "network.toml").write_text(NETWORK_TOML)
    out = work / "glio-demo-hospital"
    done = _run(
        "-m", "glio_node.cli", "models", "import", "--onnx", str(onnx_demo / "regions.onnx"),
        "--licence", str(work / "LICENCE.txt"), "--source", SOURCE, "--network", str(work / "network.toml"),
        "--into", str(DEMO), "--out", str(out), wrap=_no_network_wrapper(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replaced    regions of" in done.stdout
    return out


def test_an_import_without_network_writes_a_verified_bundle_with_licence_and_source(imported, onnx_demo):
    manifest = verify_bundle(imported)
    assert [(n.name, n.runtime) for n in manifest.networks] == [("molecular", "keras"), ("hospital-regions", "onnx")]
    network = manifest.network_for("segmentation")
    assert network.origin.source == SOURCE and network.origin.licence_name == "Apache License"
    assert (imported / network.origin.licence_file).read_text().startswith("Apache License\nVersion 2.0")
    assert (imported / "molecular.keras").read_bytes() == (DEMO / "molecular.keras").read_bytes()
    assert (imported / "hospital-regions.onnx").read_bytes() == (onnx_demo / "regions.onnx").read_bytes()
    assert "imported by `glio-node models import` from regions.onnx" in manifest.provenance
    gone = tuple(f"{s}{p}_" for s in ("", "test_", "val_") for p in ("regions", "segmentation"))
    assert not any(k.startswith(gone) for k in manifest.validation), "the replaced network's figures must go"
    assert "test_subtype_slide_accuracy" in manifest.validation and "val_subtype_temperature" in manifest.validation
    assert network.head("segmentation").classes == coding.REGION_CLASSES  # the task's standard codes


def test_a_changed_licence_text_fails_the_bundles_sha256_check(imported, tmp_path):
    copy = Path(shutil.copytree(imported, tmp_path / "copy"))
    (copy / "hospital-regions.LICENCE.txt").write_text("Public domain, do what you like\n")
    done = _run("-m", "glio_node.cli", "models", "verify", str(copy))
    assert done.returncode == 2
    assert "licence file hospital-regions.LICENCE.txt" in done.stderr and "fails its SHA-256 check" in done.stderr


def _texts(ds) -> list[str]:
    """Every text value of a dataset, nested sequences included (SEG algorithm identification, SR TEXT items)."""
    found = []
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                found += _texts(item)
        elif element.VR in ("LT", "UT", "ST", "LO") and element.value:
            found.append(str(element.value))
    return found


def test_every_output_names_the_imported_networks_source_and_licence(imported, small_slide, tmp_path):
    out = tmp_path / "results"
    done = _run("-m", "glio_node.cli", "analyze", *map(str, small_slide.files), "--out", str(out),
                "--models", str(imported), "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    licence_sha = load_manifest(imported).network_for("segmentation").origin.licence_sha256
    modalities = set()
    for f in summary["files"]:
        ds = pydicom.dcmread(f)
        modalities.add(ds.Modality)
        text = "\n".join(_texts(ds))  # the algorithm identification, wherever the object kind keeps it
        if ds.Modality in ("SEG", "SR"):
            assert "hospital-regions_source=Pathology lab of St Elsewhere; regions net v3" in text, ds.Modality
            assert f"hospital-regions_licence=Apache License (licence text sha256 {licence_sha})" in text
        assert_valid(Path(f))
    assert {"SEG", "SR"} <= modalities


# --- a graph that does not match its manifest ---------------------------------------------------------


@pytest.fixture
def mismatched(tmp_path) -> Path:
    """A bundle whose regions graph was swapped for one with another output name, hashes fixed up."""
    og.write_onnx_bundle(tmp_path / "mismatched")
    og.swap_graph(tmp_path / "mismatched", "seg", og.graph("segmentation", 10, output_name="probs"))
    return tmp_path / "mismatched"


def _one_line_refusal(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_models_verify_refuses_a_graph_whose_signature_differs_in_one_line(mismatched):
    line = _one_line_refusal(_run("-m", "glio_node.cli", "models", "verify", str(mismatched)))
    assert line.startswith("glio-node: error: network 'seg' (seg.onnx): the ONNX graph's signature does not match")
    assert "expected inputs [tiles float32[batch, 16, 16, 3]] outputs [segmentation float32[batch, 16, 16, 10]]" in line
    assert "found inputs [tiles float32[batch, 16, 16, 3]] outputs [probs float32[batch, 16, 16, 10]]" in line


def test_analyze_refuses_a_graph_whose_signature_differs_in_one_line(mismatched, small_slide, tmp_path):
    done = _run("-m", "glio_node.cli", "analyze", *map(str, small_slide.files), "--out", str(tmp_path / "out"),
                "--models", str(mismatched), "--device", "cpu")
    line = _one_line_refusal(done)
    assert "network 'seg' (seg.onnx): the ONNX graph's signature does not match the manifest" in line
    assert not (tmp_path / "out").exists()
