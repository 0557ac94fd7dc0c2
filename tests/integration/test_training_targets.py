"""Issue 5's quality targets: a short training on synthetic slides, scored on test patients.

A data scientist generates a synthetic dataset (regions and molecular labels drawn as distinct
textures, labels drawn at random per task), trains with the CI-sized config
training/configs/synthetic-ci.toml (20 training, 4 validation and 8 test patients, each subtype in
each set), and the run's metrics on the 8 test patients, whom early stopping and checkpointing
never saw, must reach:

- molecular classifier (subtype, MGMT, EGFR): every test slide called right (slide level, as the
  worker aggregates), and tile accuracy >= 0.95 for each (measured on the test set 0.968 / 1.000 /
  0.977 with 96-px tiles; with 64-px tiles EGFR's fine speckles gave only 0.948 on validation);
- regions UNet: mean Dice >= 0.90 (measured 0.941 on the test set, interval [0.918, 0.954], with
  50 epochs; 30 epochs gave only 0.839 on validation).

The whole test took 4 to 9 minutes on this project's 2 shared cores (most of it training).
Then the exported bundle passes `glio-node models verify` and `glio-node analyze` runs with it.
Seeds are fixed (dataset and run), so the numbers repeat up to float round-off.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], env: dict, timeout: int = 1800) -> subprocess.CompletedProcess:
    # A guard against a hung run, not a speed test (bench/ measures speed): training took 211 s
    # on one day and 446 s on another on the same machine kind, and more beside other work.
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_short_training_on_synthetic_slides_meets_the_targets_on_held_out_patients(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "1"}
    made = _run(["-m", "training", "synthetic", str(tmp_path / "dataset"), "--patients", "32", "--seed", "0"], env)
    assert made.returncode == 0, made.stderr[-3000:]
    (tmp_path / "run.toml").write_text((ROOT / "training" / "configs" / "synthetic-ci.toml").read_text())

    started = time.monotonic()
    trained = _run(["-m", "training", "train", "--config", str(tmp_path / "run.toml"), "--verbose", "0"], env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("validation", "test"):
        m = metrics[name]
        print(
            f"trained in {time.monotonic() - started:.0f} s; {name}:",
            json.dumps({t: [m[t]["tile"]["accuracy"], m[t]["tile"]["ci"]["accuracy"], m[t]["slide"]["accuracy"]] for t in ("subtype", "mgmt", "egfr")}),
            "regions mean Dice", m["regions"]["mean_dice"], m["regions"]["ci"]["mean_dice"],
        )
    split = json.loads((run_dir / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "validation", "test")] == [20, 4, 8]
    assert not set(split["test"]) & (set(split["train"]) | set(split["validation"]))

    test = metrics["test"]  # the 8 test patients, whom early stopping and checkpointing never saw
    for task, tile_target in (("subtype", 0.95), ("mgmt", 0.95), ("egfr", 0.95)):
        assert test[task]["slide"]["n"] == 8
        assert test[task]["slide"]["accuracy"] == 1.0, (task, test[task]["slide"])
        assert test[task]["tile"]["accuracy"] >= tile_target, (task, test[task]["tile"]["accuracy"])
    assert test["regions"]["mean_dice"] >= 0.90, test["regions"]["mean_dice"]
    lo, hi = test["regions"]["ci"]["mean_dice"]
    assert lo <= test["regions"]["mean_dice"] <= hi and test["regions"]["ci"]["bootstrap"]["n_patients"] == 8

    bundle = tmp_path / "models" / "glio-synthetic-ci"
    verify = _run(["-m", "glio_node.cli", "models", "verify", str(bundle)], env, 300)
    assert verify.returncode == 0, verify.stderr[-3000:]
    slide = tmp_path / "dataset" / "slides" / split["test"][0]
    analyze = _run(["-m", "glio_node.cli", "analyze", str(slide), "--out", str(tmp_path / "out"), "--models", str(bundle)], env, 300)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    assert any((tmp_path / "out").rglob("*.dcm"))
