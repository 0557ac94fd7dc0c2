"""The C-STORE SCP against real peers: DCMTK storescu / echoscu, and pynetdicom as an SCU.

Each test starts the receiver on a free loopback port with its own spool and SQLite database.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from peers import absent
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import VLWholeSlideMicroscopyImageStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import NodeSettings, Settings, StorageSettings
from glio_node.receive import Spool, start_receiver
from glio_node.store.db import make_engine, make_sessions, upgrade
from glio_node.store.models import AuditEvent, Instance, Series
from glio_node.synthetic.slide import SlideSpec, SyntheticSlide

needs_dcmtk = pytest.mark.needs("storescu", "echoscu")

RECEIVE_SPEC = SlideSpec(width_px=512, height_px=512, tile_size=256, levels=2, context_images=False)
ALLOWED = ("STORESCU", "ECHOSCU", "PYNETDICOM")


@dataclass
class Node:
    port: int
    spool: Spool
    sessions: sessionmaker[Session]

    def events(self, name: str | None = None) -> list[AuditEvent]:
        with self.sessions.begin() as s:
            stmt = select(AuditEvent).order_by(AuditEvent.id)
            if name:
                stmt = stmt.where(AuditEvent.event == name)
            return list(s.scalars(stmt))

    def instances(self) -> list[Instance]:
        with self.sessions.begin() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def spooled_files(self) -> list[Path]:
        return sorted(p for p in self.spool.instances_dir.rglob("*") if p.is_file())


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    servers = []
    engines = []

    def start(min_free_bytes: int = 0, allowed: tuple[str, ...] = ALLOWED) -> Node:
        url = f"sqlite:///{tmp_path / 'glio.db'}"
        settings = Settings(
            node=NodeSettings(host="127.0.0.1", port=11112, allowed_calling_ae_titles=allowed),
            storage=StorageSettings(
                spool_dir=tmp_path / "spool", database_url=url, min_free_bytes=min_free_bytes
            ),
        )
        upgrade(url)
        engine = make_engine(url)
        engines.append(engine)
        sessions = make_sessions(engine)
        spool = Spool(settings.storage.spool_dir, settings.storage.min_free_bytes)
        server = start_receiver(settings, spool, sessions, address=("127.0.0.1", 0))
        servers.append(server)
        return Node(server.server_address[1], spool, sessions)

    yield start
    for server in servers:
        server.shutdown()
    for engine in engines:
        engine.dispose()


@pytest.fixture
def node(start_node: Callable[..., Node]) -> Node:
    return start_node()


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    from glio_node.synthetic.slide import write_synthetic_slide

    return write_synthetic_slide(RECEIVE_SPEC, tmp_path_factory.mktemp("receive-slide"))


# A pynetdicom SCU that streams a file from disk (run in a subprocess so that the receiver's
# memory can be measured alone).
_STREAMING_SCU = """
import sys
from pynetdicom import AE, _config
from pynetdicom.sop_class import VLWholeSlideMicroscopyImageStorage
from pydicom.uid import ExplicitVRLittleEndian
_config.STORE_SEND_CHUNKED_DATASET = True
ae = AE(ae_title="PYNETDICOM")
ae.add_requested_context(VLWholeSlideMicroscopyImageStorage, ExplicitVRLittleEndian)
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="GLIONODE")
assert assoc.is_established
rsp = assoc.send_c_store(sys.argv[2])
assoc.release()
print(f"0x{rsp.Status:04X}")
"""


def storescu(port: int, files: list[Path], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aec", "GLIONODE", "-xy", "-R", *args, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def send(port: int, items: list[pydicom.Dataset | Path], transfer_syntax=JPEGBaseline8Bit) -> list[int]:
    """C-STORE each dataset or file with pynetdicom in one association; the statuses."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VLWholeSlideMicroscopyImageStorage, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="GLIONODE")
    assert assoc.is_established
    try:
        statuses = []
        for item in items:
            rsp = assoc.send_c_store(item)
            assert "Status" in rsp, "no answer from the node"
            statuses.append(int(rsp.Status))
        return statuses
    finally:
        assoc.release()


# ------------------------------------------------------------------------------------------


