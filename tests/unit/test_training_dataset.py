"""A data scientist points the validator at a dataset folder and gets every problem in one report."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from training.dataset import (
    IVY_GAP_COLOURS,
    REGION_NAMES,
    DatasetError,
    load_colour_map,
    load_dataset,
    mask_to_labels,
    validate_dataset,
)
from training.synthetic_dataset import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("ds") / "dataset", patients=3)


def test_a_synthetic_dataset_in_the_documented_format_is_valid(dataset):
    records = load_dataset(dataset)
    assert [r.slide_id for r in records] == ["P000-S0", "P001-S0", "P002-S0"]
    assert all(r.is_dicom and r.mask_path is not None for r in records)
    rows = list(csv.DictReader((dataset / "labels.csv").open()))
    assert [r.labels for r in records] == [{k: row[k] for k in ("subtype", "mgmt", "egfr")} for row in rows]
    assert len({r.labels["subtype"] for r in records}) == 3, "balanced: three patients, three subtypes"


def test_every_problem_is_reported_at_once(dataset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    rows = list(csv.DictReader((bad / "labels.csv").open()))
    rows[0]["subtype"] = "astro"  # not a subtype
    rows[1]["mgmt"] = ""  # missing is allowed
    rows.append(dict(rows[2]))  # duplicate slide id
    rows.append({"slide_id": "P009-S0", "patient_id": "P009", "subtype": "", "mgmt": "", "egfr": ""})  # no slide
    with (bad / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    Image.fromarray(np.full((10, 40), 12, np.uint8)).save(bad / "masks" / "P002-S0.png")  # wrong values and aspect
    shutil.copytree(bad / "slides" / "P000-S0", bad / "slides" / "stray")
    (bad / "slides" / "P001-S0" / "level0_000.dcm").write_bytes(b"not dicom")  # hypothetical junk file
    for f in (bad / "slides" / "P001-S0").iterdir():
        f.write_bytes(b"garbage")

    _, problems = validate_dataset(bad)
    text = "\n".join(map(str, problems))
    assert "labels.csv line 2: subtype 'astro' is not one of" in text
    assert "labels.csv line 5: slide_id 'P002-S0' is already on line 4" in text
    assert "labels.csv line 6: no slide slides/P009-S0/" in text
    assert "slides/stray: is not listed in labels.csv" in text
    assert "slides/P001-S0: cannot be read as a slide" in text
    assert "masks/P002-S0.png: label values [12] are neither region classes" in text
    assert "mgmt" not in text  # an empty label is not a problem
    with pytest.raises(DatasetError, match="python -m training validate"):
        load_dataset(bad)


def test_a_mask_for_another_slide_is_caught_by_its_aspect_ratio(dataset, tmp_path):
    bad = tmp_path / "aspect"
    shutil.copytree(dataset, bad)
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(bad / "masks" / "P000-S0.png")
    _, problems = validate_dataset(bad)
    assert [str(p) for p in problems] == [
        "masks/P000-S0.png: is 100x100 px (aspect 1.000) but the slide is 1024x768 px (aspect 1.333); is it the mask of another slide?"
    ]


def test_research_collections_may_give_plain_tiff_and_colour_masks(tmp_path):
    root = tmp_path / "tiff"
    (root / "slides").mkdir(parents=True)
    (root / "masks").mkdir()
    tifffile.imwrite(root / "slides" / "A.tif", np.full((64, 128, 3), 200, np.uint8))
    colour = np.zeros((32, 64, 3), np.uint8)
    colour[:] = IVY_GAP_COLOURS["necrosis"]
    colour[:, :10] = (255, 255, 255)  # unlabelled
    Image.fromarray(colour).save(root / "masks" / "A.png")
    (root / "labels.csv").write_text("slide_id,patient_id,subtype,mgmt,egfr,um_per_px\nA,PA,,,,0.5\n")
    records = load_dataset(root)
    assert records[0].slide_path.name == "A.tif"
    labels = mask_to_labels(np.asarray(Image.open(records[0].mask_path)), load_colour_map(root))
    assert labels[0, 0] == 255 and labels[0, 20] == REGION_NAMES.index("necrosis")


def test_unknown_colours_are_named():
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (1, 2, 3)
    with pytest.raises(ValueError, match=r"colours \[\(0, 0, 0\), \(1, 2, 3\)\] are not in the colour map"):
        mask_to_labels(colour, {(255, 255, 255): 255})


def test_the_command_line_validator_exits_non_zero_on_problems(dataset, tmp_path, capsys):
    from training.__main__ import main

    assert main(["validate", str(dataset)]) == 0
    assert "3 slide(s) of 3 patient(s), 3 with a region mask; 0 problem(s)" in capsys.readouterr().out
    bad = tmp_path / "nolabels"
    shutil.copytree(dataset, bad)
    (bad / "labels.csv").unlink()
    assert main(["validate", str(bad)]) == 1
    assert "PROBLEM labels.csv: missing" in capsys.readouterr().out
    assert main(["split", str(dataset), "--method", "lopo", "--stratify", "none"]) == 0  # 3 patients: one subtype each
    out = capsys.readouterr().out
    assert "lopo-P001: train 1 slide(s), validation " in out and out.count(", test P001-S0\n") == 1


def test_ivy_gap_annotation_images_saved_as_jpeg_are_read_to_the_right_classes(tmp_path):
    """Ivy GAP's annotation images are JPEGs: colours drift a few levels and blend at borders."""
    from training.dataset import JPEG_TOLERANCE, read_mask

    names = [n for n in REGION_NAMES]
    truth = np.repeat(np.repeat(np.arange(len(names), dtype=np.uint8).reshape(2, 5), 40, axis=0), 40, axis=1)
    rgb = np.array([IVY_GAP_COLOURS[n] for n in names], np.uint8)[truth]
    Image.fromarray(rgb).save(tmp_path / "m.jpg", quality=75)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    got = read_mask(tmp_path / "m.jpg", load_colour_map(tmp_path))
    labelled = got != 255
    assert labelled.mean() > 0.95  # only border blends are left unlabelled
    assert (got[labelled] == truth[labelled]).all()  # and nothing is given a wrong class
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", load_colour_map(tmp_path)), truth)
    keys = np.array(list(IVY_GAP_COLOURS.values()), np.int16)
    gaps = np.abs(keys[:, None] - keys[None]).max(-1) + np.eye(len(keys), dtype=np.int16) * 999
    assert gaps.min() > 2 * JPEG_TOLERANCE  # a pixel is never within tolerance of two classes


def test_a_jpeg_mask_in_another_colour_key_is_refused_not_read_as_unlabelled(tmp_path):
    from training.dataset import read_mask

    Image.fromarray(np.full((50, 50, 3), (120, 60, 200), np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(ValueError, match=r"not in the colour map.*100% of the mask"):
        read_mask(tmp_path / "m.jpg", load_colour_map(tmp_path))
