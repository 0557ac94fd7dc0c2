"""Procedural H&E-like textures for synthetic slides: the demo model's whole world.

The demo bundle is trained on these textures and the tests analyse slides painted with them, so
the same function serves both.  Textures are defined in physical units (micrometres): a patch
rendered at 0.5 µm/px looks the same whether it is drawn directly at that spacing or drawn at
0.25 µm/px and downsampled two-fold, which is what a pyramid level is.

Nothing here resembles real tissue closely; it only gives each Ivy GAP region class and each
molecular label a look that a small network can learn.  That is the point: the demo bundle proves
the plumbing, not any clinical skill.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Region classes in the order of the demo bundle's segmentation head (label value = index).
REGION_CLASSES: tuple[str, ...] = (
    "other",
    "leading_edge",
    "infiltrating_tumor",
    "cellular_tumor",
    "necrosis",
    "pseudopalisading_cells_around_necrosis",
    "pseudopalisading_cells_no_visible_necrosis",
    "perinecrotic_zone",
    "microvascular_proliferation",
    "hyperplastic_blood_vessels",
)
SUBTYPES: tuple[str, ...] = ("classical", "mesenchymal", "neural", "proneural")
GLASS_RGB = (242, 242, 245)


@dataclass(frozen=True)
class _Look:
    base: tuple[int, int, int]  # stroma colour (RGB)
    dot_spacing_um: float  # nuclei lattice spacing; 0 = no nuclei
    dot_radius_um: float
    stripe_period_um: float  # 0 = no stripes
    stripe_angle_deg: float
    stripe_rgb: tuple[int, int, int] = (150, 80, 150)


_LOOKS: dict[str, _Look] = {
    "other": _Look((236, 206, 224), 0, 0, 0, 0),
    "leading_edge": _Look((228, 178, 208), 28, 2.5, 0, 0),
    "infiltrating_tumor": _Look((218, 160, 200), 16, 3.0, 0, 0),
    "cellular_tumor": _Look((196, 132, 188), 9, 3.0, 0, 0),
    "necrosis": _Look((244, 196, 214), 0, 0, 24, 30, (226, 170, 196)),
    "pseudopalisading_cells_around_necrosis": _Look((226, 176, 206), 7, 2.5, 28, 0, (236, 200, 216)),
    "pseudopalisading_cells_no_visible_necrosis": _Look((210, 150, 196), 0, 0, 14, 60, (130, 70, 140)),
    "perinecrotic_zone": _Look((232, 186, 208), 20, 2.0, 40, 120, (214, 150, 186)),
    "microvascular_proliferation": _Look((214, 128, 150), 12, 4.5, 0, 0),
    "hyperplastic_blood_vessels": _Look((190, 70, 96), 0, 0, 18, 150, (160, 40, 70)),
}
_NUCLEUS_RGB = np.array((92, 52, 132), dtype=np.float32)


@dataclass(frozen=True)
class Signature:
    """The slide-level molecular labels a synthetic slide carries, and how they show.

    - subtype: a faint grating whose orientation is 0°, 45°, 90° or 135° (classical ... proneural);
    - MGMT methylated: the whole tissue is shifted towards blue;
    - EGFR amplified: fine dark speckles.
    """

    subtype: int  # index into SUBTYPES
    mgmt_methylated: bool
    egfr_amplified: bool

    def __post_init__(self) -> None:
        if not 0 <= self.subtype < len(SUBTYPES):
            raise ValueError(f"subtype index {self.subtype} outside 0..{len(SUBTYPES) - 1}")


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """A cheap deterministic hash of integer lattice coordinates to [0, 1)."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663) ^ (salt * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return (h & 0xFFFF).astype(np.float32) / 65536.0


def _coords(x0_um: float, y0_um: float, width: int, height: int, um_per_px: float):
    xs = x0_um + (np.arange(width, dtype=np.float32) + 0.5) * um_per_px
    ys = y0_um + (np.arange(height, dtype=np.float32) + 0.5) * um_per_px
    return np.meshgrid(xs, ys)


def _dots(x: np.ndarray, y: np.ndarray, spacing: float, radius: float, salt: int) -> np.ndarray:
    """Soft-edged nuclei on a jittered lattice; returns coverage in [0, 1]."""
    ix = np.floor(x / spacing)
    iy = np.floor(y / spacing)
    jx = (_hash01(ix, iy, salt) * 0.6 + 0.2) * spacing
    jy = (_hash01(ix, iy, salt + 1) * 0.6 + 0.2) * spacing
    d = np.hypot(x - (ix * spacing + jx), y - (iy * spacing + jy))
    return np.clip((radius - d) / 0.8 + 0.5, 0.0, 1.0)


def _grating(x: np.ndarray, y: np.ndarray, period: float, angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period)


