"""A run config selects the classifier backbone and the patient split; mistakes are named."""

from __future__ import annotations

import pytest

from training.run import RunConfig

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
