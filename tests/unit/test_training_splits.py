"""Splits assign whole patients to train, validation or test: no patient's tiles may be on two
sides, every class is in every set, and a dataset too small for that says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.dataset import LABEL_VALUES, SlideRecord
from training.splits import make_splits

SUBTYPES = LABEL_VALUES["subtype"]


def _records(patients: int, slides_per_patient: int, subtypes: bool = False) -> list[SlideRecord]:
    """``subtypes``: patient p has subtype p mod 4, so each class has patients/4 of them."""
    return [
        SlideRecord(f"P{p}-S{s}", f"P{p}", Path(f"/nowhere/P{p}-S{s}"), None, {"subtype": SUBTYPES[p % 4]} if subtypes else {})
        for p in range(patients)
        for s in range(slides_per_patient)
    ]


def _patients_of(records, slide_ids) -> set[str]:
    patient_of = {r.slide_id: r.patient_id for r in records}
    return {patient_of[s] for s in slide_ids}


@pytest.mark.parametrize("method", ["fixed", "kfold", "lopo"])
@pytest.mark.parametrize("subtypes", [False, True])
def test_no_patient_appears_on_two_sides(method, subtypes):
    records = _records(patients=12, slides_per_patient=3, subtypes=subtypes)
    for split in make_splits(records, method, seed=3, validation_fraction=0.3, k=3, test_fraction=0.25):
        sets = [_patients_of(records, ids) for ids in (split.train, split.validation, split.test)]
        assert all(sets), split.name
        assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2], split.name
        assert sorted(split.train + split.validation + split.test) == sorted(r.slide_id for r in records)


def test_the_fixed_split_holds_out_the_fractions_with_every_class_in_every_set():
    records = _records(patients=40, slides_per_patient=2, subtypes=True)  # 10 patients per subtype
    (split,) = make_splits(records, "fixed", seed=0, validation_fraction=0.25, test_fraction=0.2)
    label = {r.slide_id: r.labels["subtype"] for r in records}
    for ids, per_class in ((split.test, 2), (split.validation, 2), (split.train, 6)):  # 10 -> 2 test, 8 -> 2 val, 6 train
        assert sorted(label[s] for s in ids) == sorted(SUBTYPES * per_class * 2)


def test_kfold_test_folds_are_stratified_and_every_patient_is_tested_once():
    records = _records(patients=12, slides_per_patient=2, subtypes=True)
    splits = make_splits(records, "kfold", k=3, stratify="subtype")
    assert len(splits) == 3
    label = {r.slide_id: r.labels["subtype"] for r in records}
    for split in splits:
        assert sorted(label[s] for s in split.test) == sorted(SUBTYPES * 2), "one patient (two slides) per subtype"
        assert {label[s] for s in split.validation} == set(SUBTYPES), "inner validation stratified too"
    assert sorted(s for split in splits for s in split.test) == sorted(r.slide_id for r in records)
    lopo = make_splits(records, "lopo", stratify="none")
    assert len(lopo) == 12 and sorted(s for split in lopo for s in split.test) == sorted(r.slide_id for r in records)


def test_splits_are_deterministic_in_the_seed():
    records = _records(patients=10, slides_per_patient=1)
    assert make_splits(records, "fixed", seed=1) == make_splits(records, "fixed", seed=1)
    assert make_splits(records, "fixed", seed=1) != make_splits(records, "fixed", seed=2)


def test_too_few_patients_of_a_class_for_three_sets_says_which_class():
    records = _records(patients=8, slides_per_patient=1, subtypes=True)  # 2 patients per subtype
    with pytest.raises(ValueError, match=r"at least 3 patients per class \(one in each set\); class 'classical' of subtype has 2: add patients, or set split.stratify = \"none\""):
        make_splits(records, "fixed")
    (split,) = make_splits(records, "fixed", stratify="none")
    assert split.train and split.validation and split.test
    with pytest.raises(ValueError, match=r"fold-0 \(its test patients held out\): a validation / train split needs at least 2 patients per class"):
        make_splits(_records(patients=4, slides_per_patient=1, subtypes=True), "kfold", k=2)


def test_impossible_splits_say_why():
    with pytest.raises(ValueError, match=r"at least 3 patients \(one in each set\); the dataset has 2: add patients"):
        make_splits(_records(2, 4), "fixed")
    with pytest.raises(ValueError, match=r"2 <= k <= number of patients \(3\), got k=5"):
        make_splits(_records(3, 1), "kfold", k=5)
    with pytest.raises(ValueError, match=r"leave-one-patient-out needs at least 3 patients"):
        make_splits(_records(2, 1), "lopo")
    with pytest.raises(ValueError, match="is not one of 'fixed', 'kfold', 'lopo'"):
        make_splits(_records(3, 1), "random-tiles")
    with pytest.raises(ValueError, match=r"split.test_fraction 1.0 must be between 0 and 1"):
        make_splits(_records(5, 1), "fixed", test_fraction=1.0)
    with pytest.raises(ValueError, match=r"split.stratify 'idh' is not one of"):
        make_splits(_records(5, 1), "fixed", stratify="idh")


def test_the_documented_example_run_config_parses():
    from training.run import RunConfig

    cfg = RunConfig.load(Path(__file__).resolve().parents[2] / "training" / "configs" / "example.toml")
    assert cfg.segmentation.tile_size == 320 and cfg.classifier.tile_size == 160 and cfg.seed == 0
