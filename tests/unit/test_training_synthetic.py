"""A synthetic dataset is a pure function of its parameters, varies like sites' scans when asked,
and a run config never trains on a folder written with other parameters."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict

import pytest

from glio_node.synthetic.textures import Signature
from training.run import RunConfig, ensure_dataset
from training.synthetic_dataset import PARAMETERS_FILE, SyntheticParameters, slide_spec

SIG = Signature(0, True, False)


def test_variety_covers_both_spacings_every_pyramid_and_both_codecs_at_one_physical_size():
    params = SyntheticParameters(patients=48, width_px=4096, height_px=3072, variety=True)
    specs = [slide_spec(params, p, 0, SIG) for p in range(48)]
    assert {s.um_per_px for s in specs} == {0.25, 0.5}
    assert {(s.width_px * s.um_per_px, s.height_px * s.um_per_px) for s in specs} == {(2048.0, 1536.0)}
    coarsest = Counter(max(g.um_per_px for g in s.level_geometries()) for s in specs)
    assert set(coarsest) == {0.5, 1.0, 2.0}  # 2 µm/px read at scale 4, 2 and 1
    assert {s.transfer_syntax for s in specs} == {"jpeg", "jpeg2000"}
    assert len({round(s.region_cell_um) for s in specs}) > 10
    assert specs == [slide_spec(params, p, 0, SIG) for p in range(48)]  # reproducible


def test_without_variety_every_slide_has_the_plain_geometry():
    params = SyntheticParameters(patients=3)
    specs = [slide_spec(params, p, 0, SIG) for p in range(3)]
    assert {(s.width_px, s.height_px, s.um_per_px, s.levels, s.transfer_syntax) for s in specs} == {(1024, 768, 0.5, 2, "jpeg")}
    assert len({s.seed for s in specs}) == 3


def test_unknown_synthetic_keys_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown key.*patiens"):
        SyntheticParameters.from_table({"patiens": 3})


def _config(tmp_path, patients: int):
    (tmp_path / "run.toml").write_text(
        f'name = "x"\nversion = "1"\ndataset = "data"\n[synthetic]\npatients = {patients}\n'
        '[segmentation]\num_per_px = 2.0\ntile_size = 32\n[classifier]\num_per_px = 2.0\ntile_size = 32\n'
    )
    return RunConfig.load(tmp_path / "run.toml")


def test_a_dataset_written_with_other_parameters_is_refused_not_trained_on(tmp_path):
    cfg = _config(tmp_path, patients=2)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / PARAMETERS_FILE).write_text(json.dumps({"patients": 3}))
    with pytest.raises(ValueError, match="other \\[synthetic\\] parameters.*delete the folder"):
        ensure_dataset(cfg)


def test_a_foreign_folder_is_never_overwritten(tmp_path):
    cfg = _config(tmp_path, patients=2)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("slide_id,patient_id\n")
    with pytest.raises(ValueError, match="no synthetic dataset of this config"):
        ensure_dataset(cfg)
    assert (tmp_path / "data" / "labels.csv").read_text() == "slide_id,patient_id\n"


def test_a_dataset_written_before_minority_fraction_existed_is_still_the_configs(tmp_path):
    cfg = _config(tmp_path, patients=2)
    (tmp_path / "data").mkdir()
    older = {k: v for k, v in asdict(cfg.synthetic).items() if k != "minority_fraction"}
    (tmp_path / "data" / PARAMETERS_FILE).write_text(json.dumps(older))
    ensure_dataset(cfg)  # accepted, nothing written
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [PARAMETERS_FILE]
    (tmp_path / "data" / PARAMETERS_FILE).write_text(json.dumps({**older, "minority_fraction": 0.15}))
    with pytest.raises(ValueError, match="other \\[synthetic\\] parameters"):
        ensure_dataset(cfg)