@needs_dcmtk
def test_storescu_slide_lands_durably_in_the_spool(node, slide):
    result = storescu(node.port, list(slide.files))
    assert result.returncode == 0, result.stderr

    instances = node.instances()
    assert len(instances) == len(slide.files) and len(node.spooled_files()) == len(slide.files)
    by_uid = {i.sop_instance_uid: i for i in instances}
    for original in slide.files:
        sent = pydicom.dcmread(original)
        row = by_uid[sent.SOPInstanceUID]
        stored_path = Path(row.path)
        assert stored_path == node.spool.instance_path(
            slide.study_instance_uid, slide.series_instance_uid, sent.SOPInstanceUID
        )
        stored = pydicom.dcmread(stored_path)
        assert stored.PixelData == sent.PixelData  # byte-identical frames
        assert stored == sent  # and every other element
        assert stored.file_meta.TransferSyntaxUID == JPEGBaseline8Bit == row.transfer_syntax_uid
        assert row.sha256 == hashlib.sha256(stored_path.read_bytes()).hexdigest()
        assert row.size_bytes == stored_path.stat().st_size
        assert row.calling_ae == "STORESCU"
    with node.sessions.begin() as s:
        series = s.scalars(select(Series)).one()
        assert series.instance_count == len(slide.files)
        assert series.series_instance_uid == slide.series_instance_uid

    [accepted] = node.events("association_accepted")
    assert accepted.calling_ae == "STORESCU" and accepted.address.startswith("127.0.0.1:")
    received = node.events("instance_received")
    assert len(received) == len(slide.files)
    assert {e.sop_instance_uid for e in received} == set(by_uid)
    assert all(e.details["sha256"] == by_uid[e.sop_instance_uid].sha256 for e in received)
    assert list(node.spool.incoming_dir.iterdir()) == []  # nothing left half-written


def test_chunked_receive_writes_on_the_spool_filesystem(node):
    from pynetdicom import dimse_messages

    assert _config.STORE_RECV_CHUNKED_DATASET
    with dimse_messages.NamedTemporaryFile() as f:  # what pynetdicom streams a C-STORE into
        assert Path(f.name).parent == node.spool.incoming_dir  # so storing is a rename


@needs_dcmtk
def test_resent_slide_is_recognised_not_stored_twice(node, slide):
    assert storescu(node.port, list(slide.files)).returncode == 0
    mtimes = [p.stat().st_mtime_ns for p in node.spooled_files()]
    result = storescu(node.port, list(slide.files))
    assert result.returncode == 0, result.stderr
    assert len(node.instances()) == len(slide.files)
    assert [p.stat().st_mtime_ns for p in node.spooled_files()] == mtimes
    assert len(node.events("instance_duplicate")) == len(slide.files)
    with node.sessions.begin() as s:
        assert s.scalars(select(Series.instance_count)).one() == len(slide.files)


@needs_dcmtk
def test_several_scanners_sending_at_once_each_slide_lands_once(node, slide, tmp_path):
    """Four associations at once (a thread each in the node, taking turns on the database):
    three different slides and a second copy of the first, sent while the first still arrives."""
    from dataclasses import replace

    from glio_node.synthetic.slide import write_synthetic_slide

    others = [write_synthetic_slide(replace(RECEIVE_SPEC, seed=n), tmp_path / f"slide{n}") for n in (1, 2)]
    sends = [list(slide.files), *(list(o.files) for o in others), list(slide.files)]
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", "GLIONODE", "-xy", "-R", "127.0.0.1", str(node.port), *map(str, files)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for files in sends
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "E:" not in err, err

    per_slide = len(slide.files)
    assert len(node.instances()) == 3 * per_slide == len(node.spooled_files())
    with node.sessions.begin() as s:
        counts = {row.series_instance_uid: row.instance_count for row in s.scalars(select(Series))}
    assert counts == {x.series_instance_uid: per_slide for x in (slide, *others)}
    assert len(node.events("instance_received")) == 3 * per_slide
    assert len(node.events("instance_duplicate")) == per_slide  # the second copy, not stored again
    assert len(node.events("association_accepted")) == 4
    assert list(node.spool.incoming_dir.iterdir()) == []


