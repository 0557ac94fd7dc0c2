"""Where the receiver's time goes: cProfile of one storescu send, and an A/B of its settings.

    .venv/bin/python bench/profile_receive.py [--size 8192] [--ab 8] [--top 15]

The receiver (``glio_node.receive.scp``, as ``start_receiver`` builds it, SQLite, a spool in a
temporary folder) runs in this process; DCMTK ``storescu -xy -R`` with ``TCP_NODELAY=1`` sends
bench/receive.py's slide (generated there, reused from ``.cache/bench-slides``).

- Profile: pynetdicom receives on two threads, the DUL (socket, PDU decoding, writing the dataset
  to its temporary file) and the association (the C-STORE handler); each gets a cProfile of its
  own, printed by internal time.  Sleeps in them are their polling loops waiting.
- ``--ab N``: N interleaved sends each to the receiver as it is ("after") and with pynetdicom's
  16 KiB maximum PDU and the file read again to hash it ("before"); median wall and process CPU.
  ``--against V`` compares with a what-if instead (measurements, not modes to ship): ``no-fsync``
  (every fsync a no-op, SQLite ``synchronous=OFF``), ``file-fsync-only`` (the file's data only),
  ``recv-256k`` (socket reads of 256 KiB, not 4 KiB), ``dul-wake`` (the DUL thread woken by socket
  data, not its 1 ms sleep), ``fast-poll`` (the association reactor polled every 0.1 ms),
  ``no-writer-turn`` (intake's SQLite transactions queue on SQLite's busy handler, not on
  ``store.db.writer_turn``). ``--ab-parallel K`` sends K slides at once, each its own association.
- ``--floor N``: what no network front end can remove. N interleaved rounds of: storescp's whole
  send (one association; and ``--parallel`` slides over as many associations, ``--fork``), against
  the node's durable intake alone (``intake.admit`` + ``intake.accept``: parse and check, fsync,
  rename, folder fsync, SQLite commit) on the same files already in the spool's ``incoming/``,
  one slide on one thread and ``--parallel`` slides on as many threads, the latter with and
  without ``store.db.writer_turn``. As the sender waits for each answer before sending the next
  instance, one association's send to any receiver that makes each instance durable before it
  answers takes at least (moving the bytes) + (the durable intake); so storescp / (storescp +
  intake) bounds the ratio for one association whatever moves the bytes.

Not a test, and not part of bench/receive.py's page: a tool for the next optimisation.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.receive import ensure_slide, free_port


class Receiver:
    """The node's SCP in this process, on a fresh spool and database."""

    def __init__(self, scratch: Path, *, before: bool = False):
        from glio_node.config import NodeSettings, Settings, StorageSettings
        from glio_node.receive import Spool, scp
        from glio_node.store.db import make_engine, make_sessions, upgrade

        self.folder = Path(tempfile.mkdtemp(dir=scratch))
        url = f"sqlite:///{self.folder / 'glio.db'}"
        self.port = free_port()
        settings = Settings(
            node=NodeSettings(host="127.0.0.1", port=self.port),
            storage=StorageSettings(spool_dir=self.folder / "spool", database_url=url, min_free_bytes=0),
        )
        upgrade(url)
        self.engine = make_engine(url)
        spool = Spool(settings.storage.spool_dir, 0)
        ae = scp.build_ae(settings, spool)
        self._restore = None
        if before:  # pynetdicom's default PDU size, and a plain temporary file (hashed on re-read)
            ae.maximum_pdu_size = 16382
            hashing = scp.dimse_messages.NamedTemporaryFile
            self._restore = hashing

            def plain(*args: Any, **kwargs: Any) -> Any:
                f = hashing(*args, **kwargs)
                return f._file if isinstance(f, scp._HashingFile) else f

            scp.dimse_messages.NamedTemporaryFile = plain
        spool.clean_incoming()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=scp.event_handlers(spool, make_sessions(self.engine)),
        )

    def close(self) -> None:
        from glio_node.receive import scp

        self.server.shutdown()
        self.engine.dispose()
        if self._restore is not None:
            scp.dimse_messages.NamedTemporaryFile = self._restore
        shutil.rmtree(self.folder, ignore_errors=True)


