"""GPU benchmark: the reference slide through the realistic bundle under JAX, end to end.

    .venv/bin/python bench/gpu.py [--size 100000x80000] [--precision bfloat16] [--json F]
                                  [--time-budget 240] [--cache .cache] [--device auto]

One script for the first GPU machine at hand, done in under 10 minutes:

1. **slide**: the reference slide, 100,000 x 80,000 px at 0.25 µm/px (glio_node.synthetic; about
   half of it tissue), written once into ``--cache``/bench-slides and reused.  Generating it is
   single-threaded Python, so before writing the script times a small probe slide and, when the
   reference would not be written within ``--time-budget`` seconds or would not fit 80 % of the
   free disk, writes the largest slide of the same aspect ratio that does (said in the report);
   ``--size`` asks for another size outright;
2. **bundle**: bench/realistic.py's random-weight bundle (UNet depth 5 base 16 on 320-px tiles,
   VGG16-shaped classifier base 64 on 160-px tiles, both at 0.5 µm/px), loaded under
   ``KERAS_BACKEND=jax`` (set here unless the caller set another), batch size from the device's
   free memory unless ``--batch-size`` is given; one untimed warm-up pass over the probe slide
   compiles the device functions;
3. **the run**: ``DicomSlide.open`` -> ``analyze`` -> ``write_results`` (``run_job`` less model
   loading), timed by stage, while a thread samples ``nvidia-smi`` (when present) every 100 ms.

Reported (stdout, and ``--json``): slide wall time end to end and per stage; tiles and tiles/s per
network (in ``predict``, and over the inference stage); GPU busy fraction (mean utilisation over
the inference stage, and the share of samples above zero) and peak GPU memory; host decode rate
(frames and megapixels per second of decode-thread time, and over the inference stage's wall
time); peak RSS; and the arithmetic floor (FLOPs per tile x tiles / the device's dense peak).  On
a CPU (``--size 1024x768 --device cpu``) the same script is the test suite's smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make glio_node importable without install
    sys.path.insert(0, str(REPO_ROOT))

REFERENCE = (100_000, 80_000)  # width x height px at 0.25 µm/px: issue 16's reference slide
SLIDE_UM_PER_PX = 0.25
FRAME = 256
LEVELS = 6  # 0.25 .. 8 µm/px: the tissue level is in the pyramid
PROBE = (2048, 1536)  # the timing probe and warm-up slide
# Dense (no sparsity) peak throughput per device, FLOP/s, from the vendors' data sheets.
DENSE_PEAK = {
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},  # SXM; float32 without TF32
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
}
FLOOR_DEVICE = "H100"  # the floor the issue asks for, whatever device runs the script


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must be WIDTHxHEIGHT in px, e.g. 100000x80000") from None
    if w < 2 * FRAME or h < 2 * FRAME:
        raise argparse.ArgumentTypeError(f"size {text!r}: width and height must be at least {2 * FRAME} px")
    return w, h


def slide_frames(width: int, height: int, levels: int = LEVELS) -> int:
    """Frames of every pyramid level of a ``width`` x ``height`` slide (what writing it costs)."""
    total = 0
    for k in range(levels):
        w, h = math.ceil(width / 2**k), math.ceil(height / 2**k)
        if k and max(w, h) < FRAME:
            break
        total += math.ceil(w / FRAME) * math.ceil(h / FRAME)
    return total


def spec_for(width: int, height: int):
    from glio_node.synthetic.slide import SlideSpec

    return SlideSpec(width_px=width, height_px=height, um_per_px=SLIDE_UM_PER_PX, levels=LEVELS, tile_size=FRAME,
                     transfer_syntax="jpeg", context_images=False)


def slide_folder_name(width: int, height: int) -> str:
    return f"gpu-slide-{width}x{height}px-{SLIDE_UM_PER_PX}um-jpeg-t{FRAME}-l{LEVELS}-seed{spec_for(width, height).seed}"


def probe_rates(cache: Path) -> tuple[float, float]:
    """Frames per second this machine writes a synthetic slide at, and bytes per frame: from a
    fresh probe slide (written into a temporary folder and removed)."""
    from glio_node.synthetic.slide import write_synthetic_slide

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        t0 = time.perf_counter()
        slide = write_synthetic_slide(spec_for(*PROBE), Path(tmp))
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in slide.files)
    frames = slide_frames(*PROBE)
    return frames / seconds, size / frames


def ensure_slide(width: int, height: int, cache: Path) -> tuple[list[Path], float]:
    """The slide's files (written on first use, into a staging folder renamed when complete) and
    the seconds spent writing it now (0 when reused)."""
    from glio_node.synthetic.slide import write_synthetic_slide

    spec = spec_for(width, height)
    folder = cache / slide_folder_name(width, height)
    seconds = 0.0
    if not folder.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache))
        t0 = time.perf_counter()
        try:
            write_synthetic_slide(spec, staging)
            os.replace(staging, folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        seconds = time.perf_counter() - t0
    return sorted(folder.glob("*.dcm")), seconds


def fitting_size(asked: tuple[int, int], frames_per_s: float, bytes_per_frame: float, budget_s: float, free_bytes: int,
                 cached: bool) -> tuple[tuple[int, int], str]:
    """``asked``, or the largest slide of its aspect ratio written within ``budget_s`` that fits
    80 % of ``free_bytes``; with the reason when smaller."""
    if cached:
        return asked, "reused from the cache"
    frames = slide_frames(*asked)
    limit = min(budget_s * frames_per_s, 0.8 * free_bytes / max(bytes_per_frame, 1.0))
    if frames <= limit:
        return asked, f"written in about {frames / frames_per_s:.0f} s"
    scale = math.sqrt(limit / frames)
    w, h = (max(2 * FRAME, int(v * scale) // FRAME * FRAME) for v in asked)
    why = "time budget" if budget_s * frames_per_s <= 0.8 * free_bytes / max(bytes_per_frame, 1.0) else "free disk"
    return (w, h), (
        f"{asked[0]}x{asked[1]} px would take {frames / frames_per_s:.0f} s and {frames * bytes_per_frame / 2**30:.1f} GiB "
        f"to write; the {why} allows {w}x{h} px"
    )


# --- measuring -----------------------------------------------------------------------------------


class GpuSampler:
    """``nvidia-smi`` utilisation and memory every ``interval_ms`` in a background process and
    thread; samples are (perf_counter time, utilisation %, memory used MiB).  Absent nvidia-smi,
    ``available`` is False and there are no samples."""

    def __init__(self, interval_ms: int = 100):
        self.samples: list[tuple[float, float, float]] = []
        self.available = shutil.which("nvidia-smi") is not None
        self._cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                     f"-lms={interval_ms}", "-i", "0"]
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuSampler":
        if self.available:
            self._proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def between(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]


@dataclass
class TimedReads:
    """The slide's ``read_frame``, timing each decode (thread time, summed over decode threads)."""

    read: Any
    seconds: float = 0.0
    frames: int = 0
    pixels: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, level: int, row: int, col: int):
        t0 = time.thread_time()
        frame = self.read(level, row, col)
        dt = time.thread_time() - t0
        with self._lock:
            self.seconds += dt
            self.frames += 1
            self.pixels += frame.shape[0] * frame.shape[1]
        return frame


def peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def run_slide(files: list[Path], runners, algorithm, options, out_dir: Path, sampler: GpuSampler | None) -> dict[str, Any]:
    """One slide, files to outputs, as run_job does after loading the models."""
    from glio_node.pipeline.analyze import analyze
    from glio_node.runtime.slide_reader import DicomSlide
    from glio_node.writers import write_results

    t_start = time.perf_counter()
    slide = DicomSlide.open(files)
    t_open = time.perf_counter()
    with slide:
        reads = TimedReads(slide.read_frame)
        slide.read_frame = reads  # the pipeline's decode pool calls this
        result, stats, seg_level = analyze(slide, runners, algorithm, options)
        t_analyzed = time.perf_counter()
        written = write_results(list(seg_level.headers), result, out_dir)
    t_end = time.perf_counter()
    stages = {"open": t_open - t_start, **stats.stage_seconds, "write": t_end - t_analyzed}
    inf_t1 = t_analyzed - stats.stage_seconds.get("stitch", 0.0)
    inf_t0 = inf_t1 - stats.stage_seconds.get("inference", 0.0)
    return {
        "wall": t_end - t_start,
        "stages": stages,
        "inference_window": (inf_t0, inf_t1),
        "stats": stats,
        "reads": reads,
        "files_written": len(written.paths),
        "bytes_written": sum(p.stat().st_size for p in written.paths),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=None,
                        help=f"slide WIDTHxHEIGHT px at {SLIDE_UM_PER_PX} µm/px (default: the reference "
                             f"{REFERENCE[0]}x{REFERENCE[1]}, or the largest that fits --time-budget and the disk)")
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds allowed for writing the slide (default 240)")
    parser.add_argument("--precision", choices=("float32", "bfloat16", "float16"), default=None,
                        help="compute dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--batch-size", type=int, default=0, help="tiles per model call (default: from the device's free memory)")
    parser.add_argument("--threads", type=int, default=None, help="decode threads (default: the usable CPUs, at most 16)")
    parser.add_argument("--lookahead", type=int, default=None, help="tile requests decoded ahead (default: 8 x batch size)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "glio-demo",
                        help="bundle whose heads and classes the realistic bundle takes (default: the demo's)")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache", help="slides and the bundle are kept here")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    args = parser.parse_args(argv)

    from bench.realistic import ensure_realistic_bundle, flops_per_tile
    from glio_node.errors import GlioError
    from glio_node.job import load_keras_models
    from glio_node.pipeline.analyze import AnalysisOptions

    started = time.perf_counter()
    slides = args.cache / "bench-slides"
    try:
        bundle_dir = ensure_realistic_bundle(args.bundle, args.cache / "bench-bundles")
        asked = args.size or REFERENCE
        if args.size:
            size, size_note = asked, "asked for with --size"
        else:
            size, size_note = fitting_size(asked, *probe_rates(slides), args.time_budget, shutil.disk_usage(slides).free,
                                           (slides / slide_folder_name(*asked)).is_dir())
        files, gen_seconds = ensure_slide(*size, slides)
        # The warm-up (which compiles the device functions) runs on a small slide: the probe, or
        # the slide itself when it is no bigger.
        warm_files = files if size[0] * size[1] <= PROBE[0] * PROBE[1] else ensure_slide(*PROBE, slides)[0]

        precision = args.precision
        if precision is None:
            from glio_node.runtime.keras_runner import select_device

            precision = "bfloat16" if select_device(args.device).startswith("gpu") else "float32"
        t0 = time.perf_counter()
        models = load_keras_models(bundle_dir, args.device, args.batch_size, None, precision=precision)
        load_seconds = time.perf_counter() - t0
    except GlioError as exc:
        parser.exit(2, f"bench/gpu.py: {exc}\n")
    batch = models.batch_size or 8
    threads = args.threads or min(16, len(os.sched_getaffinity(0)))
    options = AnalysisOptions(batch_size=batch, decode_threads=threads, lookahead=args.lookahead or max(48, 8 * batch))

    import keras

    with tempfile.TemporaryDirectory(prefix="glio-gpu-") as scratch:
        t0 = time.perf_counter()
        run_slide(warm_files, models.runners, models.algorithm, options, Path(scratch) / "warm", None)  # compiles
        warm_seconds = time.perf_counter() - t0
        out_dir = Path(scratch) / "out"
        out_dir.mkdir()
        with GpuSampler() as sampler:
            run = run_slide(files, models.runners, models.algorithm, options, out_dir, sampler)
    stats, reads = run["stats"], run["reads"]
    samples = sampler.between(*run["inference_window"])
    inference_wall = run["stages"]["inference"]
    networks = []
    total_flop = 0.0
    by_name = {r.name: r for r in models.runners}
    for n in stats.networks:
        flop = flops_per_tile(by_name[n.name].loaded.model)
        total_flop += flop * n.tiles_inferred
        networks.append({
            "name": n.name,
            "tiles": n.tiles_inferred,
            "tiles_total": n.tiles_total,
            "predict_seconds": n.model_seconds,
            "tiles_per_s_in_predict": n.tiles_inferred / n.model_seconds if n.model_seconds else None,
            "tiles_per_s_over_inference": n.tiles_inferred / inference_wall if inference_wall else None,
            "gflop_per_tile": flop / 1e9,
        })
    peak = DENSE_PEAK[FLOOR_DEVICE][precision]
    figures = {
        "slide": {"width_px": size[0], "height_px": size[1], "um_per_px": SLIDE_UM_PER_PX, "how": size_note,
                  "asked": list(asked), "generation_seconds": gen_seconds, "files_bytes": sum(f.stat().st_size for f in files),
                  "tissue_fraction": stats.tissue_fraction},
        "device": {"used": models.device, "gpu": gpu_name(), "keras_backend": keras.backend.backend(),
                   "precision": precision, "batch_size": batch, "decode_threads": threads, "lookahead": options.lookahead,
                   "usable_cpus": len(os.sched_getaffinity(0))},
        "load_seconds": load_seconds,
        "warmup_seconds": warm_seconds,
        "slide_wall_seconds": run["wall"],
        "stages": run["stages"],
        "networks": networks,
        "frames": {"decoded": stats.frames_decoded, "needed": stats.frames_needed,
                   "decode_thread_seconds": reads.seconds,
                   "frames_per_thread_second": reads.frames / reads.seconds if reads.seconds else None,
                   "megapixels_per_thread_second": reads.pixels / 1e6 / reads.seconds if reads.seconds else None,
                   "frames_per_wall_second_of_inference": reads.frames / inference_wall if inference_wall else None},
        "gpu": {"sampled": sampler.available, "samples": len(samples),
                "busy_mean_utilisation": (sum(s[1] for s in samples) / len(samples) / 100) if samples else None,
                "busy_share_of_samples": (sum(1 for s in samples if s[1] > 0) / len(samples)) if samples else None,
                "peak_memory_mib": max((s[2] for s in sampler.samples), default=None)},
        "peak_rss_bytes": peak_rss_bytes(),
        "outputs": {"files": run["files_written"], "bytes": run["bytes_written"]},
        "floor": {"device": FLOOR_DEVICE, "precision": precision, "dense_peak_flop_per_s": peak,
                  "total_flop": total_flop, "seconds": total_flop / peak},
        "total_seconds": time.perf_counter() - started,
    }
    print(render(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str), encoding="utf-8")
    return 0


