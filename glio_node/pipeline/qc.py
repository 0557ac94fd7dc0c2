"""Slide quality control with classical detectors: is this slide fit to be analysed, and where not?

Nothing here is learned or downloaded; every threshold is a field of :class:`QcThresholds`
(``[qc]`` in the settings, docs/configuration.md says why each default is what it is).

Two kinds of evidence, both from pixels the pipeline reads anyway (decode amplification stays 1.00):

- the low-resolution tissue image (about 8 µm/px, the one ``find_tissue`` builds):
  pen marks (stained pixels whose hue is outside H&E's pink-to-purple range), folds and dark
  debris (optical density far above any single tissue layer's), air bubbles / glass within the
  tissue outline (round unstained holes: tears and lumens are not round), too little tissue;
- the analysis tiles as they stream to the networks: focus, as the variance of the Laplacian of
  the green channel over the stained pixels of each quarter tile (:func:`focus_parts`), on the
  finest network's tiles (where blur costs most; a coarse level hides it).

:func:`lowres_artefacts` and :func:`qc_report` are pure functions on arrays; ``pipeline.analyze``
calls them and masks the classifier tiles over artefacts out of the slide calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

from glio_node.coding import QC_ARTEFACT_EXTENT, QC_ARTEFACTS, QC_LOW_TISSUE
from glio_node.pipeline.tiling import TileGrid
from glio_node.pipeline.tissue import TissueMask
from glio_node.results import QcFinding, QcReport, Raster

# Values of the artefact map (0 = none): the index into coding.QC_ARTEFACTS plus one.
BLUR, PEN, DARK, BUBBLE = 1, 2, 3, 4


@dataclass(frozen=True)
class QcThresholds:
    """Where each detector draws the line; checked once, here (``[qc]`` in the settings)."""

    # Usable tissue (tissue minus artefacts) below this: "fail", too little to call a slide on.
    # A floor (about eight classifier tiles of 80 µm); a biopsy programme would set its own.
    min_tissue_mm2: float = 0.05
    # Artefact patches smaller than this are ignored (a speck of ink, a dust grain).
    min_artefact_mm2: float = 0.02
    # Artefacts covering at least this fraction of the tissue: "fail"; any smaller artefact: "warn".
    fail_artefact_fraction: float = 0.5
    # A classifier tile with at least this fraction over artefacts is left out of the slide calls.
    tile_max_artefact_fraction: float = 0.25
    # Pen: saturation at least this, hue outside [he_hue_from_deg, 360) + [0, he_hue_to_deg].
    pen_min_saturation: float = 0.3
    he_hue_from_deg: float = 230.0  # hematoxylin's blue-purple (H&E at 8 µm/px: 250-340°)
    he_hue_to_deg: float = 20.0  # eosin's red end
    # Fold / dark debris: mean optical density of R, G, B at least this.  Dense H&E at 8 µm/px
    # stays below 0.85 (the CMU-1 sample: 99.9th percentile 0.84); a fold of several layers,
    # debris and black ink are darker.  A pale single fold is not found (docs/configuration.md).
    dark_min_od: float = 0.9
    # Bubble / glass within tissue: unstained (saturation below, brightness above) and round.
    glass_max_saturation: float = 0.08
    glass_min_brightness: float = 0.8
    bubble_min_circularity: float = 0.6  # 4πA/P²: 1 for a disc; tears and lumens are far lower
    # Focus: variance of the Laplacian of the green channel (0-255) over a tile's stained pixels.
    # At 0.5 µm/px sharp H&E (CMU-1) measures 380-4000, the synthetic textures >= 100; a blur of
    # sigma 1.5 µm brings it under 23.
    focus_min_laplacian_var: float = 40.0
    focus_min_stained_fraction: float = 0.5  # tiles with less stain are not judged for focus

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{f.name} = {value!r}: must be a number, 0 or more")
        for key in (
            "fail_artefact_fraction",
            "tile_max_artefact_fraction",
            "pen_min_saturation",
            "glass_max_saturation",
            "glass_min_brightness",
            "bubble_min_circularity",
            "focus_min_stained_fraction",
        ):
            if getattr(self, key) > 1:
                raise ValueError(f"{key} = {getattr(self, key)}: must be between 0 and 1")
        for key in ("he_hue_from_deg", "he_hue_to_deg"):
            if getattr(self, key) >= 360:
                raise ValueError(f"{key} = {getattr(self, key)}: must be below 360 degrees")


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value of an RGB uint8 image, both in [0, 1] (float32)."""
    mx = rgb.max(axis=2).astype(np.float32)
    mn = rgb.min(axis=2).astype(np.float32)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    return sat, mx / 255.0


