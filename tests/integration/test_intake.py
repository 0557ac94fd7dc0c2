"""Malformed slides are refused at routing time, as a PACS administrator would see it.

The story: a PACS routes VL Whole Slide Microscopy instances to the node.  Some are broken in ways
no reader can use (a converter bug, a disk that filled up mid-write, a router that relabelled the
transfer syntax).  Before issue 17 the node answered them 0x0000, spooled them, and the job failed
minutes later where the administrator does not look.  Now each one gets a failure status the
PACS logs next to the instance, an ``instance_refused`` audit row naming the problem, and nothing
is spooled; valid instances of every converter variant are still answered 0x0000.

Each case is cut from one valid synthetic instance with pydicom (or, for defects pydicom will not
write, by patching its bytes) and sent by DCMTK storescu, or by pynetdicom streaming the file's
bytes as they are where storescu would refuse to load or would re-encode the file.  The receiver
is the real one (start_receiver), on a loopback port with its own spool and SQLite database.
"""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from peers import require
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import VLWholeSlideMicroscopyImageStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import NodeSettings, Settings, StorageSettings
from glio_node.receive import Spool, start_receiver
from glio_node.receive.intake import Encoding, check_instance, read_instance
from glio_node.receive.statuses import Refusal
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.models import AuditEvent, Instance
from glio_node.synthetic.slide import SlideSpec, SyntheticSlide

needs_dcmtk = pytest.mark.needs("storescu")

# The valid instance the cases are cut from: 512 x 512 px in 256-px JPEG tiles, TILED_FULL.
BASE = SlideSpec(width_px=512, height_px=512, tile_size=256, levels=2, context_images=False)
NATIVE = replace(BASE, transfer_syntax="uncompressed")


@dataclass
class Node:
    port: int
    spool: Spool
    sessions: sessionmaker[Session]

    def refusals_of(self, sop_instance_uid: str) -> list[AuditEvent]:
        with self.sessions.begin() as s:
            return list(s.scalars(
                select(AuditEvent)
                .where(AuditEvent.event == "instance_refused")
                .where(AuditEvent.sop_instance_uid == sop_instance_uid)
            ))

    def stored(self, sop_instance_uid: str) -> bool:
        with self.sessions.begin() as s:
            row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).first()
        on_disk = any(self.spool.instances_dir.rglob(f"{sop_instance_uid}.dcm"))
        return row is not None or on_disk


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("intake-node")
    url = f"sqlite:///{root / 'glio.db'}"
    settings = Settings(
        node=NodeSettings(host="127.0.0.1", port=11112),
        storage=StorageSettings(spool_dir=root / "spool", database_url=url),
    )
    upgrade(url)
    engine = make_engine(url)
    spool = Spool(settings.storage.spool_dir)
    sessions = make_sessions(engine)
    server = start_receiver(settings, spool, sessions, address=("127.0.0.1", 0))
    yield Node(server.server_address[1], spool, sessions)
    server.shutdown()
    engine.dispose()


@pytest.fixture(scope="module")
def base(slide_cache) -> SyntheticSlide:
    return slide_cache.slide(BASE)


@pytest.fixture(scope="module")
def native(slide_cache) -> SyntheticSlide:
    return slide_cache.slide(NATIVE)


# ------------------------------------------------------------------------------------------
# Senders


def storescu(port: int, path: Path, *flags: str) -> int:
    """Send one file with DCMTK storescu; the status the node answered (from storescu's log)."""
    run = subprocess.run(
        ["storescu", "-d", "-aec", "GLIONODE", *flags, "127.0.0.1", str(port), str(path)],
        capture_output=True, text=True, timeout=60,
    )
    out = run.stdout + run.stderr
    found = re.findall(r"Status\s*:\s*0x([0-9A-Fa-f]{4})", out)
    assert found, f"storescu got no C-STORE response:\n{out[-2000:]}"
    return int(found[-1], 16)