def _f(x, fmt: str = ".2f", none: str = "n/a") -> str:
    return none if x is None else format(x, fmt)


def render(f: dict[str, Any]) -> str:
    s, d, fr, g, fl = f["slide"], f["device"], f["frames"], f["gpu"], f["floor"]
    lines = [
        f"slide        {s['width_px']} x {s['height_px']} px at {s['um_per_px']} µm/px ({s['how']}); "
        f"tissue {100 * s['tissue_fraction']:.0f} %",
        f"device       {d['used']} {d['gpu'] or ''} (keras {d['keras_backend']}, {d['precision']}, batch {d['batch_size']}, "
        f"{d['decode_threads']} decode threads, {d['usable_cpus']} CPUs)",
        f"slide wall   {f['slide_wall_seconds']:.2f} s end to end (model loading {f['load_seconds']:.1f} s and "
        f"warm-up {f['warmup_seconds']:.1f} s before it)",
        "stages       " + ", ".join(f"{k} {v:.2f} s" for k, v in f["stages"].items()),
    ]
    for n in f["networks"]:
        lines.append(
            f"network      {n['name']}: {n['tiles']} tiles, {_f(n['tiles_per_s_in_predict'], '.1f')} tiles/s in predict, "
            f"{_f(n['tiles_per_s_over_inference'], '.1f')} tiles/s over the inference stage; {n['gflop_per_tile']:.2f} GFLOP/tile"
        )
    lines += [
        f"decode       {fr['decoded']} frames for {fr['needed']} needed; {_f(fr['frames_per_thread_second'], '.0f')} frames/s "
        f"per decode thread ({_f(fr['megapixels_per_thread_second'], '.1f')} MPx/s), "
        f"{_f(fr['frames_per_wall_second_of_inference'], '.0f')} frames/s over the inference stage",
        f"gpu busy     {_f(g['busy_mean_utilisation'])} mean utilisation, {_f(g['busy_share_of_samples'])} of samples busy "
        f"({g['samples']} samples{'' if g['sampled'] else '; no nvidia-smi'}); peak GPU memory {_f(g['peak_memory_mib'], '.0f')} MiB",
        f"peak RSS     {f['peak_rss_bytes'] / 2**20:.0f} MiB",
        f"floor        {fl['total_flop'] / 1e12:.2f} TFLOP / {fl['dense_peak_flop_per_s'] / 1e12:.0f} TFLOP/s "
        f"({fl['device']} dense {fl['precision']}) = {fl['seconds']:.3f} s",
        f"outputs      {f['outputs']['files']} files, {f['outputs']['bytes'] / 2**20:.1f} MiB; total {f['total_seconds']:.0f} s",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