def render(
    labels: np.ndarray,
    x0_um: float,
    y0_um: float,
    um_per_px: float,
    signature: Signature,
    tissue: np.ndarray | None = None,
    seed: int = 0,
    signature_fraction: float = 1.0,
    signature_blob_um: float = 48.0,
) -> np.ndarray:
    """Paint an RGB uint8 patch.

    ``labels`` (rows, cols) holds a region class index per output pixel; ``tissue`` (same shape,
    bool) marks tissue, everything else is glass.  ``x0_um, y0_um`` is the patch's top-left
    corner on the slide, so adjacent patches join without seams.

    ``signature_fraction`` < 1 paints the MGMT and EGFR looks only inside square blobs of
    ``signature_blob_um`` that cover about that fraction of the slide (chosen by ``seed``, other
    blobs for each marker); the
    rest of the tissue looks unmethylated and not amplified.  That is the multiple-instance task
    (a slide label carried by a minority of its tiles) attention-MIL is for; the subtype grating
    stays everywhere.
    """
    height, width = labels.shape
    x, y = _coords(x0_um, y0_um, width, height, um_per_px)
    img = np.empty((height, width, 3), dtype=np.float32)
    for index in np.unique(labels):
        look = _LOOKS[REGION_CLASSES[int(index)]]
        sel = labels == index
        xs, ys = x[sel], y[sel]
        colour = np.broadcast_to(np.array(look.base, np.float32), (xs.size, 3)).copy()
        if look.stripe_period_um:
            s = _grating(xs, ys, look.stripe_period_um, look.stripe_angle_deg)[:, None]
            colour = colour * (1 - 0.6 * s) + np.array(look.stripe_rgb, np.float32) * 0.6 * s
        if look.dot_spacing_um:
            d = _dots(xs, ys, look.dot_spacing_um, look.dot_radius_um, seed + int(index))[:, None]
            colour = colour * (1 - d) + _NUCLEUS_RGB * d
        img[sel] = colour
    # Molecular signature, over all tissue.
    g = _grating(x, y, 6.0, 45.0 * signature.subtype)
    img += ((g - 0.5) * 36.0)[..., None]
    if signature.mgmt_methylated:  # each marker has blobs of its own (another seed)
        img[signature_mask(x, y, signature_fraction, signature_blob_um, seed)] += np.array((-22.0, -10.0, 18.0), np.float32)
    if signature.egfr_amplified:
        # in minority blobs the speckles are denser (25 % of the area, not 10 %): few tiles carry
        # the label, but those that do show it plainly
        speck = _hash01(np.floor(x / 1.5), np.floor(y / 1.5), seed + 97) < (0.10 if signature_fraction >= 1.0 else 0.25)
        speck &= signature_mask(x, y, signature_fraction, signature_blob_um, seed + 1)
        img[speck] = img[speck] * 0.45 + np.array((90.0, 60.0, 30.0), np.float32) * 0.55
    # Mild pixel noise so nothing is perfectly flat.
    noise = _hash01(np.floor(x / um_per_px), np.floor(y / um_per_px), seed + 7) - 0.5
    img += (noise * 8.0)[..., None]
    if tissue is not None:
        img[~tissue] = np.array(GLASS_RGB, np.float32) + (noise[~tissue] * 4.0)[:, None]
    return np.clip(img, 0, 255).astype(np.uint8)


def signature_mask(x_um: np.ndarray, y_um: np.ndarray, fraction: float, blob_um: float, seed: int) -> np.ndarray:
    """bool array: where the slide's molecular signature shows (everywhere when ``fraction`` >= 1).

    Square blobs of ``blob_um`` on a lattice in slide micrometres, each one carrying with
    probability ``fraction`` (a hash of its lattice cell and ``seed``), so patches join without
    seams and a pyramid level shows the same blobs.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"signature fraction {fraction} must be in (0, 1]")
    if fraction >= 1.0:
        return np.ones(np.shape(x_um), bool)
    return _hash01(np.floor(x_um / blob_um), np.floor(y_um / blob_um), seed + 131) < fraction


def blob_labels(
    rows: int, cols: int, n_classes: int, rng: np.random.Generator, cell: int = 8
) -> np.ndarray:
    """A label map of smooth random blobs (Voronoi cells of random seeds, nearest-seed labelling).

    ``cell`` is the approximate blob size in pixels.  Used to lay out regions on a synthetic slide
    and in training patches.
    """
    n_seeds = max(2, int(rows * cols / (cell * cell)))
    sy = rng.uniform(0, rows, n_seeds)
    sx = rng.uniform(0, cols, n_seeds)
    lab = rng.integers(0, n_classes, n_seeds)
    from scipy.spatial import cKDTree

    yy, xx = np.mgrid[0:rows, 0:cols]
    _, nearest = cKDTree(np.c_[sy, sx]).query(np.c_[yy.ravel() + 0.5, xx.ravel() + 0.5])
    return lab[nearest].reshape(rows, cols).astype(np.uint8)
