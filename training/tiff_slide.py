"""Plain TIFF slides (research collections) read like a DICOM WSI series, for tile extraction.

Research collections (TCGA's SVS files, Ivy GAP's converted scans, exports of image analysis
tools) come as TIFF rather than DICOM.  Training must cut their tiles exactly as the worker cuts a
DICOM slide's, so :class:`TiffSlide` is a :class:`glio_node.ports.SlideReader` like the worker's
:class:`glio_node.runtime.slide_reader.DicomSlide` (``levels``, ``read_frame``; ``decodes`` too) and
the worker's own functions (``find_tissue``, ``choose_level``, ``TileGrid``, ``FramePlan``,
``iter_tiles``) run on it unchanged.

Levels, largest first:

- the pyramid tifffile finds in the first series (``series[0].levels``: SubIFDs, reduced-resolution
  pages, the levels of an Aperio SVS or OME-TIFF);
- else, when the first series is a single image, the further series that are each smaller in
  both dimensions with the same aspect ratio (within 2 %), pixel type and samples (a pyramid
  written one plain page per level); SVS/NDPI thumbnails, labels and macro images are skipped.

Only the first page of a level is read (first focal plane, channel or time point).

Spacing (µm/px) of the largest level, first found of:

1. ``um_per_px`` given to :meth:`TiffSlide.open` (the dataset's ``um_per_px`` column);
2. ``MPP = x`` in its ImageDescription (Aperio SVS);
3. XResolution / YResolution with ResolutionUnit CENTIMETER (1e4 / res) or INCH (25400 / res);
   no unit (NONE), no tag, or 72 or 96 dpi (the defaults image editors write) mean unknown.

A reduced level takes its own resolution tags only when no spacing was given and they agree with
the base spacing scaled by the size ratio within 2 %; otherwise it is the base spacing scaled by
the size ratio.  Writers that copy the base level's tags to every level exist, and an equal
physical extent is what a pyramid means.  SVS levels repeat the base MPP in their description, so
MPP is read from the base level only.  No spacing at all raises :class:`UnknownSpacingError`.

Pixels: 8-bit unsigned only (``TiffSlideError`` otherwise).  Greyscale (MINISBLACK, MINISWHITE),
RGB, YCbCr in JPEG, with or without an alpha channel, interleaved or planar, become RGB uint8;
alpha is composited over white glass.
"""

from __future__ import annotations

import math
import re
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from tifffile import EXTRASAMPLE, PHOTOMETRIC, RESUNIT

from glio_node.errors import BadInput
from glio_node.pipeline.levels import LevelInfo
from glio_node.ports import SlideReader

