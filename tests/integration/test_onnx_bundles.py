"""Our Keras networks as ONNX networks.

- ``python -m training export-onnx`` turns models/glio-demo into an ONNX bundle; the same tiles
  through both give the same probabilities (1e-4) and labels (>= 99.9 % of pixels), and a slide
  gets the same calls.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


from glio_node.bundle import load_bundle, load_manifest, verify_bundle
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
    assert f"wrote bundle glio-demo-onnx 0.2.0 (format 2) to {out}" in done.stdout
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
        assert set(kout) == set(oout) == {h.task for h in k.heads}
        for task in kout:
            if task == "segmentation":
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
