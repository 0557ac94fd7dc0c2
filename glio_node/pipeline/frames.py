"""Frame-aligned tile reading: decode every needed frame once, ahead of the model, in threads.

Reading arbitrary regions through a generic region reader decodes each frame about four times
(once for every tile that overlaps it).  Instead the pipeline lists all tile requests up front,
sorted top to bottom, and a ``FramePlan`` works out which frames each request needs and which
request uses each frame last.  ``iter_tiles`` then decodes each frame once (in a thread pool,
``lookahead`` requests ahead of the tile being assembled), pastes it into every tile that needs
it, and drops it after its last use.  Memory stays at a band of frames a few tile rows high.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from glio_node.pipeline.tiling import LevelWindow, frames_for_window

FrameKey = tuple[int, int, int]  # (level, frame_row, frame_col)
GLASS = 255  # fill for tile parts outside the slide


@dataclass(frozen=True)
class LevelGeometry:
    """What the plan needs to know of a level: its size and frame size, both (rows, cols) px."""

    size: tuple[int, int]
    frame_size: tuple[int, int]


@dataclass(frozen=True)
class TileRequest:
    """One network input tile: which network, which grid cell, where to read it."""

    network: int  # index into the pipeline's networks
    row: int  # grid cell row
    col: int  # grid cell column
    level: int  # pyramid level to read
    window: LevelWindow  # box on that level, in level px
    tile_size: int  # network input px; the window is resized to this when it differs


STRIP_PX = 4096  # target width of a column strip, level px


def strip_width(windows: Sequence[LevelWindow], geo: LevelGeometry, target: int = STRIP_PX) -> int | None:
    """The narrowest whole number of frame columns at least ``target`` px wide such that no
    window and no frame crosses a strip boundary, or None when there is none narrower than the
    level (overlapping tiles on a grid out of step with the frames).

    Strips with clean boundaries share no frame, so reading strip by strip still decodes each
    frame once; the frames held at a time are a band one strip wide instead of the level's width.
    """
    fw = geo.frame_size[1]
    width = geo.size[1]
    if not windows or width <= target:
        return None
    x0 = np.array([max(w.x0, 0) for w in windows])  # past the level's edges nothing is read
    x1 = np.array([min(w.x1, width) for w in windows]) - 1
    m = max(1, -(-target // fw))
    while m * fw < width:
        w = m * fw
        if np.all(np.floor_divide(x0, w) == np.floor_divide(x1, w)):
            return w
        m += 1
        if m * fw > 4 * max(target, fw):  # a boundary this far off will not come: read by rows
            return None
    return None


class FramePlan:
    """Requests in reading order, the frames each needs, and when each frame is last used.

    Reading order is top to bottom within column strips (see :func:`strip_width`) on levels wider
    than a strip, so the band of decoded frames held for later tiles stays a strip wide on a wide
    slide; levels without clean strip boundaries, and narrow ones, are read in rows.
    """

    def __init__(self, requests: Sequence[TileRequest], levels: dict[int, LevelGeometry], strip_px: int = STRIP_PX):
        widths = {
            lvl: strip_width([r.window for r in requests if r.level == lvl], geo, strip_px) for lvl, geo in levels.items()
        }
        self.strip_widths = widths

        def order(r: TileRequest) -> tuple[int, int, int, int, int]:
            w = widths.get(r.level)
            return (r.level, max(r.window.x0, 0) // w if w else 0, r.window.y0, r.window.x0, r.network)

        self.requests: tuple[TileRequest, ...] = tuple(sorted(requests, key=order))
        self.frames: list[tuple[FrameKey, ...]] = []
        self.last_use: dict[FrameKey, int] = {}
        for i, req in enumerate(self.requests):
            geo = levels[req.level]
            keys = tuple((req.level, fr, fc) for fr, fc in frames_for_window(req.window, geo.frame_size, geo.size))
            self.frames.append(keys)
            for key in keys:
                self.last_use[key] = i
        self.levels = levels

    @property
    def distinct_frames(self) -> int:
        return len(self.last_use)


def _assemble(req: TileRequest, geo: LevelGeometry, frames: dict[FrameKey, np.ndarray]) -> np.ndarray:
    w = req.window
    h, wd = w.y1 - w.y0, w.x1 - w.x0
    canvas = np.full((h, wd, 3), GLASS, dtype=np.uint8)
    fh, fw = geo.frame_size
    lh, lw = geo.size
    for (_, fr, fc), frame in frames.items():
        fy0, fx0 = fr * fh, fc * fw
        # Intersection of the frame, the level and the window, in level px.
        y0, y1 = max(fy0, w.y0, 0), min(fy0 + fh, w.y1, lh)
        x0, x1 = max(fx0, w.x0, 0), min(fx0 + fw, w.x1, lw)
        if y1 > y0 and x1 > x0:
            canvas[y0 - w.y0 : y1 - w.y0, x0 - w.x0 : x1 - w.x0] = frame[y0 - fy0 : y1 - fy0, x0 - fx0 : x1 - fx0]
    if (h, wd) != (req.tile_size, req.tile_size):
        img = Image.fromarray(canvas)
        factor = h / req.tile_size
        if h == wd and factor == int(factor):
            img = img.reduce(int(factor))  # exact box filter, the fast path
        else:
            img = img.resize((req.tile_size, req.tile_size), Image.Resampling.BOX)
        canvas = np.asarray(img)
    return canvas


def iter_tiles(
    plan: FramePlan,
    read_frame: Callable[[int, int, int], np.ndarray],
    threads: int = 2,
    lookahead: int = 32,
    max_queued: int = 64,
) -> Iterator[tuple[TileRequest, np.ndarray]]:
    """Yield (request, RGB uint8 tile) in plan order; frames decoded once, in ``threads`` threads.

    ``read_frame(level, frame_row, frame_col)`` decodes one frame.  Its errors are re-raised in
    the caller's thread.  Closing the generator early stops the background work.
    """
    out: queue.Queue = queue.Queue(maxsize=max_queued)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="glio-decode")
        pending: dict[FrameKey, Future] = {}
        submitted = 0  # requests whose frames are submitted
        try:
            for i, req in enumerate(plan.requests):
                while submitted < min(len(plan.requests), i + 1 + lookahead):
                    for key in plan.frames[submitted]:
                        if key not in pending:
                            pending[key] = pool.submit(read_frame, *key)
                    submitted += 1
                frames = {key: pending[key].result() for key in plan.frames[i]}
                tile = _assemble(req, plan.levels[req.level], frames)
                for key in plan.frames[i]:
                    if plan.last_use[key] == i:
                        del pending[key]
                while not stop.is_set():
                    try:
                        out.put((req, tile), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            out.put(exc)
        finally:
            for fut in pending.values():
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    worker = threading.Thread(target=produce, name="glio-tiles", daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                out.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()
