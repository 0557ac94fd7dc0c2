"""A data scientist cross-validates a run config by leaving each patient out in turn: one
command trains every fold, each patient is tested exactly once (each fold choosing its epochs on
an inner validation patient), and the summary's numbers are the folds' own.  The collection mixes DICOM series and plain TIFF slides, as research collections do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from glio_node.runtime.slide_reader import DicomSlide
from training.synthetic_dataset import write_synthetic_dataset

CONFIG = """
name = "glio-cv"
version = "0.0.1"
dataset = "dataset"
runs_dir = "runs"
models_dir = "models"
seed = 2
split = {method = "lopo", stratify = "none"}   # 3 patients: 1 test, 1 validation, 1 train per fold
augmentation = {crop = 48, hue = 0.0}

[segmentation]
um_per_px = 2.0
tile_size = 48
epochs = 1
batch_size = 8
depth = 2
base_filters = 4
min_tissue = 0.0

[classifier]
um_per_px = 2.0
tile_size = 32
epochs = 1
batch_size = 16
depth = 2
base_filters = 4
max_tiles_per_slide = 8
"""


def dicom_to_tiff(series: Path, out: Path) -> None:
    """Rewrite a DICOM WSI series as a tiled pyramidal TIFF (zlib, spacing in cm), then delete it."""
    with DicomSlide.open([series]) as slide, tifffile.TiffWriter(out) as w:
        for k, lvl in enumerate(slide.levels):
            fh, fw = lvl.frame_rows, lvl.frame_cols
            image = np.empty((-(-lvl.rows // fh) * fh, -(-lvl.cols // fw) * fw, 3), np.uint8)
            for r in range(image.shape[0] // fh):
                for c in range(image.shape[1] // fw):
                    image[r * fh : (r + 1) * fh, c * fw : (c + 1) * fw] = slide.read_frame(k, r, c)
            px_per_cm = 10_000.0 / lvl.um_per_px
            w.write(
                image[: lvl.rows, : lvl.cols], tile=(lvl.frame_rows, lvl.frame_cols), photometric="rgb", compression="zlib",
                resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                subifds=len(slide.levels) - 1 if k == 0 else None, subfiletype=0 if k == 0 else 1, metadata=None,
            )
    shutil.rmtree(series)


@pytest.mark.slow
def test_leave_one_patient_out_trains_every_fold_and_summarises_them(tmp_path):
    write_synthetic_dataset(tmp_path / "dataset", patients=3, slides_per_patient=2)
    for series in sorted((tmp_path / "dataset" / "slides").glob("P001-*")):  # patient P001 comes as TIFF
        dicom_to_tiff(series, series.with_suffix(".tif"))
    (tmp_path / "run.toml").write_text(CONFIG)
    root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": root, "PATH": "/usr/bin:/bin", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "training", "crossval", "--config", str(tmp_path / "run.toml")], cwd=root, env=env, check=False, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test_regions_mean_dice:" in done.stdout and "over 3 fold(s)" in done.stdout

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("glio-cv-cv-")
    assert not (tmp_path / "models").exists(), "cross-validation exports no bundle"
    fold_dirs = sorted(p for p in run_dir.iterdir() if p.name.startswith("fold-"))
    assert [p.name for p in fold_dirs] == ["fold-00", "fold-01", "fold-02"]

    labels = (tmp_path / "dataset" / "labels.csv").read_text().splitlines()
    header = labels[0].split(",")
    patient_of = {row.split(",")[header.index("slide_id")]: row.split(",")[header.index("patient_id")] for row in labels[1:]}
    tested = []
    for fold in fold_dirs:
        split = json.loads((fold / "split.json").read_text())
        patients = [{patient_of[s] for s in split[k]} for k in ("train", "validation", "test")]
        assert [len(p) for p in patients] == [1, 1, 1] and len(set.union(*patients)) == 3
        assert split["name"] == f"lopo-{next(iter(patients[2]))}"
        tested += split["test"]
        assert {"metrics.json", "metrics-regions.csv", "best-molecular.keras", "confusion-subtype-final.png"} <= {p.name for p in fold.iterdir()}
    assert sorted(tested) == sorted(patient_of), "every slide tested exactly once"
    tiff_fold = json.loads((run_dir / "fold-01" / "metrics.json").read_text())  # lopo-P001: its TIFF slides are the test set
    assert tiff_fold["test"]["regions"]["n"] > 0 and tiff_fold["test"]["subtype"]["slide"]["n"] == 2

    summary = json.loads((run_dir / "cv-summary.json").read_text())
    dice = [json.loads((f / "metrics.json").read_text())["test"]["regions"]["mean_dice"] for f in fold_dirs]
    assert summary["metrics"]["test_regions_mean_dice"]["mean"] == pytest.approx(np.mean(dice))
    assert summary["metrics"]["test_regions_mean_dice"]["sd"] == pytest.approx(np.std(dice, ddof=1))
    assert summary["pooled"]["subtype"]["slide"]["n"] == len(patient_of)
    assert summary["pooled"]["regions"]["ci"]["bootstrap"]["n_patients"] == 3
    assert summary["split"] == {"method": "lopo", "k": 3, "seed": 2}
    md = (run_dir / "cv-summary.md").read_text()
    assert "| test_regions_mean_dice |" in md and "lopo-" in md and "**test** figure" in md
