"""Tile extraction through the worker's own tiling, cached as one shard per slide and network shape.

Training and serving must cut tiles the same way, from a DICOM WSI (``DicomSlide``) or a plain
TIFF (``training.tiff_slide.TiffSlide``, which offers the same levels and frames): same level choice (``choose_level``), same grid
(``TileGrid``), same tissue detection (``find_tissue`` + ``cells_with_tissue``), same window
reading and resizing (``FramePlan`` + ``iter_tiles``).  So this module only plans with those
functions and adds the region labels of each tile, sampled from the dataset's mask.

Decoding slides is the slow part of training.  A shard (``.npz``) holds a slide's tiles and
labels for one (µm/px, tile size, tissue threshold); its name carries a hash of the slide's files
(names, sizes, modification times), the mask's bytes, those parameters and the slide's spacing
from labels.csv (``um_per_px``, when given), so a second run reads
the shard and decodes nothing, and any change to the inputs makes a new shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glio_node.pipeline.analyze import CLASSIFIER_MIN_TISSUE, find_tissue
from glio_node.pipeline.frames import FramePlan, LevelGeometry, TileRequest, iter_tiles
from glio_node.pipeline.tiling import TileGrid, level_window, raster_shape
from glio_node.pipeline.levels import choose_level
from glio_node.runtime.slide_reader import DicomSlide
from training.dataset import UNLABELLED, SlideRecord, load_colour_map, read_mask
from training.tiff_slide import TiffSlide

SHARD_FORMAT = 1  # bump when the shard layout or the extraction changes


@dataclass(frozen=True)
class TileSpec:
    """How a network sees a slide: tiles of ``tile_size`` px at ``um_per_px``.

    ``min_tissue`` is the fraction of a tile's area that must be tissue (the worker uses 0 for
    segmentation, 0.5 for classifiers); ``stride`` defaults to the tile size (no overlap).
    """

    um_per_px: float
    tile_size: int
    min_tissue: float = CLASSIFIER_MIN_TISSUE

    def __post_init__(self) -> None:
        if not self.um_per_px > 0 or self.tile_size < 16:
            raise ValueError(f"tile spec {self.tile_size} px at {self.um_per_px} µm/px: need >= 16 px and a positive spacing")
        if not 0 <= self.min_tissue <= 1:
            raise ValueError(f"min_tissue {self.min_tissue} must be within 0..1")


@dataclass(frozen=True)
class Shard:
    """A slide's tiles: images (N, T, T, 3) uint8, labels (N, T, T) uint8 (255 = unlabelled) or
    None when the slide has no mask, and each tile's grid (row, col)."""

    slide_id: str
    images: np.ndarray
    labels: np.ndarray | None
    cells: np.ndarray  # (N, 2) int
    frames_decoded: int  # 0 when read from the cache


def _inputs_hash(record: SlideRecord, spec: TileSpec) -> str:
    h = hashlib.sha256(f"{SHARD_FORMAT}|{spec.um_per_px}|{spec.tile_size}|{spec.min_tissue}".encode())
    if record.um_per_px is not None:  # only when given, so shards of slides without it stay valid
        h.update(f"|um_per_px={record.um_per_px!r}".encode())
    files = sorted(record.slide_path.rglob("*")) if record.slide_path.is_dir() else [record.slide_path]
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    if record.mask_path is not None:
        h.update(record.mask_path.read_bytes())
    return h.hexdigest()[:16]


def _tile_labels(mask: np.ndarray, grid: TileGrid, row: int, col: int, raster_um: float, slide_um: tuple[float, float]) -> np.ndarray:
    """Nearest-neighbour region labels of one tile, sampled from a mask covering the whole slide."""
    mh, mw = mask.shape
    oy, ox = grid.tile_origin(row, col)
    ys = (np.arange(oy, oy + grid.tile_size) + 0.5) * raster_um / slide_um[0] * mh
    xs = (np.arange(ox, ox + grid.tile_size) + 0.5) * raster_um / slide_um[1] * mw
    yi, xi = np.floor(ys).astype(np.intp), np.floor(xs).astype(np.intp)
    out = np.full((grid.tile_size, grid.tile_size), UNLABELLED, np.uint8)
    vy, vx = (yi >= 0) & (yi < mh), (xi >= 0) & (xi < mw)
    out[np.ix_(vy, vx)] = mask[np.ix_(yi[vy], xi[vx])]
    return out


