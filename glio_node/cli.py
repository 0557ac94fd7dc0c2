"""``glio-node`` command line: analyze, demo, serve, status-page, models verify/import, db upgrade, audit export.

Exit codes: 0 done, 2 bad input (one line on stderr saying what is wrong and what to do),
1 internal error (a traceback: that is our bug, please report it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

from glio_node import __version__
from glio_node.errors import BadInput, BundleError, ConfigError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
DEMO_BUNDLE = "glio-demo"


def default_models_dir() -> Path:
    """``$GLIO_MODELS_DIR``, else ./models, else the checkout's models/ next to the package."""
    env = os.environ.get("GLIO_MODELS_DIR")
    if env:
        return Path(env)
    here = Path("models")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent / "models"


def resolve_bundle(models: Path) -> Path:
    """A bundle folder (holding manifest.toml), or a folder holding exactly one, or glio-demo."""
    if (models / "manifest.toml").is_file():
        return models
    if not models.is_dir():
        raise BundleError(f"model folder {models} does not exist; pass --models DIR with a bundle folder")
    bundles = sorted(p for p in models.iterdir() if (p / "manifest.toml").is_file())
    if len(bundles) == 1:
        return bundles[0]
    if (models / DEMO_BUNDLE / "manifest.toml").is_file():
        return models / DEMO_BUNDLE
    if not bundles:
        raise BundleError(f"no model bundle (a folder with manifest.toml) in {models}; pass --models DIR")
    names = ", ".join(p.name for p in bundles)
    raise BundleError(f"{models} holds several bundles ({names}); pass --models {models}/NAME")


