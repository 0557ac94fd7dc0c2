"""Analyse one opened slide with a bundle's networks: the core that ``analyze`` and the worker share.

Top to bottom:
1. tissue mask on a low-resolution level, and slide QC on the same image (pen, folds, bubbles);
2. per network: the level to read (nearest its µm/px, or a finer one downsampled), its tile grid
   on the analysis raster, and the grid cells that hold tissue (classifiers: and no artefact);
3. one frame plan over all networks' tiles, read frame-aligned in background threads;
4. batches to each network's runner as tiles arrive; outputs stitched as they come back; the
   finest network's tiles measured for focus on the way (no second read);
5. label map (when the bundle has a segmentation network) masked to tissue; out-of-focus tiles added to the artefacts; classifier tiles over
   artefacts left out of the slide-level calls; QC verdict (a "fail" makes every call
   indeterminate); area fractions.
6. two-stage tasks: each aggregator head reads the bag of its encoder's embeddings (filled in
   step 4, float16, preallocated from the tissue cell count of step 2; pipeline/bag.py) and gives
   a slide call (the mean of its folds) and an attention map on the encoder's grid.

Nothing here holds the whole slide: the slide-sized arrays are the label map (1 byte per analysed
pixel), band by band, the tissue mask at that resolution, and each encoder's bag (N x D x 2 bytes).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from glio_node.coding import QC_VERDICTS
from glio_node.errors import BadInput
from glio_node.pipeline.frames import FramePlan, LevelGeometry, TileRequest, iter_tiles
from glio_node.pipeline.levels import LevelInfo, choose_level
from glio_node.pipeline.qc import (
    QcThresholds,
    FOCUS_PARTS,
    focus_parts,
    lowres_artefacts,
    out_of_focus_mask,
    qc_report,
    with_blur,
)
from glio_node.pipeline.stitch import HeatmapStitcher, SegmentationStitcher, region_fractions, slide_call
from glio_node.pipeline.tiling import TileGrid, level_window, raster_shape
from glio_node.pipeline.tissue import TISSUE_UM_PER_PX, TissueMask, detect_tissue, resample_mask
from glio_node.ood import FEATURES_KEY, OodGate, slide_score, tile_scores
from glio_node.pipeline.bag import EmbeddingBag, ensemble_call
from glio_node.ports import EMBEDDINGS, BagRunner, ModelRunner, SlideReader, TileEncoder
from glio_node.results import (
    NOT_TISSUE, Algorithm, AnalysisResult, AttentionMap, Heatmap, OodResult, QcReport, Raster, SlideCall,
)

# A classifier tile is analysed only when at least this fraction of it is tissue: a tile that is
# mostly glass says little about the tumour's molecular state.
CLASSIFIER_MIN_TISSUE = 0.5


@dataclass(frozen=True)
class AnalysisOptions:
    batch_size: int = 8  # tiles per model call
    decode_threads: int = 2  # frame decoders running ahead of the model
    lookahead: int = 48  # tile requests whose frames are decoded ahead
    qc: QcThresholds | None = QcThresholds()  # slide QC thresholds ([qc]); None: no QC


@dataclass(frozen=True)
class NetworkStats:
    name: str
    level: int
    level_um_per_px: float
    scale: float  # > 1: the level was read and downsampled by this factor
    raster_um_per_px: float
    tiles_total: int  # grid cells
    tiles_with_tissue: int
    tiles_inferred: int
    model_seconds: float


@dataclass(frozen=True)
class AnalysisStats:
    networks: tuple[NetworkStats, ...]
    tissue_level: int
    tissue_fraction: float  # of the slide's area
    frames_decoded: int  # frames read from the slide during inference (counted by the pipeline)
    frames_needed: int  # distinct frames the inferred tiles overlap
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def decode_amplification(self) -> float:
        return self.frames_decoded / self.frames_needed if self.frames_needed else 1.0


@dataclass
class _Use:
    """A network as used on this slide (mutable while tiles are running)."""

    network: ModelRunner
    level: LevelInfo
    scale: float
    grid: TileGrid
    cells: np.ndarray
    seg: SegmentationStitcher | None = None
    heat: dict[str, HeatmapStitcher] = field(default_factory=dict)
    pending: list = field(default_factory=list)
    ood_scores: np.ndarray | None = None  # (grid rows, cols) tile OOD scores, for the gate's network
    bag: EmbeddingBag | None = None  # encoders: the slide's embeddings, one row per tissue cell
    inferred: int = 0
    model_seconds: float = 0.0
    focus: np.ndarray | None = None  # per cell and tile part: variance of the Laplacian (NaN: not judged)

    @property
    def raster_mm_per_px(self) -> float:
        return self.level.mm_per_px * self.scale


def _tissue_level(slide: SlideReader) -> LevelInfo:
    return min(slide.levels, key=lambda lvl: abs(math.log(lvl.um_per_px / TISSUE_UM_PER_PX)))


def find_tissue(slide: SlideReader) -> tuple[TissueMask, int]:
    """Tissue mask from the level nearest 8 µm/px, each frame reduced by a power of two that
    divides the frame size (so a single-level slide still gives a small image)."""
    image, mm_per_px, level = tissue_image(slide)
    return detect_tissue(image, mm_per_px), level


def tissue_image(slide: SlideReader) -> tuple[np.ndarray, float, int]:
    """The low-resolution RGB image tissue detection and QC look at: (image, mm/px, level)."""
    level = _tissue_level(slide)
    k = 1
    while (
        level.um_per_px * k * 2 <= TISSUE_UM_PER_PX * 1.5
        and level.frame_rows % (k * 2) == 0
        and level.frame_cols % (k * 2) == 0
    ):
        k *= 2
    fh, fw = level.frame_rows // k, level.frame_cols // k
    n_fr, n_fc = math.ceil(level.rows / level.frame_rows), math.ceil(level.cols / level.frame_cols)
    image = np.empty((n_fr * fh, n_fc * fw, 3), dtype=np.uint8)
    for fr in range(n_fr):
        for fc, frame in enumerate(slide.read_frames(level.index, [(fr, fc) for fc in range(n_fc)])):
            if k > 1:
                frame = np.asarray(Image.fromarray(frame).reduce(k))
            image[fr * fh : (fr + 1) * fh, fc * fw : (fc + 1) * fw] = frame
    image = image[: math.ceil(level.rows / k), : math.ceil(level.cols / k)]
    return image, level.mm_per_px * k, level.index


def _plan_network(
    network: ModelRunner,
    slide: SlideReader,
    tissue: TissueMask,
    index: int,
    artefacts: np.ndarray | None = None,
    max_artefact: float = 1.0,
) -> tuple[_Use, list[TileRequest]]:
    level, scale = choose_level(slide.levels, network.um_per_px)
    rows, cols = raster_shape(level.rows, level.cols, scale)
    grid = TileGrid(
        raster_rows=rows,
        raster_cols=cols,
        tile_size=network.tile_size,
        overlap=network.overlap,
    )
    is_seg = any(h.task == "segmentation" for h in network.heads)
    use = _Use(network=network, level=level, scale=scale, grid=grid, cells=np.zeros(0))
    use.cells = grid.cells_with_tissue(
        tissue.mask, tissue.mm_per_px, use.raster_mm_per_px, 0.0 if is_seg else CLASSIFIER_MIN_TISSUE
    )
    if artefacts is not None and not is_seg and artefacts.any():
        # A classifier tile over a pen mark or a fold would only add noise to the slide call.
        use.cells &= ~grid.cells_with_tissue(artefacts, tissue.mm_per_px, use.raster_mm_per_px, max_artefact)
    if not network.heads and isinstance(network, TileEncoder):
        use.bag = EmbeddingBag(int(use.cells.sum()), network.embed_dim)
    for head in network.heads:
        if head.task == "segmentation":
            use.seg = SegmentationStitcher(grid)
        else:
            use.heat[head.task] = HeatmapStitcher(grid, len(head.classes))
    requests = [
        TileRequest(index, int(r), int(c), level.index, level_window(grid, int(r), int(c), scale), network.tile_size)
        for r, c in zip(*np.nonzero(use.cells))
    ]
    return use, requests


class _CountingReads:
    """``slide.read_frame``, counting each (level, row, column) read: the decode accounting.

    Counted here rather than trusted to each reader, so every reader (and the fakes) is measured
    the same way; from the decode pool's threads, hence the lock.
    """

    def __init__(self, slide: SlideReader):
        self._read = slide.read_frame
        self._lock = threading.Lock()
        self.counts: Counter[tuple[int, int, int]] = Counter()

    def __call__(self, level: int, frame_row: int, frame_col: int) -> np.ndarray:
        frame = self._read(level, frame_row, frame_col)
        with self._lock:
            self.counts[level, frame_row, frame_col] += 1
        return frame

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _run_batch(use: _Use, ood: OodGate | None = None) -> None:
    tiles = np.stack([t for _, t in use.pending])
    t0 = time.perf_counter()
    outputs = use.network.predict(tiles)
    use.model_seconds += time.perf_counter() - t0
    if use.ood_scores is not None and ood is not None:
        # An encoder's embeddings are its features; a tile classifier returns them beside its heads.
        features = outputs.get(FEATURES_KEY, outputs.get(EMBEDDINGS) if use.bag is not None else None)
        if features is None:
            raise BadInput(
                f"the bundle's [ood] gate needs features from network {use.network.name!r}, which returned none; "
                "check the manifest's [ood] features"
            )
        scores = tile_scores(ood.reference, features)
        for i, (req, _) in enumerate(use.pending):
            use.ood_scores[req.row, req.col] = scores[i]
    if use.bag is not None:
        use.bag.add(
            np.array([r.row for r, _ in use.pending]), np.array([r.col for r, _ in use.pending]), outputs[EMBEDDINGS]
        )
    for i, (req, _) in enumerate(use.pending):
        for task, value in outputs.items():
            if task == FEATURES_KEY:
                continue
            if task == "segmentation" and use.seg is not None:
                use.seg.add(req.row, req.col, value[i])
            elif task in use.heat:
                use.heat[task].add(req.row, req.col, value[i])
    use.inferred += len(use.pending)
    use.pending.clear()


def _quality(uses: list[_Use], lowres: np.ndarray, tissue: TissueMask, t: QcThresholds) -> QcReport:
    """The finest network's out-of-focus cells added to the low-resolution artefacts; the
    classifier cells over the result taken out of the heatmaps (NaN: not analysed)."""
    focused = [u for u in uses if u.focus is not None]
    blurred = [out_of_focus_mask(u.focus, u.grid, u.raster_mm_per_px, tissue, t) for u in focused]
    artefacts = with_blur(lowres, np.logical_or.reduce(blurred) if blurred else None, tissue, t)
    if artefacts.any():
        for use in uses:
            if use.heat:
                out = use.grid.cells_with_tissue(artefacts > 0, tissue.mm_per_px, use.raster_mm_per_px, t.tile_max_artefact_fraction)
                for stitcher in use.heat.values():
                    stitcher.probabilities[out] = np.nan
    assessed = sum(int((~np.isnan(u.focus)).any(axis=(2, 3)).sum()) for u in focused)
    return qc_report(artefacts, tissue, t, assessed)


def _qc_note(report: QcReport) -> str:
    reasons = ", ".join(f"{f.reason.code_meaning.lower()} {f.area_mm2:.2f} mm²" for f in report.findings)
    text = f"Slide QC: {report.verdict}" + (f" ({reasons})" if reasons else "")
    if report.verdict == "fail":
        text += "; every slide-level call is indeterminate."
    elif report.findings:
        text += "; tiles over artefacts were left out of the slide-level calls."
    return text


def _ood_verdict(ood: OodGate, use: _Use) -> OodResult:
    score = slide_score(use.ood_scores)
    return OodResult(
        network=ood.network,
        slide_score=score,
        slide_threshold=ood.slide_threshold,
        out_of_distribution=ood.is_out(score),
        tile_scores=Raster(use.ood_scores, use.raster_mm_per_px * use.grid.tile_size),
        slide_threshold_low=ood.slide_threshold_low,
    )


def withhold_out_of_distribution(call: SlideCall) -> SlideCall:
    """The call as the OOD gate leaves it: no class, marked out of distribution; probabilities kept."""
    return replace(call, call=None, out_of_distribution=True)


def _aggregate(aggregator: BagRunner, use: _Use):
    """One aggregator head on its encoder's bag -> (slide call, attention map or None without tissue)."""
    bag = use.bag
    if bag.count == 0:
        return ensemble_call(aggregator.task, aggregator.classes, None, aggregator.indeterminate_below, aggregator.max_fold_spread), None
    probabilities, attention = aggregator.predict_bag(bag.embeddings)
    call = ensemble_call(
        aggregator.task, aggregator.classes, probabilities, aggregator.indeterminate_below, aggregator.max_fold_spread
    )
    grid = np.full((use.grid.rows, use.grid.cols), np.nan, np.float32)
    grid[bag.cells[:, 0], bag.cells[:, 1]] = np.asarray(attention, np.float32).mean(axis=0)
    raster = Raster(grid, use.raster_mm_per_px * use.grid.tile_size)
    return call, AttentionMap(task=aggregator.task, network=aggregator.name, weights=raster)


