"""Write a small dataset in the documented format (docs/training.md) from synthetic slides.

Tests and the demo bundle train on it.  Regions and molecular labels are drawn as distinct textures
by :mod:`glio_node.synthetic`, so the truth is known exactly; nothing here is real tissue.
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from glio_node.synthetic.slide import SlideSpec, write_synthetic_slide
from glio_node.synthetic.textures import SUBTYPES, Signature

MASK_UM_PER_PX = 8.0  # masks are written at this spacing: small files, still finer than a tile
PARAMETERS_FILE = "synthetic.json"  # what the dataset was written with; `train` refuses a mismatch


@dataclass(frozen=True)
class SyntheticParameters:
    """Everything that decides a synthetic dataset's content (a run config's ``[synthetic]`` table).

    ``variety`` makes the slides differ the way scans from different sites do, so that a network
    trained on them reads any pyramid the worker may meet: 20x or 40x base spacing (0.5 or 0.25
    µm/px, same physical size), pyramids with or without the networks' own spacing (so tiles are
    read from a finer level and box-averaged down by 2 or 4, as after a third-party converter),
    JPEG or lossless JPEG 2000 frames, and region blobs of 100 to 300 µm.
    """

    patients: int
    seed: int = 0
    slides_per_patient: int = 1
    width_px: int = 1024  # at 0.5 µm/px; a 0.25 µm/px slide has twice as many
    height_px: int = 768
    levels: int = 2  # without variety
    variety: bool = False
    # < 1: the MGMT and EGFR looks show only in blobs covering this fraction of each slide, the rest
    # of the tissue is neutral (the multiple-instance task of docs/training.md, "Attention-MIL")
    minority_fraction: float = 1.0

    @classmethod
    def from_table(cls, table: dict) -> SyntheticParameters:
        unknown = set(table) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"[synthetic] has unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(cls.__dataclass_fields__)}")
        return cls(**table)


def slide_spec(params: SyntheticParameters, patient: int, slide: int, signature: Signature) -> SlideSpec:
    """The spec of one slide, a pure function of the parameters and its index."""
    seed = params.seed * 1000 + patient * 10 + slide
    base = SlideSpec(width_px=params.width_px, height_px=params.height_px, levels=params.levels,
                     context_images=False, signature=signature, seed=seed,
                     signature_fraction=params.minority_fraction)
    if not params.variety:
        return base
    rng = np.random.default_rng([params.seed, 7, patient, slide])
    fine = rng.random() < 0.25  # one slide in four scanned at 40x
    um = 0.25 if fine else 0.5
    scale = 2 if fine else 1
    # levels at 0.5 µm/px: 1 -> only 0.5 (2 µm/px read 4x finer), 2 -> 0.5 and 1.0, 3 -> down to 2.0
    levels = int(rng.integers(1, 4)) + (1 if fine else 0)
    return replace(
        base,
        width_px=params.width_px * scale,
        height_px=params.height_px * scale,
        um_per_px=um,
        levels=levels,
        transfer_syntax="jpeg2000" if rng.random() < 0.2 else "jpeg",
        region_cell_um=float(rng.uniform(100.0, 300.0)),
    )


def _write_one(spec: SlideSpec, root: Path, slide_id: str) -> None:
    slide = write_synthetic_slide(spec, root / "slides" / slide_id)
    Image.fromarray(slide.truth_labels(MASK_UM_PER_PX).astype(np.uint8)).save(root / "masks" / f"{slide_id}.png")


def write_synthetic_dataset(
    root: Path,
    patients: int | None = None,
    slides_per_patient: int = 1,
    base: SlideSpec | None = None,
    seed: int = 0,
    params: SyntheticParameters | None = None,
    workers: int | None = None,
) -> Path:
    """Write ``patients`` x ``slides_per_patient`` slides with integer masks and labels.csv.

    Each task's labels are drawn independently at random (seeded by ``seed``), balanced: a shuffled
    ``0, 1, .., k-1, 0, 1, ..`` over the patients, so every class has ``patients // k`` or one more
    patients and no task's label can be predicted from another's (an earlier version derived
    them all from the patient index, so EGFR amplified meant an odd subtype index).  Every slide
    of a patient carries its patient's labels.  ``base`` (tests) replaces the slide geometry of
    ``params``; slides are written by ``workers`` processes (default: the machine's cores).
    """
    params = params or SyntheticParameters(patients=patients, seed=seed, slides_per_patient=slides_per_patient)
    root = Path(root)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([params.seed, 5])
    n = params.patients
    subtypes, mgmt, egfr = (rng.permutation(np.arange(n) % k) for k in (len(SUBTYPES), 2, 2))
    rows, jobs = [], []
    for p in range(n):
        sig = Signature(subtype=int(subtypes[p]), mgmt_methylated=bool(mgmt[p] == 0), egfr_amplified=bool(egfr[p] == 0))
        for s in range(params.slides_per_patient):
            slide_id = f"P{p:03d}-S{s}"
            spec = slide_spec(params, p, s, sig)
            if base is not None:
                spec = replace(base, signature=sig, seed=spec.seed)
            jobs.append((spec, slide_id))
            rows.append({
                "slide_id": slide_id,
                "patient_id": f"P{p:03d}",
                "subtype": SUBTYPES[sig.subtype],
                "mgmt": "methylated" if sig.mgmt_methylated else "unmethylated",
                "egfr": "amplified" if sig.egfr_amplified else "not_amplified",
            })
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers <= 1:
        for spec, slide_id in jobs:
            _write_one(spec, root, slide_id)
    else:  # spawned, never forked: safe after TensorFlow is imported
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_write_one, [j[0] for j in jobs], [root] * len(jobs), [j[1] for j in jobs]))
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "patient_id", "subtype", "mgmt", "egfr"])
        writer.writeheader()
        writer.writerows(rows)
    (root / PARAMETERS_FILE).write_text(json.dumps(asdict(params), indent=2) + "\n")
    return root