class _Progress:
    """A one-line progress bar on a terminal (tiles done / total, ETA); silent otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total == 0:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        width = 30
        filled = int(width * done / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} tiles  ETA {eta:5.0f} s ")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _print_summary(summary) -> None:
    s = summary.stats
    print(f"bundle      {summary.bundle} (sha256 {summary.bundle_sha256[:12]}…) on {summary.device}")
    for n in s.networks:
        how = "as is" if n.scale == 1 else f"downsampled x{n.scale:.2f}"
        print(
            f"network     {n.name}: level {n.level} at {n.level_um_per_px:.3f} µm/px ({how}), "
            f"{n.tiles_inferred} tiles run, {n.tiles_total - n.tiles_inferred} skipped (no tissue), "
            f"model {n.model_seconds:.1f} s"
        )
    print(f"tissue      {100 * s.tissue_fraction:.1f} % of the slide, {summary.tissue_area_mm2:.2f} mm²")
    print(f"frames      {s.frames_decoded} decoded for {s.frames_needed} needed (amplification {s.decode_amplification:.2f})")
    for task, call in summary.calls.items():
        probs = ", ".join(f"{k} {v:.2f}" for k, v in summary.probabilities[task].items())
        folds = summary.aggregated.get(task, {})
        if folds.get("folds", 1) > 1:
            reason = f", {folds['indeterminate_reason']}" if folds["indeterminate_reason"] else ""
            probs += f"; {folds['folds']} folds, spread {folds['fold_spread']:.2f} of at most {folds['max_fold_spread']:.2f}{reason}"
        print(f"call        {task}: {call}  ({probs})")
    print("stages      " + ", ".join(f"{k} {v:.1f} s" for k, v in summary.stage_seconds.items()))
    if summary.qc is not None:
        reasons = ", ".join(f"{r['meaning'].lower()} {r['area_mm2']:.2f} mm²" for r in summary.qc["reasons"])
        print(f"slide QC    {summary.qc['verdict']}" + (f": {reasons}" if reasons else ""))
    for note in summary.notes:
        print(f"note        {note}")
    for f in summary.files:
        print(f"wrote       {f}")
    if summary.geojson:
        print(f"qupath      {summary.geojson} (File > Import objects in QuPath, or drag it onto the slide)")


def _analyze(args: argparse.Namespace) -> int:
    from glio_node.job import load_bundle_models, run_job
    from glio_node.pipeline.analyze import AnalysisOptions
    from glio_node.pipeline.qc import QcThresholds

    qc = None
    if not args.no_qc:
        from glio_node.config import load_settings

        qc = load_settings(args.config).qc.thresholds() if args.config else QcThresholds()
    # batch size 0: chosen from the device's free memory once the device is known (8 on a CPU)
    options = AnalysisOptions(batch_size=args.batch_size or 0, decode_threads=args.threads, qc=qc)
    summary = run_job(
        [Path(p) for p in args.paths],
        Path(args.out),
        resolve_bundle(Path(args.models)),
        device=args.device,
        options=options,
        progress=_Progress(enabled=not args.json and sys.stderr.isatty()),
        load_models=functools.partial(load_bundle_models, precision=args.precision),
    )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        _print_summary(summary)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    """Generate a synthetic slide (our own writer) and analyse it with the demo bundle."""
    from glio_node.synthetic.slide import SlideSpec, write_synthetic_slide
    from glio_node.synthetic.textures import Signature

    out = Path(args.out)
    slide_dir = out / "slide"
    spec = SlideSpec(width_px=args.size, height_px=args.size * 3 // 4, um_per_px=0.25, levels=6,
                     signature=Signature(subtype=1, mgmt_methylated=True, egfr_amplified=False))
    slide = write_synthetic_slide(spec, slide_dir)
    print(f"generated   synthetic slide {spec.width_px}x{spec.height_px} px at {spec.um_per_px} µm/px in {slide_dir} "
          f"(truth: subtype mesenchymal, MGMT methylated, EGFR not amplified)")
    args.paths = [str(p) for p in slide.files]
    args.out = str(out / "results")
    return _analyze(args)


def _models_verify(args: argparse.Namespace) -> int:
    from glio_node.bundle import load_bundle, verify_bundle

    path = resolve_bundle(Path(args.dir))
    manifest = verify_bundle(path)
    bundle = load_bundle(path)
    print(f"ok          {manifest.name} {manifest.version} in {path}")
    print(f"fingerprint {bundle.algorithm.sha256}")
    print(f"use         {manifest.intended_use}")
    for n in manifest.networks:
        origin = f"; source {n.origin.source}; licence {n.origin.licence_name}" if n.origin else ""
        files = ", ".join(w.file for w in n.weights)
        kind = "" if n.kind == "tiles" else f" {n.kind}" + (f" of {n.encoder}" if n.encoder else f" (D={n.embed_dim})")
        print(f"network     {n.name}:{kind} {n.runtime} {files}, tasks {', '.join(n.tasks) or '-'}{origin}")
    print(f"regions     {_regions_line(manifest)}")
    return EXIT_OK


def _regions_line(manifest) -> str:
    """What the bundle draws regions with: its segmentation network (a SEG is written), or none."""
    seg = next((n for n in manifest.networks if "segmentation" in n.tasks), None)
    if seg is None:
        return "none: no segmentation network, so no SEG (the SR and any heatmaps and attention maps are written)"
    classes = next(h.classes for h in seg.heads if h.task == "segmentation")
    return f"{seg.name} (a SEG of its {len(classes)} classes is written)"


def _models_import(args: argparse.Namespace) -> int:
    """A local ONNX network into a bundle: nothing is downloaded (glio_node/bundle_import.py)."""
    from glio_node.bundle_import import import_onnx

    manifest, replaced = import_onnx(
        args.onnx, args.licence, args.source, args.network, args.out, into=args.into, licence_name=args.licence_name
    )
    imported = manifest.networks[-1]
    print(f"imported    network {imported.name} ({imported.file}, sha256 {imported.sha256})")
    if replaced:
        print(f"replaced    {', '.join(replaced)} of {args.into}")
    print(f"licence     {imported.origin.licence_name} ({imported.origin.licence_file})")
    print(f"ok          {manifest.name} {manifest.version} (format {manifest.format}) in {args.out}")
    return EXIT_OK


def _db_upgrade(args: argparse.Namespace) -> int:
    from glio_node.config import load_settings
    from glio_node.store.db import head_revision, upgrade

    url = load_settings(args.config).storage.database_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    print(f"database at schema revision {head_revision()}")
    return EXIT_OK


def _audit_export(args: argparse.Namespace) -> int:
    from datetime import datetime

    from glio_node.config import load_settings
    from glio_node.store.audit import export
    from glio_node.store.db import make_engine, make_sessions

    since = None
    if args.since:
        try:
            since = datetime.fromisoformat(args.since.replace("Z", "+00:00"))
        except ValueError as exc:
            raise BadInput(f"--since {args.since!r} is not an ISO 8601 time; give e.g. 2026-11-23T00:00:00Z") from exc
        if since.tzinfo is None:
            raise BadInput(f"--since {args.since!r} has no time zone; end it with Z for UTC")
    engine = make_engine(load_settings(args.config).storage.database_url)
    try:
        with make_sessions(engine)() as session:
            sys.stdout.writelines(export(session, since=since, format=args.format))
    finally:
        engine.dispose()
    return EXIT_OK


def _require_schema(url: str, config: str | None) -> None:
    """Refuse to start on a database another glio-node version migrated (or none did)."""
    from glio_node.store.db import current_revision, head_revision

    have, want = current_revision(url), head_revision()
    if have != want:
        raise ConfigError(
            f"the database is at schema revision {have or 'none (empty)'}, this glio-node needs "
            f"{want}: run `glio-node db upgrade{' --config ' + config if config else ''}` first"
        )


def _serve(args: argparse.Namespace) -> int:
    """Run the node: receiver, scheduler and workers, until SIGTERM or SIGINT."""
    import logging
    import signal
    import threading

    from glio_node.bundle import verify_bundle
    from glio_node.config import load_settings
    from glio_node.receive import Spool, start_receiver
    from glio_node.redact import UidRedactor
    from glio_node.scheduler import NodeScheduler
    from glio_node.store.db import make_engine, make_sessions

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("pynetdicom", "apscheduler", "alembic", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # the libraries' lines too (pynetdicom, uvicorn)
        handler.addFilter(UidRedactor())
    log = logging.getLogger("glio_node.serve")

    settings = load_settings(args.config)
    url = settings.storage.database_url
    _require_schema(url, args.config)
    bundle_dir = resolve_bundle(Path(settings.models.dir))
    manifest = verify_bundle(bundle_dir)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    spool = Spool(settings.storage.spool_dir, settings.storage.min_free_bytes)
    scheduler = NodeScheduler(settings, sessions, spool, bundle_dir)
    scheduler.preload()
    status_server = _start_status_page(settings, sessions, spool, scheduler.owner, manifest)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = start_receiver(settings, spool, sessions)
    scheduler.start()
    log.info(
        "glio-node %s serving as %s on %s:%d, bundle %s %s, %d destination(s), owner %s",
        __version__, settings.node.ae_title, settings.node.host, server.server_address[1],
        manifest.name, manifest.version, len(settings.destinations), scheduler.owner,
    )
    while not stop.wait(1.0):
        pass
    server.shutdown()  # no new associations
    log.info("receiver stopped; waiting up to %.0f s for running jobs", settings.worker.shutdown_grace_seconds)
    finished = scheduler.stop(settings.worker.shutdown_grace_seconds)
    _stop_status_page(status_server, sessions, scheduler.owner)
    engine.dispose()
    log.info("stopped%s", "" if finished else " (unfinished jobs were given back to the queue)")
    logging.shutdown()
    if not finished:
        # A job thread is still inside the model; its lease is released, so leave at once
        # rather than wait for it at interpreter exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def _start_status_page(settings, sessions, spool, owner: str, manifest):
    """Register this node (heartbeat row) and serve the status page in a thread, if enabled."""
    import socket
    from datetime import UTC, datetime

    from glio_node.runtime.runners import prepare_device
    from glio_node.store import nodes

    device = prepare_device(settings.worker.device, manifest)  # already chosen by preload; returns it
    with sessions.begin() as session:
        nodes.register(
            session,
            nodes.NodeInfo(owner, socket.gethostname(), __version__, device, manifest.name,
                           manifest.version, nodes.this_process()),
            datetime.now(UTC),
        )
    if not settings.status.enabled:
        return None
    from glio_node.web.app import create_app
    from glio_node.web.health import NodeContext
    from glio_node.web.server import StatusServer

    ctx = NodeContext(
        device=device,
        bundles=[(manifest.name, manifest.version)],
        spool_dir=spool.root,
        min_free_bytes=settings.storage.min_free_bytes,
    )
    board, prober = _start_prober(settings)
    try:
        server = StatusServer(create_app(settings, sessions, ctx, reachability=board), settings.status).start()
    except BaseException:
        prober.stop()  # the page could not listen: nothing reads the board
        raise
    import logging

    logging.getLogger("glio_node.serve").info(
        "status page on http://%s:%d/%s", settings.status.host, settings.status.port,
        "" if settings.status.token else " (no token: this machine only)",
    )
    return server, prober


def _start_prober(settings):
    """The destinations' reachability for the page: send/echo checks, the page reads the board."""
    from glio_node.reachability import ReachabilityBoard
    from glio_node.send.echo import ReachabilityProber

    board = ReachabilityBoard(settings.destinations)
    prober = ReachabilityProber(
        settings.destinations, settings.node.ae_title, board, settings.status.echo_cache_seconds
    ).start()
    return board, prober


