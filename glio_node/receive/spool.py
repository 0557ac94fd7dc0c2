"""The durable spool: where received instances live until their results are delivered.

Layout under the spool root (one filesystem, so that a rename is atomic)::

    incoming/                              temporary files being received or copied
    instances/<study uid>/<series uid>/<sop instance uid>.dcm
    results/<study uid>/<series uid>/      SEG, SR and heatmaps written by the job of the series

Paths are built from UIDs that passed :func:`checked_uid` (digits and dots, at most 64
characters), never from raw header values.  :meth:`Spool.store` makes a file durable: the data
is fsync'ed, renamed into place with ``os.replace`` and the directory fsync'ed, so once it
returns the file survives a crash or power loss.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from glio_node.errors import BadInput

# Digits separated by single dots.  Stricter DICOM (no leading zeros in a component) is not
# required: some scanners write such UIDs, and the pattern is what makes a path safe.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_CHUNK = 1 << 20


def checked_uid(keyword: str, value: object) -> str:
    """``value`` as a UID string if it is one (digits and dots, 1-64 chars); else ``BadInput``."""
    text = "" if value is None else str(value)
    if len(text) > 64 or not _UID.fullmatch(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise BadInput(
            f"{keyword} {shown!r} is not a valid UID (digits and dots, at most 64 characters)"
        )
    return text


@dataclass(frozen=True)
class StoredFile:
    """A file made durable in the spool."""

    path: Path
    size_bytes: int
    sha256: str  # hex digest of the file's bytes


class Spool:
    """Durable storage of received instances under ``root`` (see the module docstring).

    ``min_free_bytes``: :meth:`has_room` is False once the filesystem has less free space.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0):
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes {min_free_bytes} must be 0 or more")
        self.root = Path(root).absolute()
        self.min_free_bytes = min_free_bytes
        self.incoming_dir = self.root / "incoming"
        self.instances_dir = self.root / "instances"
        self.results_root = self.root / "results"
        for d in (self.root, self.incoming_dir, self.instances_dir, self.results_root):
            _make_dirs(d)

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r}, min_free_bytes={self.min_free_bytes})"

    # -- paths -----------------------------------------------------------------------------

    def series_dir(self, study_instance_uid: str, series_instance_uid: str) -> Path:
        """The folder of one series' instances (UIDs are checked; ``BadInput`` if not UIDs)."""
        study = checked_uid("StudyInstanceUID", study_instance_uid)
        series = checked_uid("SeriesInstanceUID", series_instance_uid)
        return self.instances_dir / study / series

    def instance_path(
        self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
    ) -> Path:
        """Where an instance is stored (UIDs are checked; ``BadInput`` if not UIDs)."""
        sop = checked_uid("SOPInstanceUID", sop_instance_uid)
        return self.series_dir(study_instance_uid, series_instance_uid) / f"{sop}.dcm"

    def results_dir(self, study_instance_uid: str, series_instance_uid: str) -> Path:
        """The folder the job of a series writes its results to (not created here)."""
        study = checked_uid("StudyInstanceUID", study_instance_uid)
        series = checked_uid("SeriesInstanceUID", series_instance_uid)
        return self.results_root / study / series

    def purge_series(self, study_instance_uid: str, series_instance_uid: str) -> int:
        """Delete a series' instances and results (and their study folders once empty).

        Returns the number of files deleted; a folder already gone is not an error.
        """
        removed = 0
        for folder in (
            self.series_dir(study_instance_uid, series_instance_uid),
            self.results_dir(study_instance_uid, series_instance_uid),
        ):
            if not folder.is_dir():
                continue
            removed += sum(1 for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder)
            try:
                folder.parent.rmdir()  # the study folder, when this was its last series
            except OSError:
                pass
        return removed

    # -- space -----------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Free bytes on the spool's filesystem (for unprivileged users)."""
        return shutil.disk_usage(self.root).free

    def has_room(self) -> bool:
        """Whether free space is at least ``min_free_bytes``."""
        return self.free_bytes() >= self.min_free_bytes

    # -- writing ---------------------------------------------------------------------------

    def store(
        self,
        source: Path,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        digest: tuple[str, int] | None = None,
    ) -> StoredFile:
        """Make ``source`` the durable instance file; ``source`` is moved, not kept.

        ``digest``: the file's SHA-256 (hex) and size when the writer computed them as it wrote
        (the receiver does), so the file is not read again; it is fsync'ed all the same.

        A source on the spool's filesystem (the receiver's temporary file in ``incoming/``) is
        renamed; any other is copied into ``incoming/`` first.  Replaces an existing file of
        the same instance.  Raises ``BadInput`` for invalid UIDs, ``OSError`` when the disk
        fails or is full (nothing is left behind in ``incoming/`` then).
        """
        final = self.instance_path(study_instance_uid, series_instance_uid, sop_instance_uid)
        source = Path(source)
        if os.stat(source).st_dev != os.stat(self.incoming_dir).st_dev:
            temp, sha256, size = self._copy_in(source)
        elif digest is not None:
            _sync(source)
            temp, (sha256, size) = source, digest
        else:
            temp, sha256, size = source, *_hash_and_sync(source)
        try:
            _make_dirs(final.parent)
            os.replace(temp, final)
        except OSError:
            _unlink_quietly(temp)
            raise
        _fsync_dir(final.parent)
        if temp != source:
            _unlink_quietly(source)
        return StoredFile(final, size, sha256)

    def new_temp_file(self, suffix: str = ".part") -> Path:
        """An empty temporary file in ``incoming/`` (for writers that fill it themselves)."""
        fd, name = tempfile.mkstemp(suffix=suffix, dir=self.incoming_dir)
        os.close(fd)
        return Path(name)

    def clean_incoming(self) -> int:
        """Delete leftovers of interrupted receives (call before accepting associations)."""
        removed = 0
        for p in self.incoming_dir.iterdir():
            if p.is_file():
                _unlink_quietly(p)
                removed += 1
        return removed

    def _copy_in(self, source: Path) -> tuple[Path, str, int]:
        fd, name = tempfile.mkstemp(suffix=".part", dir=self.incoming_dir)
        h = hashlib.sha256()
        size = 0
        try:
            with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        except OSError:
            _unlink_quietly(Path(name))
            raise
        return Path(name), h.hexdigest(), size


def _sync(path: Path) -> None:
    """Flush ``path``'s data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_and_sync(path: Path) -> tuple[str, int]:
    """SHA-256 and size of ``path``, and its data flushed to disk."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return h.hexdigest(), size


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every folder it creates (so the entry is durable)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # created meanwhile by a concurrent receive
            continue
        _fsync_dir(d.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