@needs_dcmtk
def test_unknown_calling_ae_is_rejected_and_audited(node, slide):
    result = storescu(node.port, list(slide.files[:1]), "-aet", "OTHER")
    assert result.returncode != 0
    assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()
    # pynetdicom runs the EVT_REJECTED handler after it has sent the A-ASSOCIATE-RJ, so the row
    # may land just after storescu has exited.
    deadline = time.monotonic() + 10
    while not node.events("association_rejected") and time.monotonic() < deadline:
        time.sleep(0.05)
    [rejected] = node.events("association_rejected")
    assert rejected.calling_ae == "OTHER"
    assert rejected.address.startswith("127.0.0.1:")
    assert rejected.details["reason"] == "calling AE title not allowed"
    assert node.events("association_accepted") == [] and node.instances() == []


@needs_dcmtk
def test_echoscu(node):
    result = subprocess.run(
        ["echoscu", "-aec", "GLIONODE", "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert node.events("association_accepted")[0].calling_ae == "ECHOSCU"


def _without(ds: pydicom.Dataset, keyword: str) -> pydicom.Dataset:
    delattr(ds, keyword)
    return ds


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the invalid UIDs we set
@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda ds: _without(ds, "SeriesInstanceUID"), "missing_uid"),
        (lambda ds: _without(ds, "StudyInstanceUID"), "missing_uid"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1.2/../../../../tmp/x") or ds, "invalid_uid"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "1." + "2" * 70) or ds, "invalid_uid"),
    ],
    ids=["no-series-uid", "no-study-uid", "path-in-uid", "long-uid"],
)
def test_malformed_dataset_gets_0xC210_and_the_association_goes_on(node, slide, mutate, reason):
    bad = mutate(pydicom.dcmread(slide.files[0]))
    good = slide.files[1]
    assert send(node.port, [bad, good]) == [0xC210, 0x0000]
    [refused] = node.events("instance_refused")
    assert refused.details["status"] == "0xC210" and refused.details["reason"] == reason
    assert refused.sop_instance_uid == bad.SOPInstanceUID and refused.calling_ae == "PYNETDICOM"
    assert [i.sop_instance_uid for i in node.instances()] == [pydicom.dcmread(good).SOPInstanceUID]
    assert len(node.spooled_files()) == 1 and list(node.spool.incoming_dir.iterdir()) == []
    escaped = (node.spool.instances_dir / "1.2/../../../../tmp/x").resolve()
    assert not escaped.exists()  # a UID is never a path