def _stop_status_page(page, sessions, owner: str) -> None:
    from datetime import UTC, datetime

    from glio_node.store import nodes

    if page is not None:
        server, prober = page
        server.stop()
        prober.stop()
    with sessions.begin() as session:
        nodes.mark_stopped(session, owner, datetime.now(UTC))


def _status_page(args: argparse.Namespace) -> int:
    """Serve the status page alone, read-only, over the store of --config (e.g. a shared
    PostgreSQL): for watching several nodes from one place; actions are refused."""
    from glio_node.config import load_settings
    from glio_node.store.db import make_engine, make_sessions
    from glio_node.web.app import create_app
    from glio_node.web.health import NodeContext
    from glio_node.web.server import serve_foreground

    settings = load_settings(args.config)
    url = settings.storage.database_url
    _require_schema(url, args.config)
    engine = make_engine(url)
    spool_dir = Path(settings.storage.spool_dir)
    ctx = NodeContext(read_only=True, spool_dir=spool_dir if spool_dir.is_dir() else None,
                      min_free_bytes=settings.storage.min_free_bytes)
    print(f"glio-node {__version__} read-only status page on http://{settings.status.host}:{settings.status.port}/",
          file=sys.stderr, flush=True)
    board, prober = _start_prober(settings)
    try:
        serve_foreground(create_app(settings, make_sessions(engine), ctx, reachability=board), settings.status)
    finally:
        prober.stop()
        engine.dispose()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glio-node", description="AI worker for glioblastoma whole-slide images (research use only).")
    parser.add_argument("--version", action="version", version=f"glio-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def analysis_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models", default=str(default_models_dir()), help="bundle folder, or a folder of bundles (default: %(default)s)")
        p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="where the networks run (default: auto)")
        p.add_argument(
            "--batch-size", type=int, default=None,
            help="tiles per model call (default: chosen from the GPU's free memory; 8 on a CPU)",
        )
        p.add_argument(
            "--precision", choices=("float32", "bfloat16", "float16"), default="float32",
            help="compute dtype of the networks (softmax and argmax stay float32; recorded in every output; default: float32)",
        )
        p.add_argument("--threads", type=int, default=2, help="frame decoding threads (default: 2)")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
        p.add_argument("--config", help="TOML settings file whose [qc] section sets the slide-QC thresholds (default: built-in)")
        p.add_argument("--no-qc", action="store_true", help="skip slide QC (no verdict; artefact tiles are not left out)")

    a = sub.add_parser("analyze", help="analyse one DICOM WSI series and write SR, heatmaps, attention maps, ANN, a QuPath GeoJSON and (with a segmentation network) SEG")
    a.add_argument("paths", nargs="+", help="the slide's DICOM files, or a folder holding them")
    a.add_argument("--out", required=True, help="folder for the DICOM results")
    analysis_args(a)
    a.set_defaults(func=_analyze)

    d = sub.add_parser("demo", help="generate a synthetic slide and analyse it with the demo bundle")
    d.add_argument("--out", default="out/demo", help="folder for the slide and results (default: %(default)s)")
    d.add_argument("--size", type=int, default=4096, help="slide width in px at 0.25 µm/px (default: %(default)s)")
    analysis_args(d)
    d.set_defaults(func=_demo)

    sv = sub.add_parser("serve", help="run the node: receive slides, analyse them, send results back")
    sv.add_argument("--config", help="TOML settings file (default: embedded defaults + GLIO_* variables)")
    sv.set_defaults(func=_serve)

    sp = sub.add_parser("status-page", help="serve the status page alone, read-only (e.g. over a shared PostgreSQL)")
    sp.add_argument("--config", help="TOML settings file ([storage] database_url and [status])")
    sp.set_defaults(func=_status_page)

    m = sub.add_parser("models", help="model bundles")
    msub = m.add_subparsers(dest="models_command", required=True)
    v = msub.add_parser("verify", help="check a bundle's SHA-256 and load it")
    v.add_argument("dir", nargs="?", default=str(default_models_dir()))
    v.set_defaults(func=_models_verify)
    im = msub.add_parser(
        "import",
        help="make a local ONNX network a bundle network (new bundle, or added to a copy of one); downloads nothing",
    )
    im.add_argument("--onnx", required=True, help="the network's .onnx file")
    im.add_argument("--licence", required=True, help="text file with the licence the network is distributed under")
    im.add_argument("--source", required=True, help="where the network came from: maker, version, how and when obtained")
    im.add_argument("--network", required=True, help="TOML file: [network] geometry, heads, signature; [bundle] for a new bundle (docs/model-bundle.md)")
    im.add_argument("--out", required=True, help="folder of the bundle to write (replaced if it exists)")
    im.add_argument("--into", help="copy this bundle and put the network in it, replacing networks with the same tasks")
    im.add_argument("--licence-name", help="short licence name for outputs (default: the licence text's first line)")
    im.set_defaults(func=_models_import)

    db = sub.add_parser("db", help="the SQL store")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="apply the schema migrations (a deploy step before serve)")
    up.add_argument("--config", help="TOML settings file (default: embedded defaults + GLIO_* variables)")
    up.set_defaults(func=_db_upgrade)

    au = sub.add_parser("audit", help="the audit trail")
    ausub = au.add_subparsers(dest="audit_command", required=True)
    ex = ausub.add_parser("export", help="write audit events to stdout")
    ex.add_argument("--since", help="ISO 8601 UTC time, e.g. 2026-11-23T00:00:00Z (default: everything)")
    ex.add_argument("--format", choices=("csv", "json"), default="csv")
    ex.add_argument("--config", help="TOML settings file")
    ex.set_defaults(func=_audit_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BadInput, BundleError, ConfigError) as exc:
        print(f"glio-node: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
