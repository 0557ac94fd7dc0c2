"""A data scientist trains from a dataset folder, gets a run folder and a bundle, and the worker
analyses a slide with that bundle unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glio_node.bundle import verify_bundle
from training.synthetic_dataset import write_synthetic_dataset

CONFIG = """
name = "glio-ci"
version = "0.0.1"
dataset = "dataset"
runs_dir = "runs"
models_dir = "models"
seed = 1
split = {method = "kfold", k = 2, fold = 1, stratify = "none"}   # 4 patients: 2 test, 1 validation, 1 train
augmentation = {crop = 48, hue = 0.0}

[segmentation]
um_per_px = 2.0
tile_size = 48
epochs = 2
batch_size = 8
depth = 2
base_filters = 4
overlap = 16
min_tissue = 0.0

[classifier]
um_per_px = 2.0
tile_size = 32
epochs = 1
batch_size = 16
backbone = "vgg16"       # random initialisation (no weights file): one frozen, one fine-tune epoch
frozen_epochs = 1
max_tiles_per_slide = 16
"""


@pytest.mark.slow
def test_train_writes_a_run_folder_and_a_bundle_the_worker_analyses_with(tmp_path):
    write_synthetic_dataset(tmp_path / "dataset", patients=4)
    (tmp_path / "run.toml").write_text(CONFIG)
    env_path = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "training", "train", "--config", str(tmp_path / "run.toml"), "--verbose", "0", "--model-card-dir", str(tmp_path / "cards")], cwd=env_path, env=env, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "regions: pixel accuracy" in done.stdout and "subtype: tile accuracy" in done.stdout

    (run_dir,) = (tmp_path / "runs").iterdir()
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.toml", "run.json", "split.json", "metrics.json", "metrics-regions.csv", "metrics-molecular.csv", "best-regions.keras", "confusion-regions-final.csv", "confusion-segmentation-epoch002.csv", "model-card.md"} <= names
    assert {"metrics-regions.png", "metrics-molecular.png", "confusion-segmentation-latest.png", "confusion-subtype-final.png"} <= names
    assert (run_dir / "metrics-molecular.csv").read_text().count("\n") == 3, "header, the frozen epoch and the fine-tune epoch"
    assert "test set (2 patients, scored once" in done.stdout
    card = (tmp_path / "cards" / "glio-ci.md").read_text()
    assert "![metrics-regions.png](glio-ci/metrics-regions.png)" in card and (tmp_path / "cards" / "glio-ci" / "metrics-regions.png").is_file()
    assert "## Test set (2 patients)" in card and "## Validation set (1 patients" in card and "patient-level bootstrap 95 % intervals" in card
    assert json.loads((run_dir / "run.json").read_text())["seed"] == 1
    assert "commit" in json.loads((run_dir / "run.json").read_text())["git"] or "unknown" in json.loads((run_dir / "run.json").read_text())["git"]
    split = json.loads((run_dir / "split.json").read_text())
    sides = [set(split[k]) for k in ("train", "validation", "test")]
    assert all(sides) and not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["sets"] == {"train": {"patients": 1, "slides": 1}, "validation": {"patients": 1, "slides": 1}, "test": {"patients": 2, "slides": 2}}
    regions = metrics["test"]["regions"]
    assert regions["ci"]["bootstrap"] == {"unit": "patient", "method": "percentile", "n_patients": 2, "n_resamples": 1000, "seed": 1, "level": 0.95}
    assert sorted(regions["slides"]) == sorted(split["test"]), "the test figures are the test slides'"
    assert set(metrics["validation"]["subtype"]["slide"]["slides"]) == set(split["validation"])

    manifest = verify_bundle(tmp_path / "models" / "glio-ci")
    v = manifest.validation
    assert manifest.name == "glio-ci" and v["test_patients"] == 2 and v["val_patients"] == 1
    assert v["test_regions_mean_dice"] == pytest.approx(regions["mean_dice"]) and "val_regions_mean_dice" in v
    assert v["test_regions_mean_dice_ci_low"] <= v["test_regions_mean_dice_ci_high"]
    assert {"test_regions_mcc", "test_regions_macro_f1", "test_subtype_slide_balanced_accuracy", "test_mgmt_tile_accuracy_ci_high"} <= set(v)
    # The OOD gate: reference on the training patient, thresholds on the validation patient only.
    assert manifest.ood is not None and manifest.ood.network == "molecular" and manifest.ood.validation_slides == 1
    ood = json.loads((run_dir / "ood.json").read_text())
    assert ood["slide_threshold"] == pytest.approx(manifest.ood.slide_threshold) and len(ood["validation_slide_scores"]) == 1
    verify = subprocess.run([sys.executable, "-m", "glio_node.cli", "models", "verify", str(tmp_path / "models" / "glio-ci")], cwd=env_path, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr[-3000:]
    slide = tmp_path / "dataset" / "slides" / split["test"][0]
    analyze = subprocess.run([sys.executable, "-m", "glio_node.cli", "analyze", str(slide), "--out", str(tmp_path / "out"), "--models", str(tmp_path / "models" / "glio-ci"), "--json"], cwd=env_path, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    assert any((tmp_path / "out").rglob("*.dcm"))
    _check_calibration(run_dir, tmp_path, metrics, manifest, card, json.loads(analyze.stdout[analyze.stdout.index("{"):]))


def _check_calibration(run_dir, tmp_path, metrics, manifest, card, summary):
    """Temperature and threshold were chosen on the validation slide, travel in the manifest, and
    the worker calibrates the mean tile probabilities with that temperature before calling."""
    cal = metrics["calibration"]
    assert cal["fitted_on"] == "validation" and cal["ece"]["bins"] == 10
    v = manifest.validation
    heads = {h.task: h for n in manifest.networks for h in n.heads}
    for task in ("subtype", "mgmt", "egfr"):
        c = cal[task]
        assert c["threshold"]["chosen_on"] == "validation" and c["validation"]["slides"] == 1 and c["test"]["slides"] == 2
        assert 0.1 <= c["temperature"] <= 10.0
        assert c["temperature_at_bound"] and c["temperature"] in (pytest.approx(0.1), pytest.approx(10.0)), "one validation slide: its NLL is monotone in T"
        assert heads[task].temperature == pytest.approx(c["temperature"]) == pytest.approx(v[f"val_{task}_temperature"])
        assert heads[task].indeterminate_below == pytest.approx(c["threshold"]["value"]) == pytest.approx(v[f"val_{task}_indeterminate_below"])
        assert {f"val_{task}_ece_before", f"val_{task}_ece_after", f"test_{task}_ece_before", f"test_{task}_ece_after", f"test_{task}_coverage"} <= set(v)
        assert c["validation"]["coverage"] == 1.0, "the threshold is at most the one validation slide's top probability"
    assert v["val_calibration_target_accuracy"] == 0.9 and v["val_calibration_min_coverage"] == 0.5
    assert "## Calibration and abstention (chosen on the validation set)" in card and "| mgmt |" in card
    assert "![reliability-mgmt.png](glio-ci/reliability-mgmt.png)" in card and "![coverage-mgmt.png](glio-ci/coverage-mgmt.png)" in card
    assert (run_dir / "reliability-subtype.png").is_file() and (tmp_path / "cards" / "glio-ci" / "coverage-egfr.png").is_file()

    import highdicom as hd
    from pydicom.sr.codedict import codes

    from glio_node.pipeline.calibration import calibrate

    (geojson,) = (tmp_path / "out").rglob("*.geojson")
    tiles = [f["properties"]["measurements"] for f in json.loads(geojson.read_text())["features"] if f["properties"].get("objectType") == "detection"]
    (sr_path,) = (tmp_path / "out").rglob("sr-*.dcm")
    report = hd.sr.srread(sr_path).content
    groups = report.get_image_measurement_groups()
    sr_probability = {g.finding_type.value: g.get_measurements(name=codes.DCM.Probability)[0].value for g in groups if g.get_measurements(name=codes.DCM.Probability)}
    temperature = {g.finding_type.value: g.get_measurements(name=hd.sr.CodedConcept("CALTEMP", "99GLIO", "Calibration temperature"))[0].value
                   for g in groups if g.get_measurements(name=hd.sr.CodedConcept("CALTEMP", "99GLIO", "Calibration temperature"))}
    for task, head_code in (("subtype", "GLIO-SUBTYPE"), ("mgmt", "GLIO-MGMT"), ("egfr", "GLIO-EGFR")):
        head = heads[task]
        mean = np.array([[t[f"{c.code_meaning} probability"] for c in head.classes] for t in tiles]).mean(axis=0)
        expected = calibrate(mean, head.temperature)
        assert [sr_probability[c.code_value] for c in head.classes] == pytest.approx(list(expected), rel=1e-4, abs=1e-6)
        assert summary["probabilities"][task] == pytest.approx({c.name: p for c, p in zip(head.classes, expected)}, rel=1e-4, abs=1e-6)
        assert summary["calibration"][task] == {"calibrated": True, "temperature": pytest.approx(head.temperature)}
        assert temperature[head_code] == pytest.approx(head.temperature)
        called = expected.max() >= head.indeterminate_below
        assert (summary["calls"][task] != "indeterminate") == called
