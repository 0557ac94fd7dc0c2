"""One intake path for every instance that reaches the node, by C-STORE or DICOMweb pull.

Both the C-STORE SCP (:mod:`glio_node.receive.scp`) and the poller
(:mod:`glio_node.pull.poller`) hand a file in the spool's ``incoming/`` folder to the same steps:

1. :func:`admit`: parse the header (never the frames) with :func:`read_instance`, check the
   UIDs and the SOP class, then :func:`check_instance`: would a VL WSI reader be able to use
   this instance?  Anything else is an :class:`InstanceRefused` with its status from
   :mod:`glio_node.receive.statuses`;
2. :func:`spool_instance`: fsync and rename into place;
3. :func:`record`: the instance row, its series and the ``instance_received`` audit row, in the
   caller's transaction;
4. :func:`audit_refusal`: the ``instance_refused`` audit row of an instance that was not taken.

:func:`accept` runs 2-3 for one C-STORE (with the duplicate, pause and disk checks in between);
the poller runs them for a whole series, recording it in one transaction.

Why check at intake: a slide that no reader can use would otherwise be answered success, spooled
and fail its job minutes later, where the PACS administrator does not look.  A refusal at routing
time shows in the PACS's own log next to the instance.  The checks read the header and walk the
encapsulated fragment items (8 bytes each, plus the first 4 bytes of each fragment), so they cost
a few milliseconds even for a 100 000-frame base level; pixel data is never decoded.
"""

from __future__ import annotations

import enum
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
)
from pydicom.valuerep import VR
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from glio_node.errors import BadInput
from glio_node.receive.spool import Spool, StoredFile, checked_uid
from glio_node.receive.statuses import InstanceRefused, Refusal
from glio_node.store import audit
from glio_node.store.audit import Event
from glio_node.store.actions import intake_paused
from glio_node.store.db import writer_turn
from glio_node.store.instances import ReceivedInstance, instance_exists, record_instance

# What scanners and PACS send whole-slide images in.  Deflate is accepted too (rare for WSI).
WSI_TRANSFER_SYNTAXES = (
    JPEGBaseline8Bit,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
)