def send(port: int, files: list[Path]) -> tuple[float, float]:
    """storescu's wall seconds and this process's CPU seconds over the send."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    c0, t0 = time.process_time(), time.perf_counter()
    done = subprocess.run(
        ["storescu", "-aec", "GLIONODE", "-xy", "-R", "127.0.0.1", str(port), *map(str, files)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return wall, cpu


def profile(files: list[Path], scratch: Path, top: int) -> None:
    import pynetdicom.association
    import pynetdicom.dul

    profiles: list[tuple[str, cProfile.Profile]] = []

    def wrap(cls: Any, name: str) -> Any:
        original = cls.run

        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            p = cProfile.Profile()
            profiles.append((name, p))
            p.enable()
            try:
                return original(self, *args, **kwargs)
            finally:
                p.disable()

        cls.run = run
        return original

    originals = [
        (pynetdicom.association.Association, wrap(pynetdicom.association.Association, "association")),
        (pynetdicom.dul.DULServiceProvider, wrap(pynetdicom.dul.DULServiceProvider, "DUL")),
    ]
    receiver = Receiver(scratch)
    try:
        wall, cpu = send(receiver.port, files)
        time.sleep(0.3)
    finally:
        receiver.close()
        for cls, original in originals:
            cls.run = original
    size = sum(f.stat().st_size for f in files)
    print(f"profiled send: {wall:.3f} s wall ({size / wall / 1e6:.1f} MB/s), {cpu:.3f} s CPU (profiler on)")
    for name, p in profiles:
        out = io.StringIO()
        pstats.Stats(p, stream=out).sort_stats("tottime").print_stats(top)
        print(f"\n=== {name} thread, by internal time\n{out.getvalue()}")


# --- what-if variants for --ab (measurements, not modes to ship) --------------------------------


def _sync_only_files(real: Any) -> Any:
    import stat

    def fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            real(fd)

    return fsync


def _recv_large(self: Any, nr_bytes: int) -> bytearray:
    """pynetdicom's ``AssociationSocket.recv`` reading up to 256 KiB per call (it reads 4 KiB)."""
    data = bytearray()
    while len(data) < nr_bytes:
        chunk = self.socket.recv(min(nr_bytes - len(data), 1 << 18))
        if not chunk:
            break
        data += chunk
    return data


def _dul_wakes_on_data(real_sleep: Any) -> Any:
    import select
    import threading

    import pynetdicom.dul

    def sleep(delay: float) -> None:
        thread = threading.current_thread()
        sock = getattr(getattr(thread, "socket", None), "socket", None)
        if isinstance(thread, pynetdicom.dul.DULServiceProvider) and sock is not None:
            try:
                select.select([sock], [], [], delay)
                return
            except (OSError, ValueError):
                pass
        real_sleep(delay)

    return sleep


def apply_variant(name: str, engine: Any) -> Any:
    """Patch this process for the what-if ``name``; returns a function that undoes it."""
    import types

    import pynetdicom.association
    import pynetdicom.dul
    import pynetdicom.transport
    from sqlalchemy import event

    undo: list[Any] = []
    if name in ("no-fsync", "file-fsync-only"):
        real = os.fsync
        os.fsync = (lambda fd: None) if name == "no-fsync" else _sync_only_files(real)
        undo.append(lambda: setattr(os, "fsync", real))
        event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA synchronous=OFF"))
        engine.dispose()
    elif name == "recv-256k":
        real = pynetdicom.transport.AssociationSocket.recv
        pynetdicom.transport.AssociationSocket.recv = _recv_large
        undo.append(lambda: setattr(pynetdicom.transport.AssociationSocket, "recv", real))
    elif name in ("dul-wake", "fast-poll"):
        module = pynetdicom.dul if name == "dul-wake" else pynetdicom.association
        real_time = module.time
        sleep = _dul_wakes_on_data(time.sleep) if name == "dul-wake" else (lambda d: time.sleep(min(d, 0.0001)))
        module.time = types.SimpleNamespace(sleep=sleep, time=time.time, monotonic=time.monotonic, perf_counter=time.perf_counter)
        undo.append(lambda: setattr(module, "time", real_time))
    elif name == "no-writer-turn":
        import contextlib

        from glio_node.receive import intake

        real_turn = intake.writer_turn
        intake.writer_turn = lambda _sessions: contextlib.nullcontext()
        undo.append(lambda: setattr(intake, "writer_turn", real_turn))
    else:
        raise ValueError(f"unknown variant {name!r}")
    return lambda: [u() for u in undo]