def hue_degrees(pixels: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of (n, 3) RGB pixels (0 for grey ones)."""
    x = pixels.astype(np.float32)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx, mn = x.max(axis=1), x.min(axis=1)
    d = np.where(mx > mn, mx - mn, 1.0)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return np.where(mx > mn, hue * 60.0, 0.0)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density of R, G and B (0 for white glass, about 2.4 for black)."""
    return -np.log10(np.clip(rgb.astype(np.float32), 1, 255) / 255.0).mean(axis=2)


def drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if not n:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = sizes >= min_px
    return keep[labels]


def pen_mask(rgb: np.ndarray, t: QcThresholds) -> np.ndarray:
    """Pixels of ink: saturated and of a hue H&E does not have (green, cyan, yellow, deep blue).

    Hue is computed only for the saturated pixels (most of a slide is glass or pale)."""
    sat, _ = saturation_value(rgb)
    candidates = sat >= t.pen_min_saturation
    hue = hue_degrees(rgb[candidates])
    out = np.zeros(sat.shape, bool)
    out[candidates] = (hue > t.he_hue_to_deg) & (hue < t.he_hue_from_deg)
    return out


def dark_mask(rgb: np.ndarray, t: QcThresholds) -> np.ndarray:
    """Pixels too dense for one layer of stained tissue: folds, debris, black ink."""
    return optical_density(rgb) >= t.dark_min_od


def bubble_mask(rgb: np.ndarray, tissue: np.ndarray, t: QcThresholds, min_px: float) -> np.ndarray:
    """Round unstained patches inside the tissue outline: air bubbles (or a round glass gap)."""
    sat, val = saturation_value(rgb)
    glass = tissue & (sat <= t.glass_max_saturation) & (val >= t.glass_min_brightness)
    glass = ndimage.binary_opening(glass, iterations=1)
    labels, n = ndimage.label(glass)
    if not n:
        return np.zeros_like(glass)
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(glass, labels, index=index)
    edge = glass & ~ndimage.binary_erosion(glass)
    perimeters = np.maximum(ndimage.sum_labels(edge, labels, index=index), 1)
    # P = the count of boundary pixels: 4πA/P² is near 1 for a disc (above, for a small one)
    # and far below 0.6 for a tear or a branching lumen, which are nearly all boundary.
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = (areas >= min_px) & (4 * np.pi * areas / perimeters**2 >= t.bubble_min_circularity)
    return keep[labels]


def lowres_artefacts(rgb: np.ndarray, tissue: TissueMask, t: QcThresholds) -> np.ndarray:
    """uint8 artefact map over the low-resolution image (0 none, PEN, DARK, BUBBLE).

    ``rgb`` is the image the tissue mask was found on (same shape); artefacts count only where
    the tissue mask is (pen on glass does not matter, pen on tissue does, and ink is often
    taken for tissue).  Patches smaller than ``min_artefact_mm2`` are dropped.
    """
    if rgb.shape[:2] != tissue.mask.shape:
        raise ValueError(f"image {rgb.shape[:2]} and tissue mask {tissue.mask.shape} differ in shape")
    min_px = t.min_artefact_mm2 / tissue.mm_per_px**2
    inside = tissue.mask
    out = np.zeros(inside.shape, np.uint8)
    # Later assignments win: a dark pen stroke is a pen mark, not debris.
    for value, mask in (
        (BUBBLE, bubble_mask(rgb, inside, t, min_px)),
        (DARK, ndimage.binary_closing(dark_mask(rgb, t), iterations=1)),
        (PEN, ndimage.binary_closing(pen_mask(rgb, t), iterations=2)),
    ):
        out[drop_small(mask & inside, min_px)] = value
    return out


def focus_measure(tile: np.ndarray, min_stained_fraction: float) -> float | None:
    """Variance of the Laplacian of the tile's green channel over its stained pixels.

    ``tile``: RGB uint8 as the network gets it.  None when less than ``min_stained_fraction`` of
    the tile is stained (glass has no focus to judge).  The green channel carries most of H&E's
    contrast (both stains absorb green) and costs a third of a grey image: about 0.1 ms for a
    160-px tile, against milliseconds for grey levels and saturation.  Stained = green below 220
    (glass is about 240; pale eosin about 200); the Laplacian is the 4-neighbour one on interior
    pixels.
    """
    g = tile[..., 1].astype(np.float32)
    centre = g[1:-1, 1:-1]
    stained = centre < 220.0
    if np.count_nonzero(stained) < min_stained_fraction * stained.size:
        return None
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * centre
    return float(lap[stained].var())


FOCUS_PARTS = 2  # focus is judged per quarter of a tile: a blur's edge is found to half a tile


def focus_parts(tile: np.ndarray, min_stained_fraction: float) -> np.ndarray:
    """:func:`focus_measure` of each of the tile's ``FOCUS_PARTS`` x ``FOCUS_PARTS`` parts
    (float32, NaN where not judged): a tile half in focus is then half out of focus, not sharp."""
    n = tile.shape[0] // FOCUS_PARTS
    out = np.full((FOCUS_PARTS, FOCUS_PARTS), np.nan, np.float32)
    for i in range(FOCUS_PARTS):
        for j in range(FOCUS_PARTS):
            value = focus_measure(tile[i * n : (i + 1) * n, j * n : (j + 1) * n], min_stained_fraction)
            if value is not None:
                out[i, j] = value
    return out


def out_of_focus_mask(
    focus: np.ndarray, grid: TileGrid, raster_mm_per_px: float, tissue: TissueMask, t: QcThresholds
) -> np.ndarray:
    """Bool mask at the tissue mask's spacing: tissue under each tile part whose focus is below
    ``focus_min_laplacian_var``.  ``focus``: (grid rows, grid cols, FOCUS_PARTS, FOCUS_PARTS),
    NaN = not judged (:func:`focus_parts` of each tile the network got)."""
    out = np.zeros(tissue.mask.shape, bool)
    f = raster_mm_per_px / tissue.mm_per_px
    part = grid.tile_size / FOCUS_PARTS
    for r, c, i, j in zip(*np.nonzero(np.nan_to_num(focus, nan=np.inf) < t.focus_min_laplacian_var)):
        oy, ox = grid.tile_origin(int(r), int(c))
        y0, x0 = oy + i * part, ox + j * part
        out[max(0, int(y0 * f)) : max(0, math.ceil((y0 + part) * f)),
            max(0, int(x0 * f)) : max(0, math.ceil((x0 + part) * f))] = True  # fmt: skip
    return out & tissue.mask


def with_blur(lowres: np.ndarray, blurred: np.ndarray | None, tissue: TissueMask, t: QcThresholds) -> np.ndarray:
    """The final artefact map: ``lowres_artefacts``' map plus ``blurred`` (where nothing else
    is), out-of-focus patches smaller than ``min_artefact_mm2`` (a stray tile) dropped."""
    out = lowres.copy()
    if blurred is not None:
        kept = drop_small(blurred, t.min_artefact_mm2 / tissue.mm_per_px**2)
        out[kept & (out == 0)] = BLUR
    return out


def qc_report(
    artefacts: np.ndarray, tissue: TissueMask, t: QcThresholds, tiles_assessed_for_focus: int
) -> QcReport:
    """The verdict from the final artefact map (``lowres_artefacts`` plus out-of-focus tiles).

    "fail": usable tissue below ``min_tissue_mm2``, or artefacts over at least
    ``fail_artefact_fraction`` of the tissue; "warn": any artefact; else "pass".
    """
    px_mm2 = tissue.mm_per_px**2
    inside = tissue.mask
    findings: list[QcFinding] = []
    art_px = 0
    for value, concept in enumerate(QC_ARTEFACTS, start=1):
        n = int(np.count_nonzero((artefacts == value) & inside))
        if n:
            art_px += n
            findings.append(QcFinding(concept, n * px_mm2, "warn"))
    tissue_px = int(np.count_nonzero(inside))
    usable = (tissue_px - art_px) * px_mm2
    verdict = "warn" if findings else "pass"
    if tissue_px and art_px / tissue_px >= t.fail_artefact_fraction:
        findings.append(QcFinding(QC_ARTEFACT_EXTENT, art_px * px_mm2, "fail"))
        verdict = "fail"
    if usable < t.min_tissue_mm2:
        findings.append(QcFinding(QC_LOW_TISSUE, usable, "fail"))
        verdict = "fail"
    return QcReport(
        verdict=verdict,
        findings=tuple(findings),
        artefact_classes=QC_ARTEFACTS,
        artefact_map=Raster(artefacts, tissue.mm_per_px),
        usable_tissue_mm2=usable,
        tiles_assessed_for_focus=tiles_assessed_for_focus,
    )