FLAT_FRAME = 512  # px: virtual frame size of an untiled (strip) level
DEFAULT_DPI = (72.0, 96.0)  # dpi that image editors write when they know nothing
LEVEL_TOLERANCE = 0.02  # aspect ratio, and own-tag vs size-ratio spacing, of a reduced level
_CONTEXT_SERIES = {"thumbnail", "label", "macro"}
_MPP = re.compile(r"(?:^|\|)\s*MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_ALPHA = {EXTRASAMPLE.ASSOCALPHA, EXTRASAMPLE.UNASSALPHA}


class TiffSlideError(BadInput, ValueError):
    """The TIFF cannot be read as a slide; the message names the file and the fix.  A BadInput,
    as DicomSlide's errors are, so ``python -m training`` reports both the same way."""


class UnknownSpacingError(TiffSlideError):
    """The TIFF records no pixel spacing and none was given; ``detail`` says what to do."""

    def __init__(self, path: Path, detail: str):
        self.path = Path(path)
        self.detail = detail
        super().__init__(f"{path}: {detail}")


@dataclass(frozen=True)
class _Level:
    """Where a level's pixels are: its first page and how to cut it into frames."""

    page: tifffile.TiffPage
    tiled: bool
    samples: int  # samples per pixel, interleaved or planar
    planar: bool  # PlanarConfiguration 2: one plane (and one set of tiles) per sample


def _resolution_um(page: tifffile.TiffPage) -> float | None:
    """µm/px from a page's X/YResolution in cm or inch (the larger if they differ); None if unknown."""
    unit = page.tags.valueof("ResolutionUnit", RESUNIT.NONE)
    if unit not in (RESUNIT.CENTIMETER, RESUNIT.INCH):
        return None
    per_unit = 1e4 if unit == RESUNIT.CENTIMETER else 25400.0
    spacings = []
    for name in ("XResolution", "YResolution"):
        value = page.tags.valueof(name)
        if value is None:
            continue
        num, den = value if isinstance(value, tuple) else (value, 1)
        if not num or not den:
            return None
        res = num / den
        if unit == RESUNIT.INCH and any(math.isclose(res, dpi) for dpi in DEFAULT_DPI):
            return None
        spacings.append(per_unit / res)
    return max(spacings) if spacings else None


def _mpp_um(page: tifffile.TiffPage) -> float | None:
    match = _MPP.search(page.description or "")
    if match is None:
        return None
    value = float(match.group(1))
    return value if value > 0 else None


def _first_page(level: tifffile.TiffPageSeries) -> tifffile.TiffPage:
    page = level.pages[0]
    return page if isinstance(page, tifffile.TiffPage) else page.aspage()


def _level_pages(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """The first page of each pyramid level, largest first (rules in the module docstring)."""
    if not tif.series:
        raise TiffSlideError(f"{tif.filehandle.path}: the TIFF holds no image")
    first = tif.series[0]
    pages = [_first_page(level) for level in first.levels]
    if len(pages) == 1:
        base = pages[0]
        aspect = base.imagewidth / base.imagelength
        for series in tif.series[1:]:
            page, last = _first_page(series), pages[-1]
            if (series.name or "").strip().lower() in _CONTEXT_SERIES:
                continue
            if (
                page.imagelength < last.imagelength
                and page.imagewidth < last.imagewidth
                and abs(page.imagewidth / page.imagelength / aspect - 1) <= LEVEL_TOLERANCE
                and (page.dtype, page.samplesperpixel, page.photometric) == (base.dtype, base.samplesperpixel, base.photometric)
            ):
                pages.append(page)
    return sorted(pages, key=lambda p: p.imagelength * p.imagewidth, reverse=True)


def _check_pixels(path: Path, page: tifffile.TiffPage) -> None:
    """Raise TiffSlideError naming the file unless the page's pixels can be made RGB uint8."""
    if page.dtype != np.uint8:
        raise TiffSlideError(
            f"{path}: samples are {page.bitspersample}-bit {page.dtype} (SampleFormat {page.sampleformat}); "
            "only 8-bit RGB or greyscale slides are read: convert it (e.g. vips cast uchar)"
        )
    photometric = page.photometric
    colour = photometric in (PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR)
    grey = photometric in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE)
    if photometric == PHOTOMETRIC.YCBCR and page.compression != tifffile.COMPRESSION.JPEG:
        raise TiffSlideError(f"{path}: YCbCr pixels are read only JPEG-compressed (this is {page.compression.name}); convert it to RGB")
    if not (colour and page.samplesperpixel >= 3) and not (grey and page.samplesperpixel >= 1):
        raise TiffSlideError(
            f"{path}: photometric {PHOTOMETRIC(photometric).name} with {page.samplesperpixel} sample(s) per pixel "
            "is not read; give RGB, YCbCr (JPEG) or greyscale pixels"
        )


def to_rgb(pixels: np.ndarray, page: tifffile.TiffPage) -> np.ndarray:
    """RGB uint8 (rows, cols, 3) from a page's decoded uint8 pixels (rows, cols, samples).

    Greyscale is repeated over the three channels (MINISWHITE inverted first); an alpha channel
    (the first extra sample, associated or not) is composited over white glass, so transparent
    areas read as background, never as dark tissue; other extra samples are dropped.
    """
    colour = page.photometric in (PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR)
    n_colour = 3 if colour else 1
    rgb = pixels[..., :n_colour]
    if page.photometric == PHOTOMETRIC.MINISWHITE:
        rgb = 255 - rgb
    extras = tuple(page.extrasamples or ())
    if pixels.shape[-1] > n_colour and extras and extras[0] in _ALPHA:
        c = rgb.astype(np.uint16)
        a = pixels[..., n_colour : n_colour + 1].astype(np.uint16)
        if extras[0] == EXTRASAMPLE.UNASSALPHA:  # c over white: (c a + 255 (255 - a)) / 255, rounded
            rgb = ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        else:  # premultiplied: c + 255 (1 - a / 255)
            rgb = np.minimum(c + (255 - a), 255).astype(np.uint8)
    if n_colour == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


class TiffSlide(SlideReader):
    """An opened plain TIFF slide; decodes frames one at a time (thread-safe).

    A tiled level's frames are its TIFF tiles, each decoded on its own when asked for.  An
    untiled (strip) level has virtual frames of FLAT_FRAME x FLAT_FRAME px, cut from the whole
    level, which is decoded on the first read and held in memory until close(): rows x cols x 3
    bytes (a 40 000 x 30 000 px flat scan holds 3.6 GB), so convert large flat TIFFs to tiled
    pyramids first (``vips tiffsave in.tif out.tif --tile --pyramid``).  ``decodes`` counts
    frames handed out per level, as DicomSlide counts decoded frames.
    """

    def __init__(self, path: Path, tif: tifffile.TiffFile, um_per_px: float | None = None):
        """``tif`` opened on ``path``; it is closed by close().  Raises UnknownSpacingError when no
        spacing is known, TiffSlideError for pixels that cannot be made RGB uint8."""
        self.path = Path(path)
        self._tif = tif
        self._lock = threading.Lock()
        self._flat: dict[int, np.ndarray] = {}
        self.decodes: dict[int, int] = defaultdict(int)  # level index -> frames read
        pages = _level_pages(tif)
        for page in pages:
            _check_pixels(self.path, page)
        self._levels = tuple(
            _Level(page, page.is_tiled, page.samplesperpixel, page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and page.samplesperpixel > 1)
            for page in pages
        )
        self.levels: tuple[LevelInfo, ...] = tuple(
            LevelInfo(
                index=i,
                rows=page.imagelength,
                cols=page.imagewidth,
                frame_rows=page.tilelength if page.is_tiled else FLAT_FRAME,
                frame_cols=page.tilewidth if page.is_tiled else FLAT_FRAME,
                mm_per_px=um / 1000.0,
                headers=(),
            )
            for i, (page, um) in enumerate(zip(pages, self._spacings(pages, um_per_px)))
        )

    @classmethod
    def open(cls, path: Path, um_per_px: float | None = None) -> TiffSlide:
        """Open ``path``; ``um_per_px`` (the base level's spacing) overrides what the file says."""
        if um_per_px is not None and not (math.isfinite(um_per_px) and um_per_px > 0):
            raise ValueError(f"{path}: um_per_px {um_per_px} must be a positive number")
        tif = tifffile.TiffFile(path)
        try:
            return cls(path, tif, um_per_px)
        except BaseException:
            tif.close()
            raise

    def _spacings(self, pages: list[tifffile.TiffPage], given: float | None) -> list[float]:
        base = pages[0]
        base_um = given or _mpp_um(base) or _resolution_um(base)
        if base_um is None:
            raise UnknownSpacingError(
                self.path,
                "records no pixel spacing (no 'MPP =' in its ImageDescription, no XResolution in "
                "centimetres or inches); give its µm per pixel at full resolution in a um_per_px "
                "column of labels.csv",
            )
        out = [base_um]
        for page in pages[1:]:
            ratio = max(base.imagelength / page.imagelength, base.imagewidth / page.imagewidth)
            scaled = base_um * ratio
            own = None if given else _resolution_um(page)
            out.append(own if own is not None and abs(own / scaled - 1) <= LEVEL_TOLERANCE else scaled)
        return out

    def read_frame(self, level: int, frame_row: int, frame_col: int) -> np.ndarray:
        """One frame, RGB uint8 (frame_rows, frame_cols, 3); parts past the image edge are white."""
        info, lvl = self.levels[level], self._levels[level]
        fh, fw = info.frame_rows, info.frame_cols
        y0, x0 = frame_row * fh, frame_col * fw
        if not (0 <= y0 < info.rows and 0 <= x0 < info.cols):
            raise ValueError(f"{self.path}: frame (row {frame_row}, column {frame_col}) is outside level {level} ({info.cols}x{info.rows} px)")
        out = np.full((fh, fw, 3), 255, dtype=np.uint8)
        h, w = min(fh, info.rows - y0), min(fw, info.cols - x0)
        if lvl.tiled:
            pixels = self._decode_tile(lvl, frame_row, frame_col)
        else:
            pixels = self._flat_level(level)[y0 : y0 + h, x0 : x0 + w]
        if pixels is not None:
            out[:h, :w] = pixels[:h, :w]
        with self._lock:
            self.decodes[level] += 1
        return out

    def _decode_tile(self, lvl: _Level, frame_row: int, frame_col: int) -> np.ndarray | None:
        """RGB pixels of one TIFF tile (None when the file stores none: glass)."""
        page = lvl.page
        across = math.ceil(page.imagewidth / page.tilewidth)
        per_plane = across * math.ceil(page.imagelength / page.tilelength)
        index = frame_row * across + frame_col
        indices = [index + s * per_plane for s in range(lvl.samples)] if lvl.planar else [index]
        planes = []
        for i in indices:
            with self._lock:  # one file handle
                count = page.databytecounts[i]
                if count:
                    self._tif.filehandle.seek(page.dataoffsets[i])
                    data = self._tif.filehandle.read(count)
            if not count:
                return None
            try:
                segment, _, _ = page.decode(data, i, jpegtables=page.jpegtables)
            except Exception as exc:  # codecs raise their own types; all mean a bad tile here
                raise TiffSlideError(
                    f"{self.path}: tile {i} (row {frame_row}, column {frame_col}) of the "
                    f"{page.imagewidth}x{page.imagelength} px level cannot be decoded ({type(exc).__name__}: {exc})"
                ) from exc
            planes.append(segment[0])  # (length, width, contig samples)
        pixels = np.concatenate(planes, axis=-1) if lvl.planar else planes[0]
        return to_rgb(pixels, page)

    def _flat_level(self, level: int) -> np.ndarray:
        with self._lock:
            if level not in self._flat:
                lvl = self._levels[level]
                pixels = lvl.page.asarray()
                if pixels.ndim == 2:
                    pixels = pixels[..., None]
                elif lvl.planar:
                    pixels = np.moveaxis(pixels, 0, -1)
                self._flat[level] = to_rgb(pixels, lvl.page)
            return self._flat[level]

    def close(self) -> None:
        self._flat.clear()
        self._tif.close()

    def __enter__(self) -> TiffSlide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