def extract_slide(record: SlideRecord, spec: TileSpec, dataset_root: Path) -> Shard:
    """Decode ``record``'s slide (DICOM folder or TIFF file) and cut its tissue tiles as the worker would.

    A TIFF's spacing comes from ``record.um_per_px`` when given, else from the file
    (training.tiff_slide; UnknownSpacingError when neither has it).
    """
    mask = read_mask(record.mask_path, load_colour_map(dataset_root)) if record.mask_path else None
    opened = DicomSlide.open([record.slide_path]) if record.is_dicom else TiffSlide.open(record.slide_path, record.um_per_px)
    with opened as slide:
        return cut_tiles(slide, record.slide_id, spec, mask)


def cut_tiles(slide: DicomSlide | TiffSlide, slide_id: str, spec: TileSpec, mask: np.ndarray | None) -> Shard:
    """The tissue tiles of an opened slide, planned by the worker's own functions, with region
    labels sampled from ``mask`` (covering the whole slide) when given."""
    tissue, _ = find_tissue(slide)
    slide.decodes.clear()
    level, scale = choose_level(slide.levels, spec.um_per_px)
    grid = TileGrid(*raster_shape(level.rows, level.cols, scale), spec.tile_size, 0)
    raster_um = level.um_per_px * scale
    cells = grid.cells_with_tissue(tissue.mask, tissue.mm_per_px, raster_um / 1000.0, spec.min_tissue)
    requests = [
        TileRequest(0, int(r), int(c), level.index, level_window(grid, int(r), int(c), scale), spec.tile_size)
        for r, c in zip(*np.nonzero(cells))
    ]
    base = slide.levels[0]
    slide_um = (base.rows * base.um_per_px, base.cols * base.um_per_px)
    images, labels, where = [], [], []
    if requests:
        plan = FramePlan(requests, {level.index: LevelGeometry((level.rows, level.cols), (level.frame_rows, level.frame_cols))})
        for req, tile in iter_tiles(plan, slide.read_frame, threads=1):
            images.append(tile)
            where.append((req.row, req.col))
            if mask is not None:
                labels.append(_tile_labels(mask, grid, req.row, req.col, raster_um, slide_um))
    decoded = sum(slide.decodes.values())
    ts = spec.tile_size
    return Shard(
        slide_id=slide_id,
        images=np.stack(images) if images else np.zeros((0, ts, ts, 3), np.uint8),
        labels=(np.stack(labels) if labels else np.zeros((0, ts, ts), np.uint8)) if mask is not None else None,
        cells=np.array(where, dtype=np.int64).reshape(-1, 2),
        frames_decoded=decoded,
    )


def load_or_extract(record: SlideRecord, spec: TileSpec, dataset_root: Path, cache_dir: Path) -> Shard:
    """The slide's shard from ``cache_dir`` when its inputs are unchanged, else extract and store it."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{record.slide_id}-{spec.tile_size}px-{spec.um_per_px:g}um-{_inputs_hash(record, spec)}.npz"
    if path.is_file():
        with np.load(path) as z:
            labels = z["labels"] if bool(z["has_labels"]) else None
            return Shard(record.slide_id, z["images"], labels, z["cells"], frames_decoded=0)
    shard = extract_slide(record, spec, dataset_root)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        images=shard.images,
        labels=shard.labels if shard.labels is not None else np.zeros((0,), np.uint8),
        has_labels=np.array(shard.labels is not None),
        cells=shard.cells,
    )
    tmp.replace(path)  # a killed run leaves no half-written shard under the real name
    return shard
