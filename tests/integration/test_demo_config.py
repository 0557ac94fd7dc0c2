"""The shipped demo bundle is what `python -m training train --config training/configs/glio-demo.toml`
makes, and that config still trains.

The full run takes about half an hour, too long for CI; so CI checks two things that together
keep the bundle honest: the shipped manifest names the config and carries its SHA-256 (editing the
config without rebuilding the bundle fails here), and the same config at toy size
(glio-demo-smoke.toml, which only changes sizes) trains, exports a bundle shaped exactly like the
shipped one, and the worker analyses a slide with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glio_node.bundle import load_bundle, verify_bundle
from training.run import RunConfig, config_digest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "training" / "configs"
DEMO = ROOT / "models" / "glio-demo"


def _shape(manifest) -> list[tuple]:
    """What the worker depends on: networks, tiles, spacing, stitching, input scaling, heads and codes.
    Not the thresholds and temperatures: those are chosen on each run's validation slides."""
    return [
        (n.name, n.tile_size, n.um_per_px, n.overlap, n.normalization,
         [(h.task, h.activation, [(c.name, c.code_value, c.coding_scheme_designator) for c in h.classes]) for h in n.heads])
        for n in manifest.networks
    ]


def test_the_shipped_demo_bundle_was_built_from_the_demo_config():
    manifest = verify_bundle(DEMO)
    assert "python -m training train --config training/configs/glio-demo.toml" in manifest.provenance
    assert f"config SHA-256 {config_digest(CONFIGS / 'glio-demo.toml')}" in manifest.provenance, (
        "training/configs/glio-demo.toml changed after models/glio-demo was built: rebuild the bundle "
        "(the command is at the top of the config) or revert the config"
    )
    cfg = RunConfig.load(CONFIGS / "glio-demo.toml")
    assert cfg.calibration.enabled, "a rebuilt demo bundle carries temperatures and thresholds chosen on validation"
    assert (manifest.name, manifest.version, manifest.is_demo, manifest.intended_use) == (cfg.name, cfg.version, True, cfg.intended_use)
    assert "synthetic slides only" in manifest.provenance and "no patient data" in manifest.provenance
    # Figures of the test patients, which no choosing step saw (issue 14): not validation figures.
    v = manifest.validation
    assert v["test_patients"] >= 4 and v["test_regions_mean_dice"] > 0.8 and v["test_subtype_slide_accuracy"] > 0.8
    assert v["test_regions_mean_dice_ci_low"] <= v["test_regions_mean_dice"] <= v["test_regions_mean_dice_ci_high"]
    classifiers = [h for n in manifest.networks for h in n.heads if h.task != "segmentation"]
    assert classifiers and all(h.temperature is not None for h in classifiers), "temperatures fitted on validation"
    assert all(0.0 < h.indeterminate_below < 1.0 for h in classifiers)
    assert manifest.ood is not None and manifest.ood.validation_slides == v["val_slides"], "an OOD gate fitted on validation"


@pytest.mark.slow
def test_the_demo_config_at_toy_size_trains_a_bundle_shaped_like_the_shipped_one(tmp_path):
    (tmp_path / "run.toml").write_text(
        f'extends = "{CONFIGS / "glio-demo-smoke.toml"}"\n'
        'dataset = "dataset"\nruns_dir = "runs"\nmodels_dir = "models"\n'
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "1"}
    trained = subprocess.run(
        [sys.executable, "-m", "training", "train", "--config", str(tmp_path / "run.toml"), "--verbose", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((tmp_path / "dataset" / "synthetic.json").read_text())["patients"] == 4

    bundle = tmp_path / "models" / "glio-demo-smoke"
    smoke = load_bundle(bundle).manifest
    assert _shape(smoke) == _shape(load_bundle(DEMO).manifest)
    assert smoke.is_demo and "synthetic slides only" in smoke.provenance
    classifiers = [h for n in smoke.networks for h in n.heads if h.task != "segmentation"]
    assert classifiers and all(h.temperature is not None for h in classifiers), "the demo config calibrates by default"
    assert all(smoke.validation[f"val_{h.task}_indeterminate_below"] == h.indeterminate_below for h in classifiers)

    (run_dir,) = (tmp_path / "runs").iterdir()
    split = json.loads((run_dir / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "validation", "test")] == [2, 1, 1]
    assert smoke.validation["test_patients"] == 1 and "test_regions_mean_dice_ci_low" in smoke.validation
    slide = tmp_path / "dataset" / "slides" / split["test"][0]
    analyzed = subprocess.run(
        [sys.executable, "-m", "glio_node.cli", "analyze", str(slide), "--out", str(tmp_path / "out"), "--models", str(bundle), "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    assert len(list((tmp_path / "out").rglob("*.dcm"))) >= 3


def test_extends_lays_a_config_over_another_table_by_table(tmp_path):
    (tmp_path / "base.toml").write_text('name = "a"\nseed = 3\n[segmentation]\nepochs = 9\ntile_size = 64\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nname = "b"\n[segmentation]\nepochs = 1\n')
    from training.run import read_config

    assert read_config(tmp_path / "child.toml") == {"name": "b", "seed": 3, "segmentation": {"epochs": 1, "tile_size": 64}}
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ValueError, match="loops back"):
        read_config(tmp_path / "loop.toml")
