"""Read a DICOM whole-slide image series: check it first, then hand out decoded frames.

This is the only module that imports wsidicom.  It does two things:

1. ``inspect_files`` reads every file's header with pydicom and refuses, with a one-line
   ``BadInput``, what cannot be analysed: non-DICOM files, other IODs, several series, levels
   without pixel spacing, TILED_FULL levels or concatenations with frames missing.  wsidicom
   itself silently skips files it does not like; a hospital needs to be told instead.
2. ``DicomSlide`` (a :class:`glio_node.ports.SlideReader`) opens the checked files with wsidicom
   and decodes single frames by their (row, column) on a level, exactly once per call, counting
   every decode.  The pipeline's frame plan decides which frames to decode and when, and counts
   its own reads; the contract tests check that this reader decodes no more than it is asked.
   A frame whose bytes cannot be read or decoded is ``BadInput`` (re-send
   the series); any other failure of the decoder (a bug, a missing codec, memory, the disk)
   comes out as itself, so the worker retries it as an internal error (:func:`is_corrupt_data`).

Frames are returned as RGB uint8 arrays of the full frame size (edge frames included), so a
caller can paste them into a tile without special cases.
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from glio_node.errors import BadInput
from glio_node.pipeline.levels import LevelInfo
from glio_node.pipeline.series import series_gaps
from glio_node.ports import SlideReader

VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_CONTEXT_TYPES = {"LABEL", "OVERVIEW", "THUMBNAIL"}


@dataclass(frozen=True)
class SlideFile:
    """One checked file of the series and its header (no pixel data)."""

    path: Path
    header: pydicom.Dataset

    @property
    def image_flavor(self) -> str:
        """Third value of ImageType: VOLUME, LABEL, OVERVIEW or THUMBNAIL."""
        image_type = list(self.header.get("ImageType", []))
        return str(image_type[2]).upper() if len(image_type) > 2 else "VOLUME"


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _expand(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise BadInput(f"{p}: no such file or folder; give the files or the folder of one slide")
    if not files:
        raise BadInput("no files found in " + ", ".join(str(p) for p in paths) + "; give the files of one slide")
    return files


def _pixel_spacing(header: pydicom.Dataset) -> tuple[float, float] | None:
    try:
        spacing = header.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return float(spacing[0]), float(spacing[1])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        pass
    try:  # some writers put it per frame only
        spacing = header.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return float(spacing[0]), float(spacing[1])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def inspect_files(paths: Iterable[Path], *, allow_gaps: bool = False) -> list[SlideFile]:
    """Check that ``paths`` (files or folders) hold exactly one VL WSI series; return its files.

    Raises ``BadInput`` naming the first problem found and what to do about it.  With
    ``allow_gaps`` a level with missing frames or concatenation parts is accepted (the worker
    runs a series that stayed incomplete past ``incomplete_wait_seconds``); every other check
    still applies.
    """
    files = _expand(paths)
    checked: list[SlideFile] = []
    for path in files:
        try:
            if not _is_dicom(path):
                raise BadInput(f"{path}: not a DICOM file (no DICM preamble); give only the slide's DICOM files")
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
            raise BadInput(f"{path}: cannot read the DICOM header ({exc}); the file is truncated or corrupt, re-send it") from exc
        sop_class = str(header.get("SOPClassUID", ""))
        if sop_class != VL_WSI_SOP_CLASS:
            modality = header.get("Modality", "?")
            raise BadInput(
                f"{path}: not a VL Whole Slide Microscopy image (SOP class {sop_class or 'missing'}, "
                f"modality {modality}); glio-node analyses only DICOM WSI (SM) series"
            )
        checked.append(SlideFile(path, header))
    series = sorted({str(f.header.get("SeriesInstanceUID", "")) for f in checked})
    if len(series) > 1:
        raise BadInput(
            f"the files belong to {len(series)} series ({', '.join(s[-12:] for s in series)}); "
            "give the files of one slide series only"
        )
    volumes = [f for f in checked if f.image_flavor not in _CONTEXT_TYPES]
    if not volumes:
        raise BadInput("the series holds only label/overview/thumbnail images, no pyramid level to analyse")
    for f in volumes:
        if _pixel_spacing(f.header) is None:
            raise BadInput(
                f"{f.path}: no PixelSpacing in the Pixel Measures functional group; the scanner or "
                "converter must record the pixel spacing (µm/px) for the slide to be analysed"
            )
    if not allow_gaps:
        _check_frames_complete(volumes)
    return checked


def _check_frames_complete(volumes: list[SlideFile]) -> None:
    """Every TILED_FULL level has all its frames; every concatenation has all its parts
    (the rule of :func:`glio_node.pipeline.series.series_gaps`, shared with the scheduler)."""
    gaps = series_gaps([f.header for f in volumes])
    if gaps:
        raise BadInput(f"{volumes[gaps[0].index].path}: {gaps[0].message}")


def _absent_frames(info: LevelInfo) -> frozenset[tuple[int, int]]:
    """(row, column) of the frames a TILED_FULL level should hold but none of its instances do.

    TILED_FULL frames run column-fastest, then row (PS3.3 C.7.6.17.3); a concatenation part
    holds frames ``ConcatenationFrameOffsetNumber`` + 1 ... + ``NumberOfFrames``.  Only one
    focal plane and optical path is read, so only the first plane's frames are considered.
    Levels that are not TILED_FULL give an empty set: absent sparse frames are glass anyway.
    """
    if not info.headers or any(
        str(h.get("DimensionOrganizationType", "")).upper() != "TILED_FULL" for h in info.headers
    ):
        return frozenset()
    across = math.ceil(info.cols / info.frame_cols)
    down = math.ceil(info.rows / info.frame_rows)
    present: set[int] = set()
    for h in info.headers:
        offset = int(h.get("ConcatenationFrameOffsetNumber", 0) or 0)
        present.update(range(offset, offset + int(h.get("NumberOfFrames", 1))))
    return frozenset(
        (i // across, i % across) for i in range(across * down) if i not in present
    )


class DicomSlide(SlideReader):
    """An opened, checked slide; decodes frames one at a time (thread-safe).

    The pipeline's :class:`glio_node.ports.SlideReader`; ``decodes`` counts what wsidicom
    really decoded (the tests check the pipeline's own count against it).
    """

    def __init__(self, files: list[SlideFile]):
        """``files`` as checked by :func:`inspect_files`.

        Frames a TILED_FULL level should have but that never arrived (a concatenation part
        missing, accepted only with ``allow_gaps``) read as glass, so they are never taken
        for tissue; ``missing_reads`` counts how often that happened, per level, and ``gaps``
        says what was missing, for the job's warning.
        """
        from wsidicom import WsiDicom
        from wsidicom.config import settings

        # We decode each frame once ourselves; wsidicom's own caches would only hold copies.
        settings.decoded_frame_cache_size = 0
        settings.encoded_frame_cache_size = 1
        self.files = files
        self._lock = threading.Lock()
        self.decodes: dict[int, int] = defaultdict(int)  # level index -> frames decoded
        try:
            self._wsi = WsiDicom.open([f.path for f in files])
        except Exception as exc:  # wsidicom raises many types; all mean the same to the operator
            raise BadInput(f"wsidicom cannot open the slide ({type(exc).__name__}: {exc}); check that the files are one complete WSI series") from exc
        headers_by_uid = {str(f.header.SOPInstanceUID): f.header for f in files}
        levels = []
        for i, level in enumerate(self._wsi.levels):
            spacing = level.pixel_spacing
            instances = list(level.instances.values())
            headers = tuple(
                headers_by_uid[str(ds.SOPInstanceUID)]
                for inst in instances
                for ds in inst.datasets
                if str(ds.SOPInstanceUID) in headers_by_uid
            )
            levels.append(
                LevelInfo(
                    index=i,
                    rows=level.size.height,
                    cols=level.size.width,
                    frame_rows=level.tile_size.height,
                    frame_cols=level.tile_size.width,
                    mm_per_px=max(spacing.width, spacing.height),
                    headers=headers,
                )
            )
        self.levels: tuple[LevelInfo, ...] = tuple(levels)
        self._image_data = [lvl.default_instance.image_data for lvl in self._wsi.levels]
        volumes = [f.header for f in files if f.image_flavor not in _CONTEXT_TYPES]
        self.gaps: tuple[str, ...] = tuple(g.message for g in series_gaps(volumes))
        self._absent = [_absent_frames(info) for info in self.levels] if self.gaps else []
        self.missing_reads: dict[int, int] = defaultdict(int)

    @classmethod
    def open(cls, paths: Iterable[Path], *, allow_gaps: bool = False) -> "DicomSlide":
        return cls(inspect_files(paths, allow_gaps=allow_gaps))

    @property
    def missing_frames_read(self) -> int:
        return sum(self.missing_reads.values())

    @property
    def context_files(self) -> list[SlideFile]:
        """LABEL / OVERVIEW / THUMBNAIL images: kept with the slide, never analysed."""
        return [f for f in self.files if f.image_flavor in _CONTEXT_TYPES]

    def read_frame(self, level: int, frame_row: int, frame_col: int) -> np.ndarray:
        """Decode one frame (RGB uint8, frame_rows x frame_cols).  Absent sparse frames are glass."""
        from wsidicom.geometry import Point

        data = self._image_data[level]
        info = self.levels[level]
        if self._absent and (frame_row, frame_col) in self._absent[level]:
            with self._lock:
                self.missing_reads[level] += 1
            return np.full((info.frame_rows, info.frame_cols, 3), 255, dtype=np.uint8)
        point = Point(frame_col, frame_row)
        try:
            with self._lock:  # file reads share one handle per file
                encoded = data.get_encoded_tile(point, data.default_z, data.default_path)
            image = data.decoder.decode(encoded)
        except Exception as exc:
            where = f"frame (row {frame_row}, column {frame_col}) of level {level} ({info.cols}x{info.rows} px)"
            if not is_corrupt_data(exc):
                # A bug (ours or a decoder's), a missing codec, memory, a disk error: the job is
                # retried and fails as an internal error, never as "re-send the series".
                exc.add_note(f"while decoding {where}: not a data error, report it with this traceback")
                raise
            raise BadInput(
                f"{where} cannot be read or decoded ({type(exc).__name__}: {exc}); "
                "the file is truncated or corrupt, re-send the series"
            ) from exc
        self.decodes[level] += 1
        array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        if array.shape[:2] != (info.frame_rows, info.frame_cols):
            full = np.full((info.frame_rows, info.frame_cols, 3), 255, dtype=np.uint8)
            full[: array.shape[0], : array.shape[1]] = array[: info.frame_rows, : info.frame_cols]
            array = full
        return array

    def close(self) -> None:
        self._wsi.close()

    def __enter__(self) -> "DicomSlide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What reading and decoding bad bytes raises, besides the decoding libraries' own exceptions:
# truncated reads (EOFError, struct.error), a decoder refusing the stream (PIL: OSError with no
# errno, UnidentifiedImageError, SyntaxError; raw frames of the wrong length: ValueError),
# a broken deflate stream (zlib.error).
_DATA_ERRORS = (EOFError, ValueError, SyntaxError, struct.error, zlib.error)
# Libraries whose own exception classes mean "these bytes are not a valid frame".
_DECODER_PACKAGES = frozenset({"PIL", "imagecodecs", "pydicom", "wsidicom", "pylibjpeg", "openjpeg", "pyjpegls", "libjpeg"})


def is_corrupt_data(exc: BaseException) -> bool:
    """Did reading or decoding a frame fail because of its bytes (``BadInput``: re-send), rather
    than a bug, a missing codec, memory or the disk (retried, reported as an internal error)?

    Corrupt: :data:`_DATA_ERRORS`, an ``OSError`` without errno (PIL's "image file is truncated",
    "cannot identify image file"), or an exception class of a decoding library (imagecodecs'
    ``Jpeg8Error``, wsidicom's file errors, ...).  Not corrupt: ``TypeError``, ``AttributeError``,
    ``MemoryError``, any ``ImportError`` (a codec not installed), an ``OSError`` with an errno
    (the disk or the network file system), wsidicom's out-of-bounds error (a wrong frame index).
    """
    if isinstance(exc, ImportError):
        return False
    if isinstance(exc, OSError):
        return exc.errno is None
    if isinstance(exc, _DATA_ERRORS):
        return True
    cls = type(exc)
    return cls.__module__.split(".")[0] in _DECODER_PACKAGES and cls.__name__ != "WsiDicomOutOfBoundsError"

