"""A worker keeps its models loaded between jobs, yet never runs a bundle that stopped verifying."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from glio_node.errors import BundleError
from glio_node.job import BundleCache

DEMO = Path(__file__).resolve().parents[2] / "models" / "glio-demo"


def test_models_load_once_and_a_tampered_bundle_is_still_refused(tmp_path):
    bundle = tmp_path / "glio-demo"
    shutil.copytree(DEMO, bundle)
    cache = BundleCache()
    first = cache.get(bundle)
    assert cache.get(bundle) is first  # same manifest: no reload
    weights = bundle / "regions.keras"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        cache.get(bundle)


def test_a_changed_manifest_reloads_the_models(tmp_path):
    bundle = tmp_path / "glio-demo"
    shutil.copytree(DEMO, bundle)
    cache = BundleCache()
    first = cache.get(bundle)
    manifest = bundle / "manifest.toml"
    manifest.write_text(manifest.read_text() + "\n# re-exported\n")
    second = cache.get(bundle)
    assert second is not first
    assert second.algorithm.sha256 != first.algorithm.sha256