VARIANTS = ("no-fsync", "file-fsync-only", "recv-256k", "dul-wake", "fast-poll", "no-writer-turn")


def send_parallel(port: int, slides: list[list[Path]]) -> tuple[float, float]:
    """Each slide in its own storescu process at once: wall seconds until the last exits, and
    this process's CPU seconds over them."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    c0, t0 = time.process_time(), time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", "GLIONODE", "-xy", "-R", "127.0.0.1", str(port), *map(str, files)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for files in slides
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise RuntimeError(err[-2000:])
    return wall, cpu


def ab(files: list[Path], scratch: Path, repeats: int, against: str = "before", parallel: int = 1) -> None:
    from bench.receive import slide_copies

    slides = slide_copies(files, parallel) if parallel > 1 else [files]
    size = sum(f.stat().st_size for s in slides for f in s)
    results: dict[str, list[tuple[float, float]]] = {against: [], "after": []}
    for i in range(repeats):
        for variant in (against, "after") if i % 2 == 0 else ("after", against):
            receiver = Receiver(scratch, before=variant == "before")
            undo = apply_variant(variant, receiver.engine) if variant not in ("before", "after") else None
            try:
                time.sleep(0.2)
                results[variant].append(
                    send_parallel(receiver.port, slides) if parallel > 1 else send(receiver.port, files)
                )
            finally:
                receiver.close()
                if undo is not None:
                    undo()
    for variant, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"{variant}: median {wall:.3f} s wall ({size / wall / 1e6:.1f} MB/s), {cpu:.3f} s CPU "
              f"over {len(runs)} sends")
    print(f"load average {os.getloadavg()}")


# --- the floor: the durable intake alone against storescp's whole send ---------------------------


def _staged_intake(scratch: Path, slides: list[list[Path]]) -> tuple[Any, Any, Any, list[list[tuple[Path, str, str, str]]]]:
    """A fresh spool and SQLite database with ``slides`` copied into ``incoming/`` (as a receiver
    leaves them before intake), each file with what its C-STORE request would announce."""
    import pydicom

    from glio_node.receive import Spool
    from glio_node.store.db import make_engine, make_sessions, upgrade

    folder = Path(tempfile.mkdtemp(dir=scratch))
    url = f"sqlite:///{folder / 'glio.db'}"
    upgrade(url)
    engine = make_engine(url)
    spool = Spool(folder / "spool", 0)
    spool.incoming_dir.mkdir(parents=True, exist_ok=True)
    staged = []
    for n, files in enumerate(slides):
        batch = []
        for f in files:
            path = spool.incoming_dir / f"{n}-{f.name}.part"
            shutil.copyfile(f, path)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            batch.append((path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)))
        staged.append(batch)
    os.sync()  # the copies' own writeback is not the intake's
    return engine, make_sessions(engine), spool, staged


def _intake_alone(scratch: Path, slides: list[list[Path]], turns: bool = True) -> float:
    """Wall seconds of admit + accept of every staged file, one thread per slide."""
    import contextlib
    import threading

    from glio_node.receive import intake

    engine, sessions, spool, staged = _staged_intake(scratch, slides)
    real_turn = intake.writer_turn
    if not turns:
        intake.writer_turn = lambda _sessions: contextlib.nullcontext()  # type: ignore[assignment]

    def work(batch: list[tuple[Path, str, str, str]]) -> None:
        for path, sop_class, sop_instance, syntax in batch:
            admitted = intake.admit(path, intake.Peer("BENCH", "127.0.0.1:1"), sop_class_uid=sop_class,
                                    sop_instance_uid=sop_instance, transfer_syntax=syntax)
            intake.accept(sessions, spool, admitted, digest=("0" * 64, path.stat().st_size))

    try:
        threads = [threading.Thread(target=work, args=(batch,)) for batch in staged]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0
    finally:
        intake.writer_turn = real_turn  # type: ignore[assignment]
        engine.dispose()


def floor(files: list[Path], scratch: Path, repeats: int, parallel: int) -> None:
    from bench.receive import STORESCP_AET, slide_copies, start_storescp, stop, storescu, storescu_parallel

    slides = slide_copies(files, parallel)
    runs: dict[str, list[float]] = {k: [] for k in (
        "storescp, one association", "intake alone, one slide",
        f"storescp --fork, {parallel} associations", f"intake alone, {parallel} slides on {parallel} threads",
        f"intake alone, {parallel} slides on {parallel} threads, no writer_turn",
    )}
    names = list(runs)
    load0 = os.getloadavg()
    for i in range(repeats + 1):  # the first round warms caches and is not counted
        got: dict[str, float] = {}
        order = names if i % 2 else names[::-1]
        for name in order:
            if name.startswith("storescp"):
                folder = Path(tempfile.mkdtemp(dir=scratch))
                proc, port = start_storescp(folder, nodelay=True, fork="fork" in name)
                try:
                    got[name] = (storescu_parallel(port, STORESCP_AET, slides, True) if "fork" in name
                                 else storescu(port, STORESCP_AET, files, True))
                finally:
                    stop(proc)
            else:
                got[name] = _intake_alone(scratch, slides if "threads" in name else [files],
                                          turns="no writer_turn" not in name)
        if i:
            for name, wall in got.items():
                runs[name].append(wall)
    med = {name: statistics.median(v) for name, v in runs.items()}
    for name, v in runs.items():
        print(f"{name}: median {med[name]:.3f} s  ({', '.join(f'{x:.3f}' for x in v)})")
    one, one_in = med[names[0]], med[names[1]]
    par, par_in = med[names[2]], med[names[3]]
    print(f"one association: intake alone is {one_in / one:.2f}x storescp's whole send; ratio bound "
          f"storescp / (storescp + intake) = {one / (one + one_in):.2f}")
    print(f"{parallel} associations: intake alone is {par_in / par:.2f}x storescp's whole send "
          f"(bound on the ratio with the bytes moved for free: {par / par_in:.2f}); "
          f"writer_turn: {med[names[4]]:.3f} s without, {par_in:.3f} s with")
    print(f"load average at start {load0}, at end {os.getloadavg()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--ab", type=int, default=0, help="interleaved before/after sends (0: profile only)")
    parser.add_argument(
        "--against", choices=("before", *VARIANTS), default="before",
        help="what --ab compares the receiver with: 'before' (16 KiB PDUs, file re-read to hash) or a what-if",
    )
    parser.add_argument("--floor", type=int, default=0,
                        help="rounds of storescp's send against the durable intake alone (0: off)")
    parser.add_argument("--parallel", type=int, default=4, help="slides at once in --floor")
    parser.add_argument("--ab-parallel", type=int, default=1,
                        help="--ab sends this many slides at once, each its own association (new UIDs)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "bench-slides")
    args = parser.parse_args()
    files = ensure_slide(args.size, args.cache)
    with tempfile.TemporaryDirectory(prefix="glio-profile-") as scratch:
        if args.floor:
            floor(files, Path(scratch), args.floor, args.parallel)
        elif args.ab:
            ab(files, Path(scratch), args.ab, args.against, args.ab_parallel)
        else:
            profile(files, Path(scratch), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
