"""Train / validation / test splits by patient, never by tile or slide.

Tiles of one patient look alike (same tumour, same staining batch, often the same block), so a
patient on two sides of a split inflates the held-out metrics.  Every split here assigns whole
patients; the slides (and so the tiles) follow their patient.  Deterministic in the seed.

Three sets, because choosing is fitting: early stopping, the checkpoint and the learning-rate
schedule look at the validation patients, so their figures are optimistic; the test patients are
seen by nothing until the trained networks are scored once, at the end.  Cross-validation's outer
fold is the test set and each fold draws its own inner validation set from the rest.

Splits are stratified by one task's label (``stratify``, default subtype): each class's patients
are shared out on their own, so every class is in every set, or the split fails and says which
class has too few patients.  Patients without that label are shared out in proportion.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from training.dataset import LABEL_VALUES, SlideRecord

STRATIFY_CHOICES = (*LABEL_VALUES, "none")


@dataclass(frozen=True)
class Split:
    """Slide ids on each side of one split; no patient's slides are on two sides."""

    name: str  # "fixed", "fold-2", "lopo-P7"
    train: tuple[str, ...]
    validation: tuple[str, ...]  # early stopping, checkpoint, learning-rate schedule
    test: tuple[str, ...]  # scored once, at the end


def _patients(records: Sequence[SlideRecord]) -> dict[str, list[str]]:
    by_patient: dict[str, list[str]] = {}
    for r in records:
        by_patient.setdefault(r.patient_id, []).append(r.slide_id)
    return by_patient


def _strata(records: Sequence[SlideRecord], stratify: str) -> dict[str, str | None]:
    """Each patient's class of the ``stratify`` task (the most frequent over its slides, ties
    alphabetically), None when unknown or when not stratifying."""
    if stratify not in STRATIFY_CHOICES:
        raise ValueError(f"split.stratify {stratify!r} is not one of {', '.join(map(repr, STRATIFY_CHOICES))}")
    votes: dict[str, Counter] = {}
    for r in records:
        c = votes.setdefault(r.patient_id, Counter())
        value = None if stratify == "none" else r.labels.get(stratify)
        if value is not None:
            c[value] += 1
    return {p: (min(c, key=lambda v: (-c[v], v)) if c else None) for p, c in votes.items()}


def _share_out(patients: Sequence[str], strata: dict[str, str | None], fractions: Sequence[float], set_names: Sequence[str], stratify: str, seed: int) -> list[set[str]]:
    """Share ``patients`` into ``len(fractions) + 1`` sets: set i takes ``fractions[i]`` of the
    patients the sets before it left (at least one of each class), the last set takes the rest.

    Within each class, patients are shuffled with ``seed``.  Raises ValueError naming the class
    (or the dataset) with too few patients for one in each set."""
    need = len(fractions) + 1
    by_class: dict[str | None, list[str]] = {}
    for p in sorted(patients):
        by_class.setdefault(strata[p], []).append(p)
    all_unknown = set(by_class) == {None}
    sets: list[set[str]] = [set() for _ in range(need)]
    for label in sorted(by_class, key=lambda v: (v is None, v or "")):
        members = by_class[label]
        random.Random(f"{seed}/{label}").shuffle(members)
        at_least_one = label is not None or all_unknown
        if at_least_one and len(members) < need:
            where = "the dataset has" if all_unknown else f"class {label!r} of {stratify} has"
            raise ValueError(
                f"a {' / '.join(set_names)} split needs at least {need} patients{'' if all_unknown else ' per class'} "
                f"(one in each set); {where} {len(members)}: add patients"
                + ("" if all_unknown else ', or set split.stratify = "none"')
            )
        left = len(members)
        start = 0
        for i, fraction in enumerate(fractions):
            n = round(left * fraction)
            if at_least_one:
                n = min(max(1, n), left - (need - 1 - i))  # leave one for each later set
            sets[i].update(members[start : start + n])
            start, left = start + n, left - n
        sets[-1].update(members[start:])
    for name, members in zip(set_names, sets):
        if not members:
            raise ValueError(f"the {name} set of a {' / '.join(set_names)} split is empty: the dataset has too few labelled patients; add patients or change the fractions")
    return sets


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} {value} must be between 0 and 1")