# How each compressed transfer syntax's frames begin (the codestream's first marker), so a frame
# in another codec than the one negotiated is caught without decoding it.
_FRAME_STARTS: dict[str, tuple[tuple[bytes, ...], str]] = {
    JPEGBaseline8Bit: ((b"\xff\xd8",), "a JPEG SOI marker (FF D8)"),
    JPEGLSLossless: ((b"\xff\xd8",), "a JPEG-LS SOI marker (FF D8)"),
    JPEGLSNearLossless: ((b"\xff\xd8",), "a JPEG-LS SOI marker (FF D8)"),
    # A J2K codestream (SOC + SIZ); some writers wrap it in a JP2 file, which decoders read too.
    JPEG2000Lossless: ((b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c"), "a JPEG 2000 SOC marker (FF 4F)"),
    JPEG2000: ((b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c"), "a JPEG 2000 SOC marker (FF 4F)"),
}

# Limits on what a reader can use.  A frame is decoded whole: tiles are 256-2048 px, label and
# overview images a few thousand; 16384 px a side is already 768 MiB of RGB.  A slide is at most
# 75 mm long; at 0.1 um/px that is 750 000 px.
MAX_FRAME_SIDE = 16_384
MAX_MATRIX_SIDE = 1_000_000
MAX_FRAMES = 10_000_000
_MAX_OFFSET_TABLE = 4 * MAX_FRAMES

# What pydicom raises on malformed bytes: a bad dataset is the sender's problem, not a crash.
PARSE_ERRORS: tuple[type[BaseException], ...] = (
    InvalidDicomError,
    BytesLengthException,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    EOFError,
    OSError,
    NotImplementedError,
    OverflowError,
    struct.error,
    zlib.error,
)

_VRS = {vr.value.encode("ascii") for vr in VR}
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_UNDEFINED = 0xFFFFFFFF


# ------------------------------------------------------------------------------------------
# What the bytes say (read from the file, no frame decoded)


@dataclass(frozen=True)
class PixelData:
    """The Pixel Data element (7FE0,0010) as laid out in the file."""

    encapsulated: bool  # undefined length: fragment items follow
    length: int | None  # native: the declared value length
    available: int  # bytes from the value's first byte to the end of the file
    offset_table: tuple[int, ...] = ()  # encapsulated: the Basic Offset Table (empty if none)
    offset_table_bytes: int = 0  # its item's length (a multiple of 4 when it is well formed)
    fragments: tuple[int, ...] = ()  # encapsulated: each fragment item's offset, BOT convention
    starts: tuple[bytes, ...] = ()  # the first (up to) 4 bytes of each fragment
    broken: str | None = None  # encapsulated: why the item walk stopped before the delimiter


@dataclass(frozen=True)
class Encoding:
    """How the dataset is encoded, from its bytes."""

    transfer_syntax: str  # the file meta's (for a C-STORE, pynetdicom writes the negotiated one)
    explicit_vr: bool | None  # what the first data element looks like; None if not known
    pixel_data: PixelData | None  # None: the file has no Pixel Data element
    overrun: str | None = None  # a header element whose length runs past the end of the data


@dataclass(frozen=True)
class Problem:
    """Why no reader can use an instance: the refusal (status) and the detail, without UIDs."""

    refusal: Refusal
    detail: str


def read_instance(path: Path) -> tuple[Dataset, Encoding]:
    """The header of ``path`` (no pixel data) and how it is encoded.

    Raises :class:`InstanceRefused` (``UNPARSABLE``) when the file cannot be parsed.  Reads the
    header, then walks the fragment items of encapsulated pixel data by their lengths (seeking
    past each fragment); a Deflated file is inflated whole, as pydicom must.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as fp:
            read_preamble(fp, False)
            _read_file_meta_info(fp)
            data_start = fp.tell()
            fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            # Values are decoded lazily: touch the ones every caller needs while errors are caught.
            for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
                ds.get(keyword)
            syntax = str(ds.file_meta.TransferSyntaxUID)
            if syntax == DeflatedExplicitVRLittleEndian:
                return ds, Encoding(syntax, None, _pixel_data_inflated(path), _overrun(ds))
            pixel_start = fp.tell()
            fp.seek(data_start)
            explicit = _looks_explicit(fp.read(6))
            fp.seek(pixel_start)
            pixel = _scan_pixel_data(fp, size, explicit=not ds.file_meta.TransferSyntaxUID.is_implicit_VR)
            overrun = _overrun(ds)
    except PARSE_ERRORS as exc:
        raise InstanceRefused(Refusal.UNPARSABLE, f"{type(exc).__name__}: {exc}"[:300]) from exc
    return ds, Encoding(syntax, explicit, pixel, overrun)


def _overrun(ds: Dataset) -> str | None:
    """The first top-level element that declares more bytes than the file has left (pydicom
    reads what there is without a word, and the elements after it are gone)."""
    for element in ds.elements():
        if not isinstance(element, RawDataElement):
            continue
        value, length = element.value, element.length
        if isinstance(value, bytes) and length != _UNDEFINED and len(value) < length:
            return (
                f"element ({element.tag.group:04X},{element.tag.element:04X}) declares {length} "
                f"bytes, the data ends after {len(value)}"
            )
    return None


def _looks_explicit(head: bytes) -> bool | None:
    """pydicom's own test: the two bytes after the first tag spell a VR."""
    return None if len(head) < 6 else head[4:6] in _VRS


def _scan_pixel_data(fp: BinaryIO, size: int, *, explicit: bool) -> PixelData | None:
    """Read the Pixel Data element header at ``fp``'s position and walk its fragment items."""
    head = fp.read(8)
    if len(head) < 8 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
        return None
    if explicit and head[4:6] in _LONG_LENGTH_VRS:
        more = fp.read(4)
        if len(more) < 4:
            return PixelData(False, None, 0, broken="the data ends inside the Pixel Data header")
        length = struct.unpack("<I", more)[0]
    elif explicit:
        length = struct.unpack("<H", head[6:8])[0]
    else:
        length = struct.unpack("<I", head[4:8])[0]
    start = fp.tell()
    available = size - start
    if length != _UNDEFINED:
        return PixelData(False, length, available)

    offset_table: tuple[int, ...] = ()
    table_bytes = 0
    fragments: list[int] = []
    starts: list[bytes] = []
    broken: str | None = None
    base: int | None = None  # the first fragment item's position: offset 0 of the BOT
    pos = start
    while True:
        fp.seek(pos)
        item = fp.read(12)
        if len(item) < 8:
            broken = "the data ends before the sequence delimiter (undelimited pixel data)"
            break
        group, element, n = struct.unpack("<HHI", item[:8])
        if (group, element) == _SEQUENCE_DELIMITER:
            break
        if (group, element) != _ITEM:
            broken = (
                f"({group:04X},{element:04X}) where a fragment item or the sequence delimiter "
                f"was expected, at byte {pos - start} of the pixel data"
            )
            break
        if n == _UNDEFINED or pos + 8 + n > size:
            broken = f"an item of {n} bytes runs past the end of the data, at byte {pos - start}"
            break
        if base is None:  # the first item is the Basic Offset Table
            if n > _MAX_OFFSET_TABLE:
                broken = f"a Basic Offset Table of {n} bytes"
                break
            table_bytes = n
            raw = (item[8:] + fp.read(max(0, n - 4)))[:n]
            offset_table = struct.unpack(f"<{n // 4}I", raw[: n // 4 * 4])
            base = pos + 8 + n
        else:
            fragments.append(pos - base)
            starts.append(item[8 : 8 + min(n, 4)])
        pos += 8 + n
    return PixelData(
        True, None, available, offset_table, table_bytes, tuple(fragments), tuple(starts), broken
    )


def _pixel_data_inflated(path: Path) -> PixelData | None:
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        return None
    element = ds["PixelData"]
    if element.is_undefined_length:
        return PixelData(True, None, 0)  # encapsulated in a native syntax: refused as such
    length = len(element.value or b"")
    return PixelData(False, length, length)


# ------------------------------------------------------------------------------------------
# The checks (pure)


class _Found(Exception):
    def __init__(self, problem: Problem):
        self.problem = problem


def check_instance(dataset: Dataset, transfer_syntax: str, encoding: Encoding) -> Problem | None:
    """Why a VL WSI reader could not use this instance, or None when it can.

    ``dataset``: the header (as :func:`read_instance` returns it); ``transfer_syntax``: the one
    negotiated for the C-STORE, or for a pulled file the one it says it is in.  Checks, in order:
    the transfer syntax and whether the bytes are in it; the attributes a reader needs to place
    frames (present, readable, within the limits above); and that the pixel data holds
    NumberOfFrames frames: delimited fragments, no fewer than the frames, an offset table that
    points at them, each frame starting with its codec's marker; or native data of exactly
    Rows x Columns x SamplesPerPixel x BitsAllocated/8 x NumberOfFrames bytes.
    """
    try:
        _check_encoding(transfer_syntax, encoding)
        frames = _check_header(dataset)
        _check_pixel_data(dataset, transfer_syntax, encoding.pixel_data, frames)
    except _Found as found:
        return found.problem
    return None


def _fail(refusal: Refusal, detail: str) -> _Found:
    return _Found(Problem(refusal, detail))


def _check_encoding(transfer_syntax: str, encoding: Encoding) -> None:
    if transfer_syntax not in WSI_TRANSFER_SYNTAXES:
        raise _fail(
            Refusal.TRANSFER_SYNTAX_UNSUPPORTED,
            f"transfer syntax {transfer_syntax} is not one the node reads",
        )
    if encoding.transfer_syntax != transfer_syntax:
        raise _fail(
            Refusal.TRANSFER_SYNTAX_MISMATCH,
            f"the file says {encoding.transfer_syntax}, the association negotiated {transfer_syntax}",
        )
    if encoding.overrun:
        raise _fail(Refusal.TRUNCATED, encoding.overrun)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    if encoding.explicit_vr is not None and encoding.explicit_vr == implicit:
        raise _fail(
            Refusal.TRANSFER_SYNTAX_MISMATCH,
            f"the dataset is encoded in {'explicit' if implicit else 'implicit'} VR, the "
            f"transfer syntax is {'implicit' if implicit else 'explicit'} VR",
        )


def _check_header(ds: Dataset) -> int:
    """The attributes a reader needs to place frames; returns NumberOfFrames."""
    for keyword, low, high in (("Rows", 1, MAX_FRAME_SIDE), ("Columns", 1, MAX_FRAME_SIDE)):
        _int(ds, keyword, low, high)
    samples = _int(ds, "SamplesPerPixel", 1, 3)
    if samples not in (1, 3):
        raise _fail(Refusal.VALUE_OUT_OF_RANGE, f"SamplesPerPixel {samples} is not 1 or 3")
    bits = _int(ds, "BitsAllocated", 1, 16)
    if bits not in (8, 16):
        raise _fail(Refusal.VALUE_OUT_OF_RANGE, f"BitsAllocated {bits} is not 8 or 16")
    frames = _int(ds, "NumberOfFrames", 1, MAX_FRAMES)
    columns = _int(ds, "TotalPixelMatrixColumns", 1, MAX_MATRIX_SIDE)
    rows = _int(ds, "TotalPixelMatrixRows", 1, MAX_MATRIX_SIDE)
    planes = _int(ds, "TotalPixelMatrixFocalPlanes", 1, 10_000, required=False) or 1
    paths = _int(ds, "NumberOfOpticalPaths", 1, 10_000, required=False) or 1
    offset = _int(ds, "ConcatenationFrameOffsetNumber", 0, MAX_FRAMES, required=False) or 0
    _check_spacing(ds)
    organization = _text(ds, "DimensionOrganizationType")
    if organization == "TILED_FULL":
        grid = (
            math.ceil(columns / int(ds.Columns)) * math.ceil(rows / int(ds.Rows)) * planes * paths
        )
        if offset + frames > grid:
            raise _fail(
                Refusal.FRAMES_MISMATCH,
                f"{offset + frames} frames (ConcatenationFrameOffsetNumber {offset} + "
                f"NumberOfFrames {frames}) are more than the TILED_FULL grid of a "
                f"{columns} x {rows} px matrix in {ds.Columns} x {ds.Rows} px tiles holds ({grid})",
            )
    try:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        count = None if per_frame is None else len(per_frame)
    except PARSE_ERRORS as exc:
        detail = f"PerFrameFunctionalGroupsSequence: {type(exc).__name__}"
        raise _fail(Refusal.VALUE_UNREADABLE, detail) from exc
    if count is not None and count != frames:
        raise _fail(
            Refusal.FRAMES_MISMATCH,
            f"PerFrameFunctionalGroupsSequence has {count} items for NumberOfFrames {frames}",
        )
    return frames


def _int(ds: Dataset, keyword: str, low: int, high: int, *, required: bool = True) -> int | None:
    value = _value(ds, keyword)
    if value is None or value == "":
        if required:
            raise _fail(Refusal.ATTRIBUTE_MISSING, f"{keyword} is missing or empty")
        return None
    if isinstance(value, MultiValue | list | tuple):
        raise _fail(Refusal.VALUE_UNREADABLE, f"{keyword} has {len(value)} values, not one")
    try:
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise _fail(Refusal.VALUE_UNREADABLE, f"{keyword} {str(value)[:20]!r} is not an integer") from None
    if not low <= number <= high:
        raise _fail(Refusal.VALUE_OUT_OF_RANGE, f"{keyword} {int(number)} is outside {low}..{high}")
    return int(number)


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds[keyword].value if keyword in ds else None
    except PARSE_ERRORS as exc:
        raise _fail(Refusal.VALUE_UNREADABLE, f"{keyword}: {type(exc).__name__}") from exc


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _value(ds, keyword)
    if value is None:
        return None
    if isinstance(value, bytes):
        raise _fail(Refusal.VALUE_UNREADABLE, f"{keyword} is not text")
    return str(value).strip()


def _check_spacing(ds: Dataset) -> None:
    """PixelSpacing, when present, is two positive numbers (its absence is reported by the job,
    which names what to fix in the converter)."""
    try:
        shared = ds.get("SharedFunctionalGroupsSequence")
        measures = shared[0].get("PixelMeasuresSequence") if shared else None
        item = measures[0] if measures else None
    except PARSE_ERRORS as exc:
        detail = f"SharedFunctionalGroupsSequence: {type(exc).__name__}"
        raise _fail(Refusal.VALUE_UNREADABLE, detail) from exc
    if item is None or "PixelSpacing" not in item:
        return
    value = _value(item, "PixelSpacing")
    if value is None or value == "":
        return
    try:
        numbers = [float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value])]
    except (TypeError, ValueError):
        raise _fail(Refusal.VALUE_UNREADABLE, f"PixelSpacing {str(value)[:40]!r} is not numbers") from None
    if len(numbers) != 2:
        raise _fail(Refusal.VALUE_UNREADABLE, f"PixelSpacing has {len(numbers)} values, not 2")
    if not all(math.isfinite(v) and 0 < v < 1000 for v in numbers):
        raise _fail(Refusal.VALUE_OUT_OF_RANGE, f"PixelSpacing {numbers} mm is not positive and finite")


def _check_pixel_data(ds: Dataset, transfer_syntax: str, pixel: PixelData | None, frames: int) -> None:
    if pixel is None:
        raise _fail(
            Refusal.ATTRIBUTE_MISSING,
            "PixelData (7FE0,0010) is missing, or an earlier element's length runs past the end "
            "of the data",
        )
    if pixel.broken:
        raise _fail(Refusal.TRUNCATED, pixel.broken)
    compressed = transfer_syntax in _FRAME_STARTS
    if pixel.encapsulated != compressed:
        raise _fail(
            Refusal.TRANSFER_SYNTAX_MISMATCH,
            f"{'encapsulated' if pixel.encapsulated else 'native'} pixel data in a "
            f"{'compressed' if compressed else 'native'} transfer syntax ({transfer_syntax})",
        )
    if not pixel.encapsulated:
        _check_native(ds, pixel, frames)
        return
    if frames > len(pixel.fragments):
        raise _fail(
            Refusal.FRAMES_MISMATCH,
            f"NumberOfFrames {frames} is more than the {len(pixel.fragments)} fragment(s)",
        )
    frame_starts: list[int] = list(range(len(pixel.fragments))) if frames == len(pixel.fragments) else [0]
    if pixel.offset_table_bytes:
        if pixel.offset_table_bytes % 4 or len(pixel.offset_table) != frames:
            raise _fail(
                Refusal.FRAMES_MISMATCH,
                f"the Basic Offset Table has {pixel.offset_table_bytes} bytes, not 4 per frame "
                f"for NumberOfFrames {frames}",
            )
        where = {offset: i for i, offset in enumerate(pixel.fragments)}
        previous = -1
        frame_starts = []
        for n, offset in enumerate(pixel.offset_table, start=1):
            if offset not in where or offset <= previous:
                raise _fail(
                    Refusal.FRAMES_MISMATCH,
                    f"the Basic Offset Table's entry for frame {n} ({offset}) is not the start "
                    "of a fragment after the previous frame's",
                )
            frame_starts.append(where[offset])
            previous = offset
    _check_extended_offsets(ds, frames)
    markers, named = _FRAME_STARTS[transfer_syntax]
    for n, index in enumerate(frame_starts, start=1):
        start = pixel.starts[index]
        if not start.startswith(markers):
            raise _fail(
                Refusal.TRANSFER_SYNTAX_MISMATCH,
                f"frame {n} starts with {start.hex(' ') or 'nothing'}, not {named} as "
                f"{transfer_syntax} requires",
            )


def _check_extended_offsets(ds: Dataset, frames: int) -> None:
    value = _value(ds, "ExtendedOffsetTable")
    if value is not None and len(value) != 8 * frames:
        raise _fail(
            Refusal.FRAMES_MISMATCH,
            f"the Extended Offset Table has {len(value)} bytes, not 8 per frame for "
            f"NumberOfFrames {frames}",
        )


def _check_native(ds: Dataset, pixel: PixelData, frames: int) -> None:
    assert pixel.length is not None
    if pixel.length > pixel.available:
        raise _fail(
            Refusal.TRUNCATED,
            f"the Pixel Data length {pixel.length} runs past the end of the data "
            f"({pixel.available} bytes left)",
        )
    samples = int(ds.SamplesPerPixel)
    if _text(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        samples = 2  # native 4:2:2 stores two bytes per pixel (PS3.3 C.7.6.3.1.2)
    expected = int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated) // 8 * frames
    if pixel.length not in (expected, expected + 1):  # +1: the pad byte of an odd length
        raise _fail(
            Refusal.FRAMES_MISMATCH,
            f"native pixel data of {pixel.length} bytes, not the {expected} that NumberOfFrames "
            f"{frames} frames of {ds.Columns} x {ds.Rows} px hold",
        )


# ------------------------------------------------------------------------------------------
# Admission, spooling, recording, auditing


@dataclass(frozen=True)
class Peer:
    """Who sent it: the calling AE title (or the source's name) and "host:port"."""

    calling_ae: str
    address: str


def instance_uids(ds: Dataset) -> dict[str, str]:
    """The instance's SOP Instance, Series and Study UIDs, checked (they name spool paths)."""
    uids: dict[str, str] = {}
    for keyword, field in (
        ("SOPInstanceUID", "sop_instance_uid"),
        ("SeriesInstanceUID", "series_instance_uid"),
        ("StudyInstanceUID", "study_instance_uid"),
    ):
        uids[field] = _uid(ds, keyword, uids)
    return uids


def _uid(ds: Dataset, keyword: str, known: dict[str, str]) -> str:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        raise InstanceRefused(Refusal.MISSING_UID, f"{keyword} is missing or empty", known)
    try:
        return checked_uid(keyword, value)
    except BadInput as exc:
        raise InstanceRefused(Refusal.INVALID_UID, str(exc), known) from exc


def admit(
    path: Path,
    peer: Peer,
    *,
    sop_class_uid: str,
    transfer_syntax: str | None = None,
    sop_instance_uid: str | None = None,
) -> ReceivedInstance:
    """Everything about the file at ``path`` that is checked before it is stored.

    ``sop_class_uid`` (and ``sop_instance_uid``, for a C-STORE): what the request announced;
    ``transfer_syntax``: the negotiated one (None for a pulled file: the one its meta names).
    Returns what to record, with ``path`` the file as it is and no SHA-256 yet; raises
    :class:`InstanceRefused` with the reason.
    """
    ds, encoding = read_instance(path)
    uids = instance_uids(ds)
    dataset_class = _uid(ds, "SOPClassUID", uids)
    if sop_instance_uid is not None and uids["sop_instance_uid"] != sop_instance_uid:
        raise InstanceRefused(
            Refusal.SOP_INSTANCE_MISMATCH,
            f"dataset {uids['sop_instance_uid']}, request {sop_instance_uid}",
            uids,
        )
    if dataset_class != sop_class_uid:
        raise InstanceRefused(
            Refusal.SOP_CLASS_MISMATCH, f"dataset {dataset_class}, expected {sop_class_uid}", uids
        )
    problem = check_instance(ds, transfer_syntax or encoding.transfer_syntax, encoding)
    if problem is not None:
        raise InstanceRefused(problem.refusal, problem.detail, uids)
    return ReceivedInstance(
        sop_class_uid=dataset_class,
        transfer_syntax_uid=encoding.transfer_syntax,
        path=str(path),
        size_bytes=path.stat().st_size,
        sha256="",
        calling_ae=peer.calling_ae,
        address=peer.address,
        accession_number=accession_number(ds),
        **uids,
    )


def accession_number(header: Dataset) -> str | None:
    """The Accession Number (SH, at most 16 characters) for the audit search, or None."""
    try:
        value = str(header.get("AccessionNumber", "") or "").strip()
    except PARSE_ERRORS:  # a malformed optional element does not refuse the instance
        return None
    return value[:16] or None


def spool_instance(
    spool: Spool, admitted: ReceivedInstance, digest: tuple[str, int] | None = None
) -> ReceivedInstance:
    """Make the admitted file durable in the spool (:meth:`Spool.store`); what to record.

    Raises :class:`InstanceRefused` (``WRITE_FAILED``) when the disk fails."""
    try:
        stored: StoredFile = spool.store(
            Path(admitted.path),
            admitted.study_instance_uid,
            admitted.series_instance_uid,
            admitted.sop_instance_uid,
            digest=digest,
        )
    except OSError as exc:
        raise InstanceRefused(Refusal.WRITE_FAILED, f"{exc.strerror or exc}", _uids_of(admitted)) from exc
    return replace(admitted, path=str(stored.path), size_bytes=stored.size_bytes, sha256=stored.sha256)


def record(session: Session, received: ReceivedInstance, now: datetime) -> None:
    """The instance row, its series and the ``instance_received`` audit row, in ``session``."""
    record_instance(session, received, now)


def record_duplicate(session: Session, admitted: ReceivedInstance, now: datetime | None = None) -> None:
    """The ``instance_duplicate`` audit row of an instance already stored (not stored again)."""
    audit.record(
        session, Event.INSTANCE_DUPLICATE, at=now, calling_ae=admitted.calling_ae,
        address=admitted.address, **_uids_of(admitted),
    )


def audit_refusal(
    session: Session, peer: Peer, refused: InstanceRefused, uids: Mapping[str, str | None],
    now: datetime | None = None,
) -> None:
    """The ``instance_refused`` audit row: status, reason (the refusal's name) and detail."""
    audit.record(
        session,
        Event.INSTANCE_REFUSED,
        at=now,
        calling_ae=peer.calling_ae,
        address=peer.address,
        details={
            "status": f"0x{refused.refusal.status:04X}",
            "reason": refused.refusal.reason,
            "detail": refused.detail[:500],
        },
        **{**dict(uids), **refused.uids},
    )


def _uids_of(received: ReceivedInstance) -> dict[str, str]:
    return {
        "sop_instance_uid": received.sop_instance_uid,
        "series_instance_uid": received.series_instance_uid,
        "study_instance_uid": received.study_instance_uid,
    }


class Outcome(enum.Enum):
    """What :func:`accept` did with an admitted instance (both are answered success)."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # its SOP Instance UID was already stored; not stored again


def accept(
    sessions: sessionmaker[Session],
    spool: Spool,
    admitted: ReceivedInstance,
    *,
    digest: tuple[str, int] | None = None,
    now: datetime | None = None,
) -> Outcome:
    """Store and record one admitted instance; on return it is durable and recorded.

    In order: an instance already stored is a duplicate (audited, not stored again, even while
    intake is paused); intake paused by an operator, or the spool short of free space, refuse it
    (0xA700) before anything is written; then :func:`spool_instance` and :func:`record` in one
    transaction.  ``digest``: SHA-256 and size computed while it was received.  Raises
    :class:`InstanceRefused`; a database failure after the file was written removes the file.
    Each transaction takes its :func:`~glio_node.store.db.writer_turn` (several associations
    store at once); the fsyncs of the file and its folder run outside it, in parallel.
    """
    uids = _uids_of(admitted)
    try:
        with writer_turn(sessions), sessions.begin() as session:
            if instance_exists(session, admitted.sop_instance_uid):
                record_duplicate(session, admitted, now)
                return Outcome.DUPLICATE
            paused = intake_paused(session)
    except SQLAlchemyError as exc:
        raise InstanceRefused(Refusal.DATABASE_UNAVAILABLE, type(exc).__name__, uids) from exc
    if paused:
        # Status page "pause intake": refused before it is stored; the PACS keeps its copy and
        # sends it again later (0xA700 is a retryable "out of resources").
        raise InstanceRefused(Refusal.INTAKE_PAUSED, "an operator paused intake", uids)
    if not spool.has_room():
        raise InstanceRefused(
            Refusal.DISK_LOW,
            f"{spool.free_bytes()} bytes free, min_free_bytes {spool.min_free_bytes}",
            uids,
        )
    received = spool_instance(spool, admitted, digest)
    try:
        with writer_turn(sessions), sessions.begin() as session:
            record(session, received, now or datetime.now(UTC))
    except IntegrityError:
        # A concurrent association stored the same instance first: it is durable either way.
        with writer_turn(sessions), sessions.begin() as session:
            record_duplicate(session, admitted, now)
        return Outcome.DUPLICATE
    except SQLAlchemyError as exc:
        Path(received.path).unlink(missing_ok=True)
        raise InstanceRefused(Refusal.DATABASE_UNAVAILABLE, type(exc).__name__, uids) from exc
    return Outcome.STORED
