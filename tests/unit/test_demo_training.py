"""The demo training pipeline writes a bundle the worker accepts."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before keras pulls in TensorFlow

import numpy as np
import pytest

from glio_node import coding
from glio_node.bundle import load_bundle, verify_bundle
from training import demo


def test_patches_are_reproducible_and_labelled_like_the_heads():
    seed = np.random.SeedSequence(7)
    x, y = demo.render_patches("segmentation", 3, seed)
    x2, y2 = demo.render_patches("segmentation", 3, np.random.SeedSequence(7))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.shape == (3, demo.SEG_TILE, demo.SEG_TILE, 3) and x.dtype == np.uint8
    assert y.shape == (3, demo.SEG_TILE, demo.SEG_TILE) and y.max() < len(coding.REGION_CLASSES)
    x, y = demo.render_patches("classifier", 5, np.random.SeedSequence(8))
    assert x.shape == (5, demo.CLS_TILE, demo.CLS_TILE, 3)
    assert y.shape == (5, 3)
    assert (y[:, 0] < 4).all() and (y[:, 1:] < 2).all()


@pytest.mark.slow
def test_fast_demo_training_writes_a_bundle_that_verifies_and_loads(tmp_path):
    out = tmp_path / "glio-demo"
    written = demo.build_demo_bundle(out, seed=1, fast=True)
    assert verify_bundle(out) == written
    loaded = load_bundle(out)
    manifest = loaded.manifest
    assert manifest.is_demo and "DEMO" in manifest.intended_use
    assert "--fast" in manifest.provenance and "synthetic" in manifest.provenance
    assert set(manifest.validation) >= {
        "regions_pixel_accuracy",
        "subtype_patch_accuracy",
        "mgmt_patch_accuracy",
        "egfr_patch_accuracy",
    }
    regions = loaded.network_for("segmentation").spec
    assert (regions.tile_size, regions.um_per_px, regions.overlap) == (320, 2.0, 32)
    molecular = loaded.network_for("subtype").spec
    assert (molecular.tile_size, molecular.um_per_px, molecular.overlap) == (160, 0.5, 0)
    assert loaded.algorithm.is_demo