def _split(name: str, by_patient: dict[str, list[str]], train: set[str], validation: set[str], test: set[str]) -> Split:
    def slides(ps: set[str]) -> tuple[str, ...]:
        return tuple(s for p in sorted(by_patient) if p in ps for s in by_patient[p])

    return Split(name, slides(train), slides(validation), slides(test))


def fixed_split(records: Sequence[SlideRecord], validation_fraction: float, seed: int, test_fraction: float = 0.2, stratify: str = "subtype") -> Split:
    """One three-way split: ``test_fraction`` of the patients test, ``validation_fraction`` of the
    rest validate, the others train; every class of ``stratify`` in every set."""
    _check_fraction("split.test_fraction", test_fraction)
    _check_fraction("validation_fraction", validation_fraction)
    by_patient = _patients(records)
    strata = _strata(records, stratify)
    test, validation, train = _share_out(list(by_patient), strata, (test_fraction, validation_fraction), ("test", "validation", "train"), stratify, seed)
    return _split("fixed", by_patient, train, validation, test)


def _inner(name: str, records: Sequence[SlideRecord], by_patient: dict[str, list[str]], test: set[str], validation_fraction: float, seed: int, stratify: str) -> Split:
    """An outer fold's split: ``test`` as given, the rest shared into validation and train."""
    _check_fraction("validation_fraction", validation_fraction)
    strata = _strata(records, stratify)
    rest = [p for p in by_patient if p not in test]
    try:
        validation, train = _share_out(rest, strata, (validation_fraction,), ("validation", "train"), stratify, seed)
    except ValueError as exc:
        raise ValueError(f"{name} (its test patients held out): {exc}") from None
    return _split(name, by_patient, train, validation, test)


def k_fold(records: Sequence[SlideRecord], k: int, seed: int, validation_fraction: float = 0.25, stratify: str = "subtype") -> Iterator[Split]:
    """``k`` splits; every patient is in exactly one test fold (folds stratified by class), and
    each fold's inner validation set is drawn from the other folds' patients."""
    by_patient = _patients(records)
    if not 2 <= k <= len(by_patient):
        raise ValueError(f"k-fold needs 2 <= k <= number of patients ({len(by_patient)}), got k={k}")
    strata = _strata(records, stratify)
    ordered: list[str] = []
    for label in sorted(set(strata.values()), key=lambda v: (v is None, v or "")):
        members = sorted(p for p in by_patient if strata[p] == label)
        random.Random(f"{seed}/{label}").shuffle(members)
        ordered += members
    for i in range(k):
        yield _inner(f"fold-{i}", records, by_patient, set(ordered[i::k]), validation_fraction, seed, stratify)


def leave_one_patient_out(records: Sequence[SlideRecord], seed: int = 0, validation_fraction: float = 0.25, stratify: str = "subtype") -> Iterator[Split]:
    """One split per patient, testing that patient alone; validation drawn from the others."""
    by_patient = _patients(records)
    if len(by_patient) < 3:
        raise ValueError(f"leave-one-patient-out needs at least 3 patients (test, validation, train), the dataset has {len(by_patient)}")
    for p in sorted(by_patient):
        yield _inner(f"lopo-{p}", records, by_patient, {p}, validation_fraction, seed, stratify)


def make_splits(
    records: Sequence[SlideRecord], method: str, seed: int = 0, validation_fraction: float = 0.25, k: int = 5,
    test_fraction: float = 0.2, stratify: str = "subtype",
) -> list[Split]:
    """Splits by ``method``: "fixed" (one three-way split), "kfold" or "lopo" (test = the outer
    fold).  Raises ValueError with what to change when the dataset cannot give the split."""
    if method == "fixed":
        return [fixed_split(records, validation_fraction, seed, test_fraction, stratify)]
    if method == "kfold":
        return list(k_fold(records, k, seed, validation_fraction, stratify))
    if method == "lopo":
        return list(leave_one_patient_out(records, seed, validation_fraction, stratify))
    raise ValueError(f"split method {method!r} is not one of 'fixed', 'kfold', 'lopo'")
