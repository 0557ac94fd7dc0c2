"""The same slide, the same bundle, another Keras backend: the analysis does not depend on TensorFlow.

A site with a GPU runs the networks under JAX (bench/gpu.py); the demo bundle was trained and
saved under TensorFlow.  So the installed ``glio-node analyze`` runs once with
``KERAS_BACKEND=jax`` on the CPU, in its own process (a backend is chosen once per interpreter),
and its SEG must hold the label map the TensorFlow run gives, with the same slide-level calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from glio_node.bundle import load_bundle
from glio_node.pipeline.analyze import AnalysisOptions, analyze
from glio_node.results import NOT_TISSUE
from glio_node.runtime.keras_runner import bundle_networks, select_device
from glio_node.runtime.slide_reader import DicomSlide
from glio_node.synthetic.slide import SlideSpec
from glio_node.synthetic.textures import Signature

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "glio-demo"
pytestmark = pytest.mark.slow

SLIDE = SlideSpec(width_px=2048, height_px=1536, um_per_px=0.5, levels=3, seed=11,
                  signature=Signature(subtype=1, mgmt_methylated=True, egfr_amplified=False))


def _seg_label_map(files: list[Path]) -> np.ndarray:
    """The label map as the SEG's level 0 holds it (segment n = class n - 1; 0 = not tissue)."""
    segs = [hd.seg.segread(f) for f in files if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SEG"]
    base = min(segs, key=lambda s: s.InstanceNumber)
    segments = base.get_total_pixel_matrix(combine_segments=True).astype(np.int16)
    return np.where(segments == 0, NOT_TISSUE, segments - 1).astype(np.uint8)


def test_the_jax_backend_gives_the_tensorflow_label_map_and_calls(slide_cache, tmp_path):
    pytest.importorskip("jax", reason="jax is in the test extras: pip install -e '.[test]'")
    slide = slide_cache.slide(SLIDE)

    select_device("cpu")
    bundle = load_bundle(DEMO)
    with DicomSlide.open(slide.files) as reader:
        expected, _, _ = analyze(reader, bundle_networks(bundle, 8), bundle.algorithm, AnalysisOptions(batch_size=8))
    expected_calls = {c.task: (c.call.code_meaning if c.call else "indeterminate") for c in expected.calls}

    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "jax"
    proc = subprocess.run(
        [sys.executable, "-m", "glio_node.cli", "analyze", str(slide.files[0].parent), "--out", str(out),
         "--models", str(DEMO), "--device", "cpu", "--json"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    backend = subprocess.run(
        [sys.executable, "-c", "import keras; print(keras.backend.backend())"], env=env, capture_output=True, text=True
    ).stdout.strip()
    assert backend == "jax"

    got = _seg_label_map([Path(f) for f in summary["files"]])
    want = expected.label_map.array
    assert got.shape == want.shape
    agreement = float((got == want).mean())
    assert agreement >= 0.999, f"JAX and TensorFlow label maps agree on only {100 * agreement:.3f} % of pixels"
    assert summary["calls"] == expected_calls
