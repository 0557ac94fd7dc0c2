"""Write a small dataset in the documented format (docs/training.md) from synthetic slides.

Tests and the demo bundle train on it.  Regions and molecular labels are drawn as distinct textures
by :mod:`glio_node.synthetic`, so the truth is known exactly; nothing here is real tissue.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from glio_node.synthetic.slide import SlideSpec, write_synthetic_slide
from glio_node.synthetic.textures import SUBTYPES, Signature

MASK_UM_PER_PX = 8.0  # masks are written at this spacing: small files, still finer than a tile


def write_synthetic_dataset(
    root: Path, patients: int, slides_per_patient: int = 1, base: SlideSpec | None = None, seed: int = 0
) -> Path:
    """Write ``patients`` x ``slides_per_patient`` slides with integer masks and labels.csv.

    Each task's labels are drawn independently at random (seeded by ``seed``), balanced: a shuffled
    ``0, 1, .., k-1, 0, 1, ..`` over the patients, so every class has ``patients // k`` or one more
    patients and no task's label can be predicted from another's (an earlier version derived
    them all from the patient index, so EGFR amplified meant an odd subtype index).  Every slide
    of a patient carries its patient's labels.
    """
    base = base or SlideSpec(width_px=1024, height_px=768, levels=2, context_images=False)
    root = Path(root)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 5])
    subtypes, mgmt, egfr = (rng.permutation(np.arange(patients) % k) for k in (len(SUBTYPES), 2, 2))
    rows = []
    for p in range(patients):
        sig = Signature(subtype=int(subtypes[p]), mgmt_methylated=bool(mgmt[p] == 0), egfr_amplified=bool(egfr[p] == 0))
        for s in range(slides_per_patient):
            slide_id = f"P{p:03d}-S{s}"
            spec = replace(base, signature=sig, seed=seed * 1000 + p * 10 + s)
            slide = write_synthetic_slide(spec, root / "slides" / slide_id)
            Image.fromarray(slide.truth_labels(MASK_UM_PER_PX).astype(np.uint8)).save(root / "masks" / f"{slide_id}.png")
            rows.append({
                "slide_id": slide_id,
                "patient_id": f"P{p:03d}",
                "subtype": SUBTYPES[sig.subtype],
                "mgmt": "methylated" if sig.mgmt_methylated else "unmethylated",
                "egfr": "amplified" if sig.egfr_amplified else "not_amplified",
            })
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "patient_id", "subtype", "mgmt", "egfr"])
        writer.writeheader()
        writer.writerows(rows)
    return root
