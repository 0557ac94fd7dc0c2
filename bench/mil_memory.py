"""MIL bag memory: a 100,000-tile slide's embeddings through the bounded bag and the reference ABMIL.

    .venv/bin/python bench/mil_memory.py [--tiles 100000] [--dims 1024 768] [--out docs/benchmarks.md]

For each embedding size D, in a fresh interpreter (so each peak is its own):

1. Keras is imported and an ABMIL head (glio_node/runtime/mil.py ``build_abmil(D, 2)``, the
   defaults: hidden 128, attention 64) is built and run once on a small bag (warm-up); the
   peak-RSS counter is then reset (``/proc/self/clear_refs`` 5) and the resident set noted;
2. the bag (``pipeline.bag.EmbeddingBag``, float16 N x D, preallocated) is filled the way the
   pipeline fills it, batch by batch (random float32 embeddings of 64 tiles at a time, each
   batch dropped after it is copied in), under ``tracemalloc``;
3. the head runs on the whole bag through ``runtime.bag_runner.Aggregator`` (as the worker
   calls it: the float16 bag cast to float32, B = 1).

Reported: the bag's bytes (N x D x 2, exact), the tracemalloc peak while filling, the peak RSS
above the step-1 resident set for fill and ABMIL together, and the ABMIL call's seconds.  With
``--out``, the table replaces the section between ``<!-- mil-memory:begin -->`` and
``<!-- mil-memory:end -->`` of that page (inside its hand-written analysis, which
bench/pipeline.py keeps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- mil-memory:begin -->", "<!-- mil-memory:end -->"


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(tiles: int, dim: int) -> dict:
    """One run (in this process): see the module docstring."""
    import tracemalloc

    import numpy as np

    from glio_node import coding
    from glio_node.bundle import HeadSpec, LoadedNetwork, NetworkSpec
    from glio_node.pipeline.bag import EmbeddingBag, bag_bytes
    from glio_node.runtime.bag_runner import Aggregator
    from glio_node.runtime.mil import build_abmil

    model = build_abmil(dim, 2)
    spec = NetworkSpec("bench-abmil", "bench-abmil.keras", None, None, None, None, None,
                       (HeadSpec("mgmt", coding.MGMT_CLASSES),), kind="aggregator", embed_dim=dim, encoder="enc")
    head = Aggregator(LoadedNetwork(spec, (model,)))
    rng = np.random.default_rng(0)
    head.predict_bag(rng.standard_normal((256, dim)).astype(np.float16))  # warm-up: tracing, allocator pools
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    tracemalloc.start()
    bag = EmbeddingBag(tiles, dim)
    for start in range(0, tiles, 64):
        n = min(64, tiles - start)
        batch = rng.standard_normal((n, dim), dtype=np.float32)
        bag.add(np.zeros(n, np.int32), np.zeros(n, np.int32), batch)
        del batch
    _, fill_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after_fill = _status("VmHWM")
    t0 = time.perf_counter()
    probabilities, attention = head.predict_bag(bag.embeddings)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    assert attention.shape == (1, tiles) and abs(float(attention.sum()) - 1.0) < 1e-3
    return {
        "tiles": tiles, "dim": dim, "bag_bytes": bag.nbytes, "bag_bytes_formula": bag_bytes(tiles, dim),
        "fill_tracemalloc_peak": fill_peak, "fill_rss_over_base": after_fill - base,
        "peak_rss_over_base": peak - base, "base_rss": base, "abmil_seconds": seconds,
    }


def _mb(b: int) -> str:
    return f"{b / 1e6:,.0f} MB"


def table(runs: list[dict], machine: dict) -> str:
    lines = [
        BEGIN,
        "### MIL bag memory (bench/mil_memory.py)",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine['cpu']}, {machine['usable_cpus']} usable CPUs, "
        f"{machine['ram_bytes'] / 2**30:.1f} GiB RAM, Python {machine['python']}, TensorFlow/Keras "
        f"{machine['versions'].get('tensorflow')}/{machine['versions'].get('keras')}; CPU only.  The bag is the one "
        "slide-sized buffer of a two-stage task: float16, preallocated, N x D x 2 bytes.  The ABMIL call adds "
        "a transient float32 copy of the bag (N x D x 4) and the head's activations (N x 128 and N x 64 float32, "
        "a few of each).",
        "",
        "| tiles N | dims D | bag (N x D x 2) | tracemalloc peak, filling | peak RSS above start: filling | peak RSS above start: filling + ABMIL | ABMIL call |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r['tiles']:,} | {r['dim']:,} | {_mb(r['bag_bytes'])} | {_mb(r['fill_tracemalloc_peak'])} | "
            f"{_mb(r['fill_rss_over_base'])} | {_mb(r['peak_rss_over_base'])} | {r['abmil_seconds']:.1f} s |"
        )
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=100_000)
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 768])
    p.add_argument("--out", type=Path, help="markdown page to update (its mil-memory section)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one D in this process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.tiles, args.one)))
        return 0
    runs = []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    for dim in args.dims:
        done = subprocess.run([sys.executable, __file__, "--tiles", str(args.tiles), "--one", str(dim)],
                              env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-3000:])
            return done.returncode
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    sys.path.insert(0, str(REPO / "bench"))
    from machine import describe

    section = table(runs, describe(["tensorflow", "keras", "numpy"]))
    print(section)
    if args.out:
        text = args.out.read_text(encoding="utf-8")
        if BEGIN in text:
            head, rest = text.split(BEGIN, 1)
            text = head + section + rest.split(END, 1)[1]
        else:
            text = text.replace("<!-- analysis:end -->", section + "\n\n<!-- analysis:end -->", 1)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