def pynetdicom_raw(port: int, path: Path) -> int:
    """Send one file's bytes as they are (pynetdicom streams the dataset after the file meta,
    in the presentation context of the transfer syntax the meta names); the answered status."""
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VLWholeSlideMicroscopyImageStorage, syntax)
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="GLIONODE")
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(path)
            assert "Status" in rsp, "no answer from the node"
            return int(rsp.Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved


# ------------------------------------------------------------------------------------------
# Building the cases


def _fresh(path: Path) -> Dataset:
    """The instance at ``path`` with a new SOP Instance UID (each case is its own instance)."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _bytes(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _with_meta(ds: Dataset, body_syntax: str, meta_syntax: str) -> bytes:
    """A Part 10 file whose body is encoded in ``body_syntax`` but whose meta says ``meta_syntax``."""
    body = DicomBytesIO()
    body.is_little_endian = True
    body.is_implicit_VR = body_syntax == ImplicitVRLittleEndian
    write_dataset(body, ds)
    meta = DicomBytesIO()
    file_meta = ds.file_meta
    file_meta.TransferSyntaxUID = meta_syntax
    write_file_meta_info(meta, file_meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + body.getvalue()


def _pixel_start(data: bytes) -> int:
    """Where the Pixel Data element's tag begins."""
    fp = BytesIO(data)
    pydicom.dcmread(fp, stop_before_pixels=True)
    return fp.tell()


def _patch(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, f"{old!r} found {data.count(old)} times"
    return data.replace(old, new)


def _frames(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def _reencapsulated(ds: Dataset, frames: list[bytes], number_of_frames: int | None = None) -> Dataset:
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds.NumberOfFrames = len(frames) if number_of_frames is None else number_of_frames
    return ds


def rows_zero(s: SyntheticSlide, n: SyntheticSlide) -> bytes:
    # A frame of zero rows holds no pixels; the tile grid (ceil(matrix / Rows)) divides by zero.
    ds = _fresh(s.level_files[0])
    ds.Rows = 0
    return _bytes(ds)


def columns_absurd(s, n) -> bytes:
    # 60 000-px-wide frames: over 10 GB of RGB per frame to decode for one tile.
    ds = _fresh(s.level_files[0])
    ds.Columns = 60_000
    return _bytes(ds)


def total_matrix_zero(s, n) -> bytes:
    # A slide zero pixels wide: no level to choose, no raster to place results on.
    ds = _fresh(s.level_files[0])
    ds.TotalPixelMatrixColumns = 0
    return _bytes(ds)


def total_matrix_absurd(s, n) -> bytes:
    # 4 000 000 px tall: a 2-metre slide at 0.5 um/px; the label map alone would not fit in memory.
    ds = _fresh(s.level_files[0])
    ds.TotalPixelMatrixRows = 4_000_000
    return _bytes(ds)


def frames_missing(s, n) -> bytes:
    # Without NumberOfFrames a reader cannot tell how many tiles the fragments hold.
    ds = _fresh(s.level_files[0])
    del ds.NumberOfFrames
    return _bytes(ds)


def frames_zero(s, n) -> bytes:
    # Zero frames: an instance of a level that has no tiles.
    ds = _fresh(s.level_files[0])
    ds.NumberOfFrames = 0
    return _bytes(ds)


def frames_unreadable(s, n) -> bytes:
    # NumberOfFrames "x": not an integer (pydicom will not write it, so the bytes are patched).
    data = _bytes(_fresh(s.level_files[0]))
    return _patch(data, b"\x28\x00\x08\x00IS\x02\x004 ", b"\x28\x00\x08\x00IS\x02\x00x ")


def rows_unreadable(s, n) -> bytes:
    # Rows (US) of 3 bytes: not a 16-bit number; the file is otherwise intact.
    data = _bytes(_fresh(s.level_files[0]))
    return _patch(data, b"\x28\x00\x10\x00US\x02\x00\x00\x01", b"\x28\x00\x10\x00US\x03\x00\x00\x01\x00")


def spacing_unreadable(s, n) -> bytes:
    # PixelSpacing of letters: the pipeline cannot size its tiles in micrometres.
    data = _bytes(_fresh(s.level_files[0]))
    tag = b"\x28\x00\x30\x00DS"
    at = data.index(tag) + 6
    (length,) = struct.unpack_from("<H", data, at)
    return data[: at + 2] + b"a" * (length - 2) + b"\\b" + data[at + 2 + length :]


def spacing_zero(s, n) -> bytes:
    # Zero spacing: every area and every level choice would be a division by zero.
    ds = _fresh(s.level_files[0])
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [0, 0]
    return _bytes(ds)


def frames_beyond_fragments(s, n) -> bytes:
    # NumberOfFrames 4 but only 2 fragments: frames 3 and 4 do not exist (a cut-off converter).
    ds = _fresh(s.level_files[0])
    return _bytes(_reencapsulated(ds, _frames(ds)[:2], number_of_frames=4))


def frames_beyond_grid(s, n) -> bytes:
    # A TILED_FULL level of one 256-px tile that claims 3 frames: frames 2 and 3 have no place.
    ds = _fresh(s.level_files[1])
    return _bytes(_reencapsulated(ds, _frames(ds) * 3))


def offset_table_wrong(s, n) -> bytes:
    # The Basic Offset Table's second entry points 2 bytes into the first fragment, so a reader
    # that trusts it (wsidicom does) decodes frame 2 from the middle of frame 1.
    ds = _fresh(s.level_files[0])
    data = _bytes(_reencapsulated(ds, _frames(ds)))
    table = _pixel_start(data) + 12 + 8  # tag + VR + reserved + length, then the BOT item header
    (second,) = struct.unpack_from("<I", data, table + 4)
    return data[: table + 4] + struct.pack("<I", second - 2) + data[table + 8 :]


def codec_mismatch(s, n) -> bytes:
    # JPEG 2000 codestreams in a JPEG Baseline context: a JPEG decoder fails on every frame.
    ds = _fresh(s.level_files[0])
    frames = [b"\xff\x4f\xff\x51" + f[4:] for f in _frames(ds)]
    return _bytes(_reencapsulated(ds, frames))


def native_in_compressed(s, n) -> bytes:
    # Uncompressed pixels, but the meta (and so the presentation context) says JPEG Baseline.
    ds = _fresh(n.level_files[0])
    return _with_meta(ds, ExplicitVRLittleEndian, JPEGBaseline8Bit)


def explicit_in_implicit(s, n) -> bytes:
    # Explicit VR bytes sent in an Implicit VR context: each element's VR is read as its length.
    ds = _fresh(n.level_files[0])
    return _with_meta(ds, ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def truncated(s, n) -> bytes:
    # The file cut in the middle of its pixel data (a disk full on the sender's side).
    data = _bytes(_fresh(s.level_files[0]))
    start = _pixel_start(data)
    return data[: start + (len(data) - start) // 2]


def undelimited(s, n) -> bytes:
    # Every fragment there, but no sequence delimiter: a reader cannot know the last is the last.
    data = _bytes(_fresh(s.level_files[0]))
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    return data[:-8]


def fragment_past_end(s, n) -> bytes:
    # The last fragment's item declares 1 MiB more than the data holds.
    data = bytearray(_bytes(_fresh(s.level_files[0])))
    last = data.rfind(b"\xfe\xff\x00\xe0")
    (length,) = struct.unpack_from("<I", data, last + 4)
    struct.pack_into("<I", data, last + 4, length + (1 << 20))
    return bytes(data)


def native_past_end(s, n) -> bytes:
    # Uncompressed Pixel Data whose declared length runs 1000 bytes past the end of the file.
    data = _bytes(_fresh(n.level_files[0]))
    return data[:-1000]


def header_past_end(s, n) -> bytes:
    # TotalPixelMatrixFocalPlanes (UL) declaring 65 000 bytes: pydicom would read the pixel data
    # into it without a word, and the instance would seem to have no pixels at all.
    data = _bytes(_fresh(s.level_files[1]))
    return _patch(data, b"\x48\x00\x03\x03UL\x04\x00", b"\x48\x00\x03\x03UL\xe8\xfd")


def garbage_dataset(s, n) -> bytes:
    # A valid file meta followed by random bytes: nothing to parse, but it must still be answered.
    # (pydicom reads random bytes as elements of random tags; none of them is a UID.)
    data = _bytes(_fresh(s.level_files[1]))
    meta_end = 144 + struct.unpack_from("<I", data, 140)[0]  # after (0002,0000) and its group
    rng = np.random.default_rng(17)
    return data[:meta_end] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()


@dataclass(frozen=True)
class Case:
    build: Callable[[SyntheticSlide, SyntheticSlide], bytes]
    status: int
    reason: str
    detail: str  # a regular expression the audit row's detail must match
    sender: str = "pynetdicom"  # or "storescu"


CASES = {
    case.build.__name__: case
    for case in (
        Case(rows_zero, 0xA900, "value_out_of_range", r"Rows 0 is outside", "storescu"),
        Case(columns_absurd, 0xA900, "value_out_of_range", r"Columns 60000 is outside", "storescu"),
        Case(total_matrix_zero, 0xA900, "value_out_of_range", r"TotalPixelMatrixColumns 0", "storescu"),
        Case(total_matrix_absurd, 0xA900, "value_out_of_range", r"TotalPixelMatrixRows 4000000", "storescu"),
        Case(frames_missing, 0xA900, "attribute_missing", r"NumberOfFrames is missing", "storescu"),
        Case(frames_zero, 0xA900, "value_out_of_range", r"NumberOfFrames 0 is outside", "storescu"),
        Case(frames_unreadable, 0xA900, "value_unreadable", r"NumberOfFrames 'x' is not an integer", "storescu"),
        Case(rows_unreadable, 0xA900, "value_unreadable", r"Rows: BytesLengthException"),
        Case(spacing_unreadable, 0xA900, "value_unreadable", r"PixelSpacing .* is not numbers", "storescu"),
        Case(spacing_zero, 0xA900, "value_out_of_range", r"PixelSpacing \[0.0, 0.0\]", "storescu"),
        Case(frames_beyond_fragments, 0xC222, "frames_mismatch", r"NumberOfFrames 4 is more than the 2 fragment", "storescu"),
        Case(frames_beyond_grid, 0xC222, "frames_mismatch", r"more than the TILED_FULL grid .* holds \(1\)", "storescu"),
        Case(offset_table_wrong, 0xC222, "frames_mismatch", r"Basic Offset Table's entry for frame 2"),
        Case(codec_mismatch, 0xC220, "transfer_syntax_mismatch", r"frame 1 starts with ff 4f ff 51, not a JPEG SOI", "storescu"),
        Case(native_in_compressed, 0xC220, "transfer_syntax_mismatch", r"native pixel data in a compressed"),
        Case(explicit_in_implicit, 0xC220, "transfer_syntax_mismatch", r"encoded in explicit VR"),
        Case(truncated, 0xC221, "truncated", r"runs past the end of the data"),
        Case(undelimited, 0xC221, "truncated", r"undelimited"),
        Case(fragment_past_end, 0xC221, "truncated", r"an item of \d+ bytes runs past the end"),
        Case(native_past_end, 0xC221, "truncated", r"Pixel Data length \d+ runs past the end"),
        Case(header_past_end, 0xC221, "truncated", r"\(0048,0303\) declares 65000 bytes"),
        Case(garbage_dataset, 0xC210, "missing_uid", r"SOPInstanceUID is missing"),
    )
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the values we broke
@pytest.mark.parametrize("name", list(CASES))
def test_a_malformed_instance_is_refused_audited_and_not_spooled(node, base, native, tmp_path, name):
    case = CASES[name]
    if case.sender == "storescu":
        require("storescu", "this case is sent by DCMTK storescu")
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(case.build(base, native))
    sop_instance_uid = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.MediaStorageSOPInstanceUID)

    if case.sender == "storescu":
        status = storescu(node.port, path, "-xy", "-R")
    else:
        status = pynetdicom_raw(node.port, path)

    assert status == case.status, f"0x{status:04X}"
    [refused] = node.refusals_of(sop_instance_uid)
    assert refused.details["status"] == f"0x{case.status:04X}"
    assert refused.details["reason"] == case.reason
    assert re.search(case.detail, refused.details["detail"]), refused.details["detail"]
    assert not node.stored(sop_instance_uid)
    assert list(node.spool.incoming_dir.iterdir()) == []


def test_every_refusal_of_the_catalogue_is_documented(node):
    """Each status and reason a PACS administrator may see is in docs/conformance.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "conformance.md").read_text()
    for refusal in Refusal:
        assert f"`{refusal.reason}`" in text, f"{refusal.reason} not in docs/conformance.md"
        assert f"0x{refusal.status:04X}" in text


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_hundred_mutated_instances_are_each_answered_and_none_accepted_is_unframed(
    node, base, tmp_path
):
    """What the issue's new user did, smaller: random byte flips, truncations, length changes,
    insertions and deletions after the file meta of a valid instance, sent in one association.
    Every one is answered, none by the receiver failing (0xC211), none refused leaves a file,
    and every one answered 0x0000 is one a reader can frame: pydicom reads it whole and finds
    NumberOfFrames frames, each starting with a JPEG marker (a frame corrupt inside its
    codestream is accepted: the checks never decode; its job fails later)."""
    import random

    original = _fresh(base.level_files[0])
    rng = random.Random(17)
    paths = []
    for i in range(200):
        uid = generate_uid()  # each its own instance, in the meta (what the request announces)
        original.SOPInstanceUID = original.file_meta.MediaStorageSOPInstanceUID = uid
        data = bytearray(_bytes(original))
        meta_end = 144 + struct.unpack_from("<I", data, 140)[0]
        kind = rng.choice(["flip", "truncate", "length", "insert", "delete"])
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(meta_end, len(data))  # the meta is what the request announces
            if kind == "flip":
                data[at] = rng.randrange(256)
            elif kind == "truncate":
                del data[at:]
                break
            elif kind == "length":
                data[at : at + 2] = struct.pack("<H", rng.randrange(65536))
            elif kind == "insert":
                data[at:at] = rng.randbytes(rng.randint(1, 8))
            else:
                del data[at : at + rng.randint(1, 8)]
        path = tmp_path / f"mutated-{i:03d}.dcm"
        path.write_bytes(bytes(data))
        paths.append((path, uid))

    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VLWholeSlideMicroscopyImageStorage, JPEGBaseline8Bit)
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    statuses = {}
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="GLIONODE")
        assert assoc.is_established
        try:
            for path, uid in paths:
                rsp = assoc.send_c_store(path)
                assert "Status" in rsp, f"{path.name}: no answer"
                statuses[uid] = (path, int(rsp.Status))
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved

    accepted = [(p, uid) for uid, (p, status) in statuses.items() if status == 0x0000]
    refused = [uid for uid, (_, status) in statuses.items() if status != 0x0000]
    assert 0xC211 not in {status for _, status in statuses.values()}
    assert accepted and len(refused) > 50, (len(accepted), len(refused))
    for uid in refused:
        assert not node.stored(uid) and len(node.refusals_of(uid)) == 1
    for path, uid in accepted:
        assert node.stored(uid)
        ds = pydicom.dcmread(path)
        frames = _frames(ds)
        assert len(frames) == int(ds.NumberOfFrames) and all(f[:2] == b"\xff\xd8" for f in frames)
    assert list(node.spool.incoming_dir.iterdir()) == []


# ------------------------------------------------------------------------------------------
# Valid instances of every converter variant are still accepted


_FLAGS = {
    "1.2.840.10008.1.2.4.50": ("-xy",),
    "1.2.840.10008.1.2.4.90": ("-xv",),
    "1.2.840.10008.1.2.4.91": ("-xw",),
    "1.2.840.10008.1.2.1": ("-xe",),
}


def _all_accepted(node: Node, files) -> None:
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        status = storescu(node.port, path, *_FLAGS[str(ds.file_meta.TransferSyntaxUID)], "-R")
        assert status == 0x0000, f"{path.name}: 0x{status:04X} {node.refusals_of(ds.SOPInstanceUID)[0].details}"
        assert node.stored(str(ds.SOPInstanceUID)), path.name


VARIANTS = {
    "jpeg-with-label-and-overview": SlideSpec(width_px=512, height_px=512, tile_size=256, levels=2, seed=5),
    "tiled-sparse-shuffled-background-omitted": SlideSpec(
        width_px=512, height_px=512, tile_size=128, levels=2, context_images=False, seed=6,
        dimension_organization="TILED_SPARSE", shuffle_frames=True, omit_background_frames=True,
    ),
    "concatenations": SlideSpec(
        width_px=512, height_px=512, tile_size=128, levels=2, context_images=False, seed=7, frames_per_file=5
    ),
    "jpeg2000-lossless": SlideSpec(
        width_px=512, height_px=512, tile_size=256, levels=2, context_images=False, seed=8,
        transfer_syntax="jpeg2000",
    ),
    "jpeg2000-lossy": SlideSpec(
        width_px=512, height_px=512, tile_size=256, levels=2, context_images=False, seed=9,
        transfer_syntax="jpeg2000", jpeg2000_lossless=False,
    ),
    "uncompressed": SlideSpec(
        width_px=512, height_px=512, tile_size=256, levels=2, context_images=False, seed=10,
        transfer_syntax="uncompressed",
    ),
}


@needs_dcmtk
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_valid_synthetic_variants_are_accepted(node, slide_cache, variant):
    _all_accepted(node, slide_cache.slide(VARIANTS[variant]).files)


@needs_dcmtk
def test_a_thumbnail_image_is_accepted(node, base, tmp_path):
    ds = _fresh(base.level_files[1])  # a THUMBNAIL is a small single-frame image of the slide
    ds.ImageType = ["DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED"]
    ds.save_as(tmp_path / "thumbnail.dcm", enforce_file_format=True)
    _all_accepted(node, [tmp_path / "thumbnail.dcm"])


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_uncompressed_instances_in_the_other_native_syntaxes_are_accepted(node, native, syntax):
    """Implicit VR and Deflated (pynetdicom encodes them; the node inflates Deflated whole)."""
    ds = _fresh(native.level_files[0])
    ds.file_meta.TransferSyntaxUID = syntax
    ds.set_original_encoding(syntax == ImplicitVRLittleEndian, True, ds.original_character_set)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VLWholeSlideMicroscopyImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="GLIONODE")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()
    assert node.stored(ds.SOPInstanceUID)


@needs_dcmtk
def test_orthanc_wsi_dicomizer_output_is_accepted(node, orthanc_slide):
    _all_accepted(node, orthanc_slide.files)


@needs_dcmtk
def test_wsidicomizer_output_is_accepted(node, wsidicomizer_slide):
    _all_accepted(node, wsidicomizer_slide.files)


# ------------------------------------------------------------------------------------------
# The check itself, for what a C-STORE cannot carry (a pulled file has no negotiation)


def test_a_pulled_file_in_a_transfer_syntax_the_node_does_not_read_is_refused(base, tmp_path):
    path = tmp_path / "big-endian.dcm"
    path.write_bytes(_bytes(_fresh(base.level_files[0])))
    ds, encoding = read_instance(path)
    problem = check_instance(ds, "1.2.840.10008.1.2.2", replace_syntax(encoding, "1.2.840.10008.1.2.2"))
    assert problem is not None and problem.refusal is Refusal.TRANSFER_SYNTAX_UNSUPPORTED
    assert "1.2.840.10008.1.2.2 is not one the node reads" in problem.detail
    assert check_instance(ds, JPEGBaseline8Bit, encoding) is None  # the same file as it is


def replace_syntax(encoding: Encoding, syntax: str) -> Encoding:
    return replace(encoding, transfer_syntax=syntax)


# ------------------------------------------------------------------------------------------
# The DICOMweb pull goes through the same intake


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_malformed_instance_pulled_from_a_dicomweb_pacs_is_refused_like_a_c_store(
    slide_cache, tmp_path
):
    """A series in Orthanc holds a good slide and one instance whose converter stopped after
    two of its four frames; the poll takes the good ones and refuses that one with the same
    reason and audit row a C-STORE would get."""
    import urllib.request

    from orthanc_peer import Orthanc, free_port

    from glio_node.config import Source
    from glio_node.pull.poller import SourcePoller

    require("orthanc", "the DICOMweb PACS the node pulls from")
    require("orthanc-dicomweb", "the DICOMweb PACS the node pulls from")
    good = slide_cache.slide(replace(BASE, seed=21))
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(frames_beyond_fragments(good, good))
    bad_uid = str(pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID)

    url = f"sqlite:///{tmp_path / 'glio.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    spool = Spool(tmp_path / "spool")
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    try:
        for path in (*good.files, bad):
            request = urllib.request.Request(orthanc.url + "/instances", data=path.read_bytes(), method="POST")
            urllib.request.urlopen(request, timeout=30).close()
        poller = SourcePoller(Source("pacs-web", url=orthanc.dicomweb_url, poll_seconds=1), sessions, spool)
        assert poller.poll() == 0  # first sight: seen
        assert poller.poll() == 1  # its count held still: taken
    finally:
        orthanc.stop()
    try:
        with sessions.begin() as s:
            stored = {i.sop_instance_uid for i in s.scalars(select(Instance))}
            [refused] = s.scalars(select(AuditEvent).where(AuditEvent.event == "instance_refused"))
            [retrieved] = s.scalars(select(AuditEvent).where(AuditEvent.event == "series_retrieved"))
            s.expunge_all()
    finally:
        engine.dispose()
    assert stored == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in good.files}
    assert not any(spool.instances_dir.rglob(f"{bad_uid}.dcm"))
    assert (refused.sop_instance_uid, refused.calling_ae) == (bad_uid, "pacs-web")
    assert refused.details["status"] == "0xC222" and refused.details["reason"] == "frames_mismatch"
    assert retrieved.details["instances"] == len(good.files) + 1
    assert retrieved.details["stored"] == len(good.files)
    assert retrieved.details["ignored"] == [
        "0xC222 frames_mismatch: NumberOfFrames 4 is more than the 2 fragment(s)"
    ]
    assert list(spool.incoming_dir.iterdir()) == []