def test_unparsable_dataset_gets_0xC210(node, slide, tmp_path, monkeypatch):
    """A valid file meta, then a sequence cut off mid-item, sent raw (no re-encoding)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    ds = pydicom.dcmread(slide.files[0])
    with open(slide.files[0], "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        meta = slide.files[0].read_bytes()[: f.tell()]
    truncated_sequence = (
        b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1115) SQ, undefined length
        b"\xfe\xff\x00\xe0\x10\x00\x00\x00\x08\x00"  # an item of 16 bytes; 2 follow
    )
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(meta + truncated_sequence)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert send(node.port, [garbage, slide.files[1]]) == [0xC210, 0x0000]
    [refused] = node.events("instance_refused")
    assert refused.details["reason"] == "unparsable"
    assert refused.sop_instance_uid == ds.SOPInstanceUID  # from the request, for the trail
    assert len(node.instances()) == 1


def test_low_disk_refuses_with_0xA700(start_node, slide):
    node = start_node(min_free_bytes=10**18)
    assert send(node.port, [slide.files[0]]) == [0xA700]
    [refused] = node.events("instance_refused")
    assert refused.details["status"] == "0xA700" and refused.details["reason"] == "disk_low"
    assert refused.series_instance_uid == slide.series_instance_uid
    assert node.instances() == [] and node.spooled_files() == []
    assert list(node.spool.incoming_dir.iterdir()) == []


def test_empty_allow_list_accepts_any_calling_ae(start_node, slide):
    node = start_node(allowed=())
    assert send(node.port, [slide.files[0]]) == [0x0000]


def test_accepts_the_wsi_transfer_syntaxes(node):
    from pydicom.uid import (
        JPEG2000,
        DeflatedExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLSLossless,
        JPEGLSNearLossless,
    )

    wanted = [
        JPEGBaseline8Bit, JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless,
        ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ]
    ae = AE(ae_title="PYNETDICOM")
    for ts in wanted:  # one context per transfer syntax, as storescu proposes them
        ae.add_requested_context(VLWholeSlideMicroscopyImageStorage, ts)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="GLIONODE")
    try:
        assert sorted(cx.transfer_syntax[0] for cx in assoc.accepted_contexts) == sorted(wanted)
    finally:
        assoc.release()


def test_large_instance_is_streamed_to_disk_not_held_in_memory(node, slide, tmp_path):
    """64 MiB of uncompressed frames, sent by a pynetdicom SCU in another process, are received
    with a peak of a few MiB of Python memory (2.6 MiB measured): streamed to the spool."""
    ds = pydicom.dcmread(slide.level_files[0])
    frame_bytes = ds.Rows * ds.Columns * 3
    frames = (64 << 20) // frame_bytes
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PhotometricInterpretation = "RGB"
    ds.NumberOfFrames = frames
    # A valid instance (the receiver refuses more TILED_FULL frames than the matrix holds):
    # one row of `frames` tiles.
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = frames * ds.Columns, ds.Rows
    ds.PixelData = bytes(range(256)) * (frames * frame_bytes // 256)
    ds["PixelData"].VR = "OB"
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    size = ds["PixelData"].value.__len__()
    del ds

    tracemalloc.start()  # traces this process only: the receiver, not the sender
    try:
        result = subprocess.run(
            [sys.executable, "-c", _STREAMING_SCU, str(node.port), str(big)],
            capture_output=True, text=True, timeout=120,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0x0000"
    assert peak < size / 8, f"peak {peak / 2**20:.1f} MiB while receiving {size / 2**20:.0f} MiB"
    [row] = node.instances()
    stored = Path(row.path)
    assert stored.read_bytes()[-size:] == big.read_bytes()[-size:]
    assert row.size_bytes > size


# ------------------------------------------------------------------------------------------
# The spool on its own


def test_spool_renames_on_its_filesystem_and_copies_from_another(tmp_path):
    spool = Spool(tmp_path / "spool")
    same = spool.new_temp_file()
    same.write_bytes(b"abc")
    inode = same.stat().st_ino
    stored = spool.store(same, "1.2", "1.2.3", "1.2.3.4")
    assert stored.path == spool.instances_dir / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert stored.path.stat().st_ino == inode and not same.exists()  # renamed, not copied
    assert stored.sha256 == hashlib.sha256(b"abc").hexdigest() and stored.size_bytes == 3

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == spool.root.stat().st_dev:
        absent("no second filesystem (/dev/shm, a tmpfs) to copy from")
    with tempfile.NamedTemporaryFile(dir=shm, delete=False) as f:
        f.write(b"xyz")
    stored = spool.store(Path(f.name), "1.2", "1.2.3", "1.2.3.5")
    assert stored.path.read_bytes() == b"xyz" and not Path(f.name).exists()
    assert list(spool.incoming_dir.iterdir()) == []


@pytest.mark.parametrize("uid", ["", "1..2", "1.2/3", "../1", "1.2.", "1" * 65, "1.2 "])
def test_spool_paths_only_from_valid_uids(tmp_path, uid):
    from glio_node.errors import BadInput

    with pytest.raises(BadInput, match="is not a valid UID"):
        Spool(tmp_path).instance_path("1.2", "1.2.3", uid)


def test_database_failure_refuses_with_0xA701_and_keeps_no_file(node, slide):
    from sqlalchemy import text

    with node.sessions.begin() as s:  # the instance index becomes unusable
        s.execute(text("ALTER TABLE instance RENAME TO instance_gone"))
    assert send(node.port, [slide.files[0]]) == [0xA701]
    [refused] = node.events("instance_refused")
    assert refused.details["reason"] == "database_unavailable"
    assert node.spooled_files() == [] and list(node.spool.incoming_dir.iterdir()) == []
