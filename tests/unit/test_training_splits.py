"""Splits assign whole patients: no patient's tiles may be on both sides."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.dataset import SlideRecord
from training.splits import make_splits


def _records(patients: int, slides_per_patient: int) -> list[SlideRecord]:
    return [
        SlideRecord(f"P{p}-S{s}", f"P{p}", Path(f"/nowhere/P{p}-S{s}"), None, {})
        for p in range(patients)
        for s in range(slides_per_patient)
    ]


@pytest.mark.parametrize("method", ["fixed", "kfold", "lopo"])
def test_no_patient_appears_on_both_sides(method):
    records = _records(patients=7, slides_per_patient=3)
    patient_of = {r.slide_id: r.patient_id for r in records}
    splits = make_splits(records, method, seed=3, validation_fraction=0.3, k=3)
    for split in splits:
        train = {patient_of[s] for s in split.train}
        val = {patient_of[s] for s in split.validation}
        assert train and val and not train & val, split.name
        assert sorted(split.train + split.validation) == sorted(patient_of)


def test_every_patient_is_validated_exactly_once_in_cross_validation():
    records = _records(patients=7, slides_per_patient=2)
    for method, expected_splits in (("kfold", 3), ("lopo", 7)):
        splits = make_splits(records, method, k=3)
        assert len(splits) == expected_splits
        validated = [s for split in splits for s in split.validation]
        assert sorted(validated) == sorted(r.slide_id for r in records)


def test_splits_are_deterministic_in_the_seed():
    records = _records(patients=10, slides_per_patient=1)
    assert make_splits(records, "fixed", seed=1) == make_splits(records, "fixed", seed=1)
    assert make_splits(records, "fixed", seed=1) != make_splits(records, "fixed", seed=2)


def test_impossible_splits_say_why():
    with pytest.raises(ValueError, match=r"at least 2 patients, the dataset has 1"):
        make_splits(_records(1, 4), "fixed")
    with pytest.raises(ValueError, match=r"2 <= k <= number of patients \(3\), got k=5"):
        make_splits(_records(3, 1), "kfold", k=5)
    with pytest.raises(ValueError, match="is not one of 'fixed', 'kfold', 'lopo'"):
        make_splits(_records(3, 1), "random-tiles")


def test_the_documented_example_run_config_parses():
    from training.run import RunConfig

    cfg = RunConfig.load(Path(__file__).resolve().parents[2] / "training" / "configs" / "example.toml")
    assert cfg.segmentation.tile_size == 320 and cfg.classifier.tile_size == 160 and cfg.seed == 0
