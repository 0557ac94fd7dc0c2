"""Train/validation splits by patient, never by tile or slide.

Tiles of one patient look alike (same tumour, same staining batch, often the same block), so a
patient on both sides of a split inflates validation metrics.  Every split here assigns whole
patients; the slides (and so the tiles) follow their patient.  Deterministic in the seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from training.dataset import SlideRecord


@dataclass(frozen=True)
class Split:
    """Slide ids on each side of one split."""

    name: str  # "fixed", "fold-2", "lopo-P7"
    train: tuple[str, ...]
    validation: tuple[str, ...]


def _patients(records: Sequence[SlideRecord]) -> dict[str, list[str]]:
    by_patient: dict[str, list[str]] = {}
    for r in records:
        by_patient.setdefault(r.patient_id, []).append(r.slide_id)
    return by_patient


def _shuffled_patients(records: Sequence[SlideRecord], seed: int) -> tuple[list[str], dict[str, list[str]]]:
    by_patient = _patients(records)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    return patients, by_patient


def _split(name: str, val_patients: set[str], by_patient: dict[str, list[str]]) -> Split:
    train = tuple(s for p in sorted(by_patient) if p not in val_patients for s in by_patient[p])
    val = tuple(s for p in sorted(by_patient) if p in val_patients for s in by_patient[p])
    return Split(name, train, val)


def fixed_split(records: Sequence[SlideRecord], validation_fraction: float, seed: int) -> Split:
    """One split holding out about ``validation_fraction`` of the patients (at least one each side)."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation fraction {validation_fraction} must be between 0 and 1")
    patients, by_patient = _shuffled_patients(records, seed)
    if len(patients) < 2:
        raise ValueError(f"a validation split needs at least 2 patients, the dataset has {len(patients)}")
    n_val = min(len(patients) - 1, max(1, round(len(patients) * validation_fraction)))
    return _split("fixed", set(patients[:n_val]), by_patient)


def k_fold(records: Sequence[SlideRecord], k: int, seed: int) -> Iterator[Split]:
    """``k`` splits; every patient is in exactly one validation fold."""
    patients, by_patient = _shuffled_patients(records, seed)
    if not 2 <= k <= len(patients):
        raise ValueError(f"k-fold needs 2 <= k <= number of patients ({len(patients)}), got k={k}")
    for i in range(k):
        yield _split(f"fold-{i}", set(patients[i::k]), by_patient)


def leave_one_patient_out(records: Sequence[SlideRecord]) -> Iterator[Split]:
    """One split per patient, holding out that patient alone."""
    by_patient = _patients(records)
    if len(by_patient) < 2:
        raise ValueError(f"leave-one-patient-out needs at least 2 patients, the dataset has {len(by_patient)}")
    for p in sorted(by_patient):
        yield _split(f"lopo-{p}", {p}, by_patient)


def make_splits(records: Sequence[SlideRecord], method: str, seed: int = 0, validation_fraction: float = 0.2, k: int = 5) -> list[Split]:
    """Splits by ``method``: "fixed", "kfold" or "lopo"."""
    if method == "fixed":
        return [fixed_split(records, validation_fraction, seed)]
    if method == "kfold":
        return list(k_fold(records, k, seed))
    if method == "lopo":
        return list(leave_one_patient_out(records))
    raise ValueError(f"split method {method!r} is not one of 'fixed', 'kfold', 'lopo'")
