"""Issue 5's quality targets: a short training on synthetic slides, scored on held-out patients.

A data scientist generates a synthetic dataset (regions and molecular labels drawn as distinct
textures, labels drawn at random per task), trains with the CI-sized config
training/configs/synthetic-ci.toml, and the run's metrics on the held-out patients must reach:

- molecular classifier (subtype, MGMT, EGFR): every held-out slide called right (slide level, as
  the worker aggregates), and tile accuracy >= 0.95 for each (measured 0.977 / 0.994 / 0.983 with
  96-px tiles; with 64-px tiles EGFR's fine speckles gave only 0.948);
- regions UNet: mean Dice >= 0.90 (measured 0.960 with 50 epochs; 30 epochs gave only 0.839).

The whole test took 4 minutes on this project's 2 shared cores (3.5 of them training).
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
    print(f"trained in {time.monotonic() - started:.0f} s:", json.dumps({t: metrics[t]["tile"]["accuracy"] for t in ("subtype", "mgmt", "egfr")}), "regions mean Dice", metrics["regions"]["mean_dice"])
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["validation"]) == 8 and not set(split["train"]) & set(split["validation"])

    for task, tile_target in (("subtype", 0.95), ("mgmt", 0.95), ("egfr", 0.95)):
        assert metrics[task]["slide"]["n"] == 8
        assert metrics[task]["slide"]["accuracy"] == 1.0, (task, metrics[task]["slide"])
        assert metrics[task]["tile"]["accuracy"] >= tile_target, (task, metrics[task]["tile"]["accuracy"])
    assert metrics["regions"]["mean_dice"] >= 0.90, metrics["regions"]["mean_dice"]

    bundle = tmp_path / "models" / "glio-synthetic-ci"
    verify = _run(["-m", "glio_node.cli", "models", "verify", str(bundle)], env, 300)
    assert verify.returncode == 0, verify.stderr[-3000:]
    slide = tmp_path / "dataset" / "slides" / split["validation"][0]
    analyze = _run(["-m", "glio_node.cli", "analyze", str(slide), "--out", str(tmp_path / "out"), "--models", str(bundle)], env, 300)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    assert any((tmp_path / "out").rglob("*.dcm"))
