"""A data scientist asks how the classifier fares at a new site: `python -m training site-shift`
trains on the source stain, re-stains only the test patients' slides as the drawn site would, and
reports every normalisation with the OOD gate off and on, no choosing step having seen the test set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CONFIG = """
name = "glio-site-shift-ci"
version = "0.0.1"
dataset = "dataset"
runs_dir = "runs"
models_dir = "models"
seed = 1
validation_fraction = 0.34
split = {{test_fraction = 0.34, stratify = "mgmt"}}   # 12 patients: 4 test, 2 validation, 6 train

[synthetic]
patients = 12
seed = 0
width_px = 512
height_px = 384

[segmentation]
um_per_px = 2.0
tile_size = 64

[classifier]
um_per_px = 1.0
tile_size = 32
epochs = 2
batch_size = 16
depth = 2
base_filters = 4
max_tiles_per_slide = 16

[site_shift]
arms = {arms}
stain = {{seed = {stain_seed}, rotation_deg = 20.0, intensity = [0.6, 1.6]}}
"""
ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, name: str, arms: list[str], stain_seed: int) -> Path:
    (tmp_path / name).write_text(CONFIG.format(arms=json.dumps(arms), stain_seed=stain_seed))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "HOME": str(tmp_path)}
    before = set((tmp_path / "runs").iterdir()) if (tmp_path / "runs").is_dir() else set()
    done = subprocess.run([sys.executable, "-m", "training", "site-shift", "--config", str(tmp_path / name)],
                          cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "site-shift.md" in done.stdout
    (run_dir,) = set((tmp_path / "runs").iterdir()) - before
    return run_dir


def _source_tiles(tmp_path: Path, slide_id: str) -> np.ndarray:
    """The slide's classifier tiles read afresh from the dataset, as training reads them."""
    from training.dataset import load_dataset
    from training.run import _subsample
    from training.tiles import TileSpec, load_or_extract

    (record,) = [r for r in load_dataset(tmp_path / "dataset") if r.slide_id == slide_id]
    shard = load_or_extract(record, TileSpec(1.0, 32, 0.5), tmp_path / "dataset", tmp_path / "dataset" / ".tiles")
    return _subsample(shard, 16, 1).images


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.slow
def test_site_shift_trains_on_the_source_stain_and_reports_every_arm_gate_off_and_on(tmp_path):
    from training.stain_shift import StainShift, apply_stain_shift, draw_shift

    run_dir = _run(tmp_path, "run.toml", ["scale_0_1", "reinhard", "macenko"], stain_seed=0)
    split = json.loads((run_dir / "split.json").read_text())
    train, validation, test = (set(split[k]) for k in ("train", "validation", "test"))
    assert train and validation and test and not train & test and not validation & test and not train & validation

    # Only the test patients' tiles carry the drawn stain: checked against the tiles read afresh.
    stains = json.loads((run_dir / "stain-shift.json").read_text())
    drawn = draw_shift(StainShift(seed=0, rotation_deg=20.0, intensity=(0.6, 1.6)))
    assert np.allclose(stains["od_matrix"], drawn.matrix, atol=1e-6)
    assert all(10.0 <= r <= 20.0 for r in stains["rotations_deg"])
    for slide_id, seen in stains["slides"].items():
        source = _source_tiles(tmp_path, slide_id)
        source_mean = source.reshape(-1, 3).mean(axis=0)
        if slide_id in test:
            assert seen["set"] == "test" and seen["stain"] == "shifted"
            assert seen["mean_rgb"] == pytest.approx(apply_stain_shift(source, drawn).reshape(-1, 3).mean(axis=0), abs=1e-2)
            assert np.abs(np.asarray(seen["mean_rgb"]) - source_mean).max() > 3.0, "the shift must change the test slide's colour"
        else:
            assert seen["stain"] == "source" and seen["mean_rgb"] == pytest.approx(source_mean, abs=1e-2)

    result = json.loads((run_dir / "site-shift.json").read_text())
    assert result["split"]["test"] == split["test"] and result["sets"]["test"] == {"patients": 4, "slides": 4}
    assert set(result["arms"]) == {"scale_0_1", "reinhard", "macenko"}
    for arm, a in result["arms"].items():
        # No choosing step saw a test slide: what each was fitted on, and the gate's own report.
        chosen_on = a["chosen_on"]
        assert set(chosen_on["early_stopping_and_checkpoint"]) == validation and set(chosen_on["ood_thresholds"]) == validation
        assert set(chosen_on["calibration"]) <= validation and set(chosen_on["ood_reference"]) == train
        ood = json.loads((run_dir / f"arm-{arm}" / "ood.json").read_text())
        assert len(ood["validation_slide_scores"]) == len(validation) and len(ood["training_slide_scores"]) == len(train)
        assert (run_dir / f"arm-{arm}" / "best-molecular.keras").is_file()
        for stain in ("shifted", "source"):
            t = a["test"][stain]
            assert set(t["gate"]["scores"]) == test
            for task in ("subtype", "mgmt", "egfr"):
                off, on = t[task]["gate_off"], t[task]["gate_on"]
                assert off["slides"] == on["slides"] == 4
                assert on["called"] <= off["called"] and on["coverage"]["value"] <= off["coverage"]["value"], f"{arm} {stain} {task}"
                assert on["auc"] == off["auc"], "the gate changes which slides are called, not their probabilities"
                lo, hi = off["coverage"]["ci"]
                assert lo <= off["coverage"]["value"] <= hi
    table = (run_dir / "site-shift.md").read_text()
    for arm in ("none", "Reinhard", "Macenko"):
        for task in ("subtype", "mgmt", "egfr"):
            for stain in ("shifted", "source"):
                for gate in ("off", "on"):
                    assert sum(line.startswith(f"| {arm} | {task} | {stain} |") and f"| {gate} |" in line for line in table.splitlines()) == 1

    # A second site drawn for the same patients: had any choosing step seen the test tiles, its
    # choices would move with them.  They do not (the same seed trains the same network).
    other = _run(tmp_path, "other-site.toml", ["scale_0_1"], stain_seed=7)
    again = json.loads((other / "site-shift.json").read_text())["arms"]["scale_0_1"]
    assert not np.allclose(json.loads((other / "stain-shift.json").read_text())["od_matrix"], stains["od_matrix"], atol=0.05)
    first = result["arms"]["scale_0_1"]
    assert _flat(again["calibration"]) == pytest.approx(_flat(first["calibration"])) and again["ood"] == pytest.approx(first["ood"])
    assert again["test"]["source"]["gate"]["scores"] == pytest.approx(first["test"]["source"]["gate"]["scores"])
    assert again["test"]["shifted"]["gate"]["scores"] != pytest.approx(first["test"]["shifted"]["gate"]["scores"])