def _mask_label_map(label_map: np.ndarray, tissue: TissueMask, mm_per_px: float, band: int | None = None) -> None:
    """``NOT_TISSUE`` outside the tissue mask, resampled band by band (about a megapixel each)."""
    band = band or max(1, (1 << 20) // max(1, label_map.shape[1]))
    for r0 in range(0, label_map.shape[0], band):
        rows = min(band, label_map.shape[0] - r0)
        inside = resample_mask(tissue, rows, label_map.shape[1], mm_per_px, row0=r0)
        label_map[r0 : r0 + rows][~inside] = NOT_TISSUE


def analyze(
    slide: SlideReader,
    networks: Sequence[ModelRunner],
    algorithm: Algorithm,
    options: AnalysisOptions = AnalysisOptions(),
    progress: Callable[[int, int], None] | None = None,
    ood: OodGate | None = None,
    aggregators: Sequence[BagRunner] = (),
) -> tuple[AnalysisResult, AnalysisStats, LevelInfo]:
    """Analyse ``slide``; return the result, the run's figures, and the source level: the level the
    writers reference (the segmentation network's, or without one the finest-reading network's;
    see ``_source_use``).

    A bundle without a segmentation network gives a result with no label map, regions or area
    fractions (None); tissue, QC, heatmaps, calls, attention maps and the OOD gate are as with one.

    ``ood``: the bundle's out-of-distribution gate; the network it names scores each of its
    tiles, and a slide whose median score passes the gate's threshold gets every call withheld
    as "indeterminate (out of distribution)" (``result.ood`` holds the scores).
    ``aggregators`` (two-stage bundles) each read the bag of the encoder in ``networks`` they
    name; BadInput if there is no such encoder."""
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    image, tissue_mm_per_px, tissue_level = tissue_image(slide)
    tissue = detect_tissue(image, tissue_mm_per_px)
    qc = options.qc
    lowres = lowres_artefacts(image, tissue, qc) if qc is not None else None
    stages["tissue"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    uses: list[_Use] = []
    requests: list[TileRequest] = []
    for i, network in enumerate(networks):
        use, reqs = _plan_network(
            network, slide, tissue, i, lowres > 0 if lowres is not None else None,
            qc.tile_max_artefact_fraction if qc is not None else 1.0,
        )
        if ood is not None and network.name == ood.network:
            use.ood_scores = np.full((use.grid.rows, use.grid.cols), np.nan, dtype=np.float32)
        uses.append(use)
        requests.extend(reqs)
    if qc is not None and uses:
        finest = min(u.raster_mm_per_px for u in uses)
        for u in uses:
            if u.raster_mm_per_px <= finest * (1 + 1e-6):
                u.focus = np.full((u.grid.rows, u.grid.cols, FOCUS_PARTS, FOCUS_PARTS), np.nan, np.float32)
    if ood is not None and not any(u.ood_scores is not None for u in uses):
        raise BadInput(f"the bundle's [ood] gate names network {ood.network!r}, which the bundle does not run")
    encoders = {u.network.name: u for u in uses if u.bag is not None}
    for aggregator in aggregators:
        if aggregator.encoder not in encoders:
            raise BadInput(
                f"aggregator {aggregator.name!r} reads encoder {aggregator.encoder!r}, which is not among the "
                f"networks (encoders: {sorted(encoders)}); the bundle is inconsistent: re-export it"
            )
    if not uses:
        raise BadInput("the bundle runs no tile network on the slide; add a tile or encoder network to it")
    seg_uses = [u for u in uses if u.seg is not None]
    if len(seg_uses) > 1:  # a Manifest refuses two already (glio_node/manifest.py)
        raise BadInput(f"the bundle has {len(seg_uses)} segmentation networks; it may have at most one")
    seg = seg_uses[0] if seg_uses else None
    levels = {
        u.level.index: LevelGeometry((u.level.rows, u.level.cols), (u.level.frame_rows, u.level.frame_cols))
        for u in uses
    }
    plan = FramePlan(requests, levels)
    stages["plan"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    total = len(plan.requests)
    done = 0
    batch = options.batch_size
    reads = _CountingReads(slide)
    for req, tile in iter_tiles(plan, reads, options.decode_threads, options.lookahead):
        use = uses[req.network]
        if use.focus is not None and qc is not None:
            use.focus[req.row, req.col] = focus_parts(tile, qc.focus_min_stained_fraction)
        use.pending.append((req, tile))
        if len(use.pending) == batch:
            _run_batch(use, ood)
            done += batch
            if progress:
                progress(done, total)
    for use in uses:
        if use.pending:
            done += len(use.pending)
            _run_batch(use, ood)
    if progress:
        progress(done, total)
    stages["inference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    head_classes = {h.task: h for u in uses for h in u.network.heads}
    label_map, region_classes, fractions = None, (), None
    if seg is not None:  # a bundle without a segmentation network has no regions: the result says so by None
        label_map = seg.seg.label_map
        _mask_label_map(label_map, tissue, seg.raster_mm_per_px)
        region_classes = head_classes["segmentation"].classes
        fractions = region_fractions(label_map, region_classes)
    report = _quality(uses, lowres, tissue, qc) if qc is not None and lowres is not None else None
    heatmaps, calls = [], []
    for use in uses:
        for task, stitcher in use.heat.items():
            head = head_classes[task]
            heatmaps.append(
                Heatmap(task=task, classes=head.classes, probabilities=Raster(stitcher.probabilities, use.raster_mm_per_px * use.grid.tile_size))
            )
            calls.append(
                slide_call(task, head.classes, stitcher.slide_probabilities(), head.indeterminate_below, head.temperature)
            )
    attention_maps = []
    for aggregator in aggregators:
        calls_, map_ = _aggregate(aggregator, encoders[aggregator.encoder])
        calls.append(calls_)
        if map_ is not None:
            attention_maps.append(map_)
    if report is not None and report.verdict == "fail":
        calls = [replace(c, call=None, indeterminate_reason=QC_VERDICTS["fail"]) for c in calls]
    notes = []
    if not tissue.mask.any():
        notes.append("No tissue was found on the slide; nothing was analysed.")
    if report is not None and report.verdict != "pass":
        notes.append(_qc_note(report))
    verdict = None
    if ood is not None:
        verdict = _ood_verdict(ood, next(u for u in uses if u.ood_scores is not None))
        if verdict.out_of_distribution:
            calls = [withhold_out_of_distribution(c) for c in calls]
            notes.append(
                f"The slide is unlike the bundle's training slides (out-of-distribution score "
                f"{verdict.slide_score:.2f} outside {verdict.slide_threshold_low:.2f} to {verdict.slide_threshold:.2f}): "
                "every call is indeterminate (out of distribution)."
            )
    result = AnalysisResult(
        algorithm=algorithm,
        region_classes=region_classes,
        label_map=Raster(label_map, seg.raster_mm_per_px) if seg is not None else None,
        tissue_area_mm2=tissue.area_mm2,
        region_area_fraction=fractions,
        heatmaps=tuple(heatmaps),
        calls=tuple(calls),
        notes=tuple(notes),
        qc=report,
        ood=verdict,
        attention_maps=tuple(attention_maps),
        tissue=Raster(tissue.mask.astype(np.uint8), tissue.mm_per_px),
    )
    stages["stitch"] = time.perf_counter() - t0
    stats = AnalysisStats(
        networks=tuple(
            NetworkStats(
                name=u.network.name,
                level=u.level.index,
                level_um_per_px=u.level.um_per_px,
                scale=u.scale,
                raster_um_per_px=u.raster_mm_per_px * 1000,
                tiles_total=u.grid.rows * u.grid.cols,
                tiles_with_tissue=int(u.cells.sum()),
                tiles_inferred=u.inferred,
                model_seconds=u.model_seconds,
            )
            for u in uses
        ),
        tissue_level=tissue_level,
        tissue_fraction=tissue.fraction,
        frames_decoded=reads.total,
        frames_needed=plan.distinct_frames,
        stage_seconds=stages,
    )
    return result, stats, _source_use(uses, seg).level


def _source_use(uses: list[_Use], seg: _Use | None) -> _Use:
    """The network whose level the outputs reference as their source: the segmentation network's
    (the SEG's pixels are that level's, downsampled at most); without one, the network with the
    finest raster (an encoder's tiles, say), the first such in the bundle's order, so every
    output's source is a level the analysis actually read."""
    if seg is not None:
        return seg
    return min(uses, key=lambda u: u.raster_mm_per_px)  # min keeps the first of equals
