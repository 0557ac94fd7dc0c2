"""A data scientist's mistake gets one line saying what to fix and exit status 2, not a traceback."""

from __future__ import annotations

import pytest

from training.__main__ import main
from training.synthetic_dataset import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("cli") / "dataset", patients=3, workers=1)


def test_more_folds_than_patients_is_one_line(dataset, capsys):
    assert main(["split", str(dataset), "--method", "kfold", "--k", "9"]) == 2
    assert capsys.readouterr().err.strip() == "error: k-fold needs 2 <= k <= number of patients (3), got k=9"


def test_too_few_patients_of_a_class_for_a_test_set_is_one_line(dataset, capsys):
    # 3 patients, each subtype at most once: no subtype can be in train, validation and test.
    assert main(["split", str(dataset)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a test / validation / train split needs at least 3 patients per class (one in each set); class ")
    assert err.endswith('of subtype has 1: add patients, or set split.stratify = "none"')
    assert main(["split", str(dataset), "--stratify", "none"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fixed: train 1 slide(s), validation ") and ", test " in out


def test_a_wrong_split_method_in_a_run_config_is_named(dataset, tmp_path, capsys):
    (tmp_path / "run.toml").write_text(
        f'name = "x"\nversion = "0.1"\ndataset = "{dataset}"\nsplit = {{method = "random"}}\n'
        "[segmentation]\num_per_px = 2.0\ntile_size = 64\n[classifier]\num_per_px = 0.5\ntile_size = 64\n"
    )
    assert main(["train", "--config", str(tmp_path / "run.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: split.method 'random' is not 'fixed', 'kfold' or 'lopo'") and "Traceback" not in err


def test_a_slide_with_undecodable_tiles_is_named_with_the_file(tmp_path, capsys):
    import numpy as np
    import tifffile

    root = tmp_path / "ds"
    (root / "slides").mkdir(parents=True)
    (root / "labels.csv").write_text("slide_id,patient_id,subtype,um_per_px\nA,PA,neural,0.5\n")
    path = root / "slides" / "A.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), 120, np.uint8), tile=(256, 256), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = b"\xff" * 64  # the first tile's zlib stream is garbage
    path.write_bytes(bytes(data))
    assert main(["extract", str(root), "--um-per-px", "0.5", "--tile-size", "128"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "A.tif: tile 0 (row 0, column 0)" in err and "cannot be decoded" in err


def test_train_mil_mistakes_are_one_line_each(dataset, tmp_path, capsys):
    base = ["train-mil", "--dataset", str(dataset), "--task", "egfr", "--run-dir", str(tmp_path / "run")]
    assert main([*base, "--encoder", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: encoder {tmp_path / 'missing.onnx'} does not exist; build one with `python -m training encoder`"
    licence = tmp_path / "LICENCE.txt"
    licence.write_text("MIT\n")
    assert main([*base, "--encoder", str(licence), "--licence", str(licence)]) == 2
    assert capsys.readouterr().err.strip() == "error: give both --licence and --source for an encoder we did not make, or neither"
    assert main([*base, "--encoder", str(licence), "--licence", str(licence), "--source", "a site"]) == 2
    assert capsys.readouterr().err.strip() == "error: --licence and --source go with --bundle (they are stored in it)"
