"""A run config selects the classifier backbone and the patient split; mistakes are named."""

from __future__ import annotations

import pytest

from training.errors import ConfigError
from training.run import RunConfig, demo_flag, provenance
from training.synthetic_dataset import PARAMETERS_FILE

BASE = """
name = "x"
version = "0.1"
dataset = "ds"
{top}
[segmentation]
um_per_px = 2.0
tile_size = 64
[classifier]
um_per_px = 0.5
tile_size = 64
{classifier}
"""


def _load(tmp_path, top="", classifier=""):
    (tmp_path / "run.toml").write_text(BASE.format(top=top, classifier=classifier))
    return RunConfig.load(tmp_path / "run.toml")


def test_the_defaults_are_the_small_classifier_and_a_fixed_split(tmp_path):
    cfg = _load(tmp_path)
    assert cfg.classifier.backbone == "small" and cfg.split_method == "fixed" and cfg.classifier.bn_momentum == 0.9


def test_vgg16_with_a_weights_file_relative_to_the_config_and_a_kfold_fold(tmp_path):
    cfg = _load(tmp_path, top='split = {method = "kfold", k = 4, fold = 2}', classifier='backbone = "vgg16"\nweights = "w/vgg16.weights.h5"\nfrozen_epochs = 2')
    assert cfg.classifier.backbone == "vgg16" and cfg.classifier.frozen_epochs == 2
    assert cfg.classifier.weights == str((tmp_path / "w" / "vgg16.weights.h5").resolve())
    assert (cfg.split_method, cfg.split_k, cfg.split_fold) == ("kfold", 4, 2)


def test_leave_one_patient_out_is_a_split_method(tmp_path):
    cfg = _load(tmp_path, top='split = {method = "lopo", fold = 3}')
    assert (cfg.split_method, cfg.split_fold) == ("lopo", 3)


@pytest.mark.parametrize(("top", "classifier", "words"), [
    ('split = {method = "random"}', "", "split.method"),
    ("", 'backbone = "resnet"', "classifier.backbone"),
    ("", "colour = 1", "docs/training.md"),
])
def test_a_wrong_key_or_value_is_named(tmp_path, top, classifier, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        _load(tmp_path, top, classifier)


# --- a bundle trained on synthetic slides is a demo -------------------------------------------


def test_a_config_that_writes_synthetic_slides_and_says_nothing_makes_a_demo_bundle(tmp_path):
    cfg = _load(tmp_path, top="seed = 3\n[synthetic]\npatients = 4")
    assert cfg.is_demo is True
    assert "DEMO" in cfg.intended_use and "Research use only" in cfg.intended_use


def test_a_dataset_written_by_training_synthetic_makes_a_demo_bundle_too(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / PARAMETERS_FILE).write_text("{}")  # what `python -m training synthetic` leaves
    cfg = _load(tmp_path)
    assert cfg.is_demo is True
    text = provenance(cfg, tmp_path / "run.toml", "commit abc", "Keras 3")
    assert "synthetic slides only" in text and f"ds/{PARAMETERS_FILE}" in text
    assert "dataset dataset" not in text


def test_a_real_dataset_is_no_demo_and_its_provenance_names_the_folder_once(tmp_path):
    (tmp_path / "run.toml").write_text(BASE.format(top="", classifier="").replace('"ds"', '"dataset"'))
    cfg = RunConfig.load(tmp_path / "run.toml")
    assert cfg.is_demo is False and cfg.intended_use == "Research use only. Not for diagnosis."
    text = provenance(cfg, tmp_path / "run.toml", "commit abc", "Keras 3")
    assert "on the slides in dataset/;" in text and "dataset dataset" not in text


@pytest.mark.parametrize(("top", "words"), [
    ("is_demo = false\n[synthetic]\npatients = 4", "always a demo; remove is_demo or set it to true"),
    ('intended_use = "Research use only."\n[synthetic]\npatients = 4', "must say DEMO"),
    ('is_demo = "no"', "is_demo must be true or false"),
])
def test_a_synthetic_run_cannot_make_a_bundle_that_hides_it(tmp_path, top, words):
    with pytest.raises(ConfigError, match=words):
        _load(tmp_path, top)


def test_is_demo_is_what_the_config_says_or_whether_the_data_is_synthetic():
    assert demo_flag(None, synthetic=True) is True
    assert demo_flag(None, synthetic=False) is False
    assert demo_flag(True, synthetic=False) is True  # a demo of real-data code paths, say
    with pytest.raises(ConfigError, match="always a demo"):
        demo_flag(False, synthetic=True)
