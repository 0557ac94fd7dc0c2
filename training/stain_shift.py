"""A seeded change of stain, as a new lab or scanner would make: the site-shift experiment's test site.

A slide from another site differs from the training slides mainly in its dyes: the haematoxylin
and eosin it used absorb at slightly other wavelengths (their optical-density colour vectors
turn), and its staining time and scanner exposure make each dye stronger or weaker (their
concentrations scale).  :class:`StainShift` draws one such change, reproducibly from its seed,
and :func:`apply_stain_shift` applies it to RGB tiles under Beer–Lambert's law, the model
Macenko normalisation inverts (glio_node/pipeline/stain.py):

1. each stained pixel's optical density OD = -ln((I + 1) / 256) is split into the part in the
   plane of the source stain vectors S (3 x 2, haematoxylin and eosin: the Macenko reference
   :data:`~glio_node.pipeline.stain.REFERENCE_STAIN_MATRIX`) and the residual off that plane;
2. the in-plane part's two concentrations c = pinv(S) OD are scaled by the drawn intensities k
   and re-rendered with the drawn stain vectors S': OD' = S' diag(k) c + (OD - S c);
3. I' = 256 exp(-OD') - 1.

So OD' = M OD with one 3 x 3 matrix M per site (:attr:`DrawnShift.matrix`).  Glass (low
saturation, :func:`~glio_node.pipeline.stain.tissue_pixels`) is left as it is: scanners white-
balance on glass.  Pure NumPy, no I/O; nothing here is a real site's stain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glio_node.pipeline.stain import REFERENCE_STAIN_MATRIX, optical_density, tissue_pixels
from training.errors import ConfigError


@dataclass(frozen=True)
class StainShift:
    """How far the test site's stain may be from the source's (a config's ``[site_shift.stain]``).

    ``rotation_deg``: each stain vector turns by an angle drawn uniformly in [rotation_deg / 2,
    rotation_deg], in a random direction (kept in non-negative optical density); ``intensity``:
    each stain's concentration is multiplied by a factor drawn log-uniformly in [low, high], away
    from 1 by at least half the range on the log scale, so that a draw is never a near-identity.
    """

    seed: int = 0
    rotation_deg: float = 20.0
    intensity: tuple[float, float] = (0.6, 1.6)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rotation_deg <= 60.0:
            raise ConfigError(f"site_shift.stain.rotation_deg {self.rotation_deg} must be in [0, 60] degrees")
        low, high = (float(v) for v in self.intensity)
        if not 0.0 < low <= 1.0 <= high:
            raise ConfigError(f"site_shift.stain.intensity {list(self.intensity)} must be [low, high] with 0 < low <= 1 <= high")
        object.__setattr__(self, "intensity", (low, high))

    @classmethod
    def from_table(cls, table: dict) -> StainShift:
        unknown = set(table) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"[site_shift.stain] has unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(cls.__dataclass_fields__)}")
        table = dict(table)
        if "intensity" in table:
            table["intensity"] = tuple(table["intensity"])
        return cls(**table)


@dataclass(frozen=True)
class DrawnShift:
    """One drawn site: the source and target stain vectors, the intensities, and their OD map."""

    source: np.ndarray  # (3, 2) unit columns, haematoxylin and eosin
    target: np.ndarray  # (3, 2) unit columns
    intensities: np.ndarray  # (2,)
    rotations_deg: np.ndarray  # (2,) angle between each source and target vector
    matrix: np.ndarray  # (3, 3): OD' = matrix @ OD

    def record(self) -> dict:
        """What the run folder keeps of the draw (stain-shift.json)."""
        return {
            "source_stain_vectors": self.source.T.round(4).tolist(),
            "target_stain_vectors": self.target.T.round(4).tolist(),
            "stain_order": ["haematoxylin", "eosin"],
            "intensities": self.intensities.round(4).tolist(),
            "rotations_deg": self.rotations_deg.round(2).tolist(),
            "od_matrix": self.matrix.round(6).tolist(),
        }


def _turn(v: np.ndarray, angle_rad: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at ``angle_rad`` from ``v`` in a random direction, non-negative (re-drawn
    up to 100 times when the direction leaves the positive octant: a dye absorbs, never emits)."""
    for _ in range(100):
        u = rng.normal(size=3)
        u -= u @ v * v
        u /= np.linalg.norm(u)
        w = np.cos(angle_rad) * v + np.sin(angle_rad) * u
        if np.all(w >= 0):
            return w / np.linalg.norm(w)
    raise ConfigError(f"no non-negative stain vector {np.degrees(angle_rad):.1f} degrees from {v.round(3).tolist()}: lower site_shift.stain.rotation_deg")


def draw_shift(shift: StainShift) -> DrawnShift:
    """The site of ``shift.seed`` (pure: the same seed gives the same matrix)."""
    rng = np.random.default_rng([shift.seed, 14, 6])
    source = np.asarray(REFERENCE_STAIN_MATRIX, np.float64)
    source = source / np.linalg.norm(source, axis=0)
    angles = np.radians(rng.uniform(shift.rotation_deg / 2, shift.rotation_deg, size=2))
    target = np.stack([_turn(source[:, i], angles[i], rng) for i in range(2)], axis=1)
    lo, hi = np.log(shift.intensity[0]), np.log(shift.intensity[1])
    # away from 1 on the log scale: one side or the other, at least half-way to that side's bound
    sides = rng.random(2) < 0.5
    logs = np.where(sides, rng.uniform(lo, lo / 2, 2), rng.uniform(hi / 2, hi, 2)) if lo < 0 < hi else rng.uniform(lo, hi, 2)
    k = np.exp(logs)
    pinv = np.linalg.pinv(source)  # (2, 3)
    matrix = target @ np.diag(k) @ pinv + (np.eye(3) - source @ pinv)
    turned = np.degrees(np.arccos(np.clip(np.sum(source * target, axis=0), -1, 1)))
    return DrawnShift(source, target, k, turned, matrix)


def apply_stain_shift(tiles: np.ndarray, drawn: DrawnShift) -> np.ndarray:
    """RGB uint8 tiles (N, H, W, 3) or one tile (H, W, 3) -> the same tissue as the drawn site
    would have stained and scanned it; glass unchanged."""
    x = np.asarray(tiles, np.uint8)
    if x.size == 0:
        return x.copy()
    stained = tissue_pixels(x)
    od = optical_density(x[stained])  # (K, 3)
    moved = np.clip(od @ drawn.matrix.T, 0.0, None)  # a dye cannot make a pixel brighter than glass
    out = x.copy()
    out[stained] = np.clip(np.rint(256.0 * np.exp(-moved) - 1.0), 0, 255).astype(np.uint8)
    return out
