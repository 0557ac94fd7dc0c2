"""Keras against ONNX Runtime on the same networks: ``bench/pipeline.py --runtimes keras,onnx``.

The bundle's Keras networks are exported with the project's own route (``python -m training
export-onnx``, Keras' ``model.export(format="onnx")``; cached beside the generated slides, keyed by
the source manifest's SHA-256), then both bundles run the same slide in the same process:

- **model alone**: each network's ``predict`` on the tiles the pipeline fed it (recorded in the
  Keras warm-up pass), in the pipeline's batches, for each runtime in turn;
- **pipeline**: DICOM files to SEG, SR and heatmaps written (``bench/pipeline.pipeline_pass``),
  with each runtime's networks; the per-network ``predict`` time inside it is reported too.

Passes alternate runtimes and swap which goes first from pass to pass, so drift on a shared
machine hits both alike.  A sanity line compares the outputs on the recorded tiles (largest
probability difference, label agreement) and the slide calls of the two warm-up passes.  Then the
ONNX networks alone under a few ONNX Runtime thread settings (``glio_node/runtime/onnx_runner.py``
turns intra-op spinning off and leaves the intra-op thread count at ONNX Runtime's default), and a
pipeline pass with spinning back on, since spinning only costs when something runs beside the model.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.pipeline import (
    RecordingNetwork,
    ensure_slide,
    fmt_s,
    median,
    model_pass,
    pipeline_pass,
)

logger = logging.getLogger("bench.pipeline")

RUNTIMES = ("keras", "onnx")
SECTION_BEGIN = "<!-- runtimes:begin -->"
SECTION_END = "<!-- runtimes:end -->"


def ensure_onnx_bundle(bundle_dir: Path, cache: Path) -> Path:
    """The ONNX export of ``bundle_dir`` made by ``python -m training export-onnx``, written once
    into ``cache`` (keyed by the source manifest's SHA-256) and reused."""
    sha = hashlib.sha256((bundle_dir / "manifest.toml").read_bytes()).hexdigest()
    folder = cache / f"{bundle_dir.name}-onnx-{sha[:16]}"
    if (folder / "manifest.toml").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache)) / "bundle"
    logger.info("exporting %s to ONNX (python -m training export-onnx; once, reused afterwards)", bundle_dir)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "training", "export-onnx", "--bundle", str(bundle_dir), "--out", str(staging)],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"python -m training export-onnx failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    return folder


def agreement(keras_nets, onnx_nets, recorded: dict[str, list[np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Per network and head, on the recorded tiles: the largest absolute probability difference
    (classifier heads) or the fraction of pixels with the same label (segmentation heads)."""
    out: dict[str, dict[str, Any]] = {}
    onnx_by_name = {n.name: n for n in onnx_nets}
    for k in keras_nets:
        o = onnx_by_name[k.name]
        per: dict[str, Any] = {}
        for batch in recorded[k.name]:
            pk, po = k.predict(batch), o.predict(batch)
            for head in k.heads:
                a, b = np.asarray(pk[head.task]), np.asarray(po[head.task])
                if head.task == "segmentation":
                    same, total = per.get(head.task, (0, 0))
                    per[head.task] = (same + int((a == b).sum()), total + a.size)
                else:
                    per[head.task] = max(per.get(head.task, 0.0), float(np.abs(a.astype(np.float64) - b).max()))
        out[k.name] = {
            t: ({"label_agreement": v[0] / v[1], "pixels": v[1]} if t == "segmentation" else {"max_probability_difference": v})
            for t, v in per.items()
        }
    return out


def slide_calls(result) -> dict[str, dict[str, Any]]:
    return {
        str(c.task): {"call": c.call.name if c.call else None, "probabilities": list(c.probabilities)} for c in result.calls
    }


def onnx_variants(onnx_nets, onnx_dir: Path, batch_size: int, usable_cpus: int):
    """(label, networks) per ONNX Runtime thread setting, sessions made afresh from the same files."""
    import onnxruntime as ort

    from glio_node.runtime.onnx_runner import OnnxNetwork

    settings = [
        ("as shipped: default intra-op threads, spinning off", 0, "0"),
        ("default intra-op threads, spinning on (ONNX Runtime's default)", 0, "1"),
        ("1 intra-op thread", 1, "0"),
        (f"{usable_cpus} intra-op threads (usable CPUs), spinning off", usable_cpus, "0"),
    ]
    for label, threads, spin in settings:
        nets = []
        for n in onnx_nets:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", spin)
            session = ort.InferenceSession(str(onnx_dir / n.loaded.spec.file), sess_options=options, providers=["CPUExecutionProvider"])
            nets.append(OnnxNetwork(dataclasses.replace(n.loaded, model=session), batch_size))
        yield label, threads, spin, nets


def compare_size(
    size: int, args, bundles: dict, networks: dict, onnx_dir: Path, options, scratch: Path, usable_cpus: int
) -> dict[str, Any]:
    from glio_node.pipeline.analyze import analyze
    from glio_node.runtime.slide_reader import DicomSlide

    files = ensure_slide(size, args.cache)
    recorded: dict[str, dict[str, list[np.ndarray]]] = {}
    warm_calls = {}
    for rt in RUNTIMES:
        logger.info("%d px, %s: warm-up pass (records the tiles)", size, rt)
        recorders = [RecordingNetwork(n) for n in networks[rt]]
        with DicomSlide.open(files) as slide:
            result, _, _ = analyze(slide, recorders, bundles[rt].algorithm, options)
        recorded[rt] = {r.name: r.batches for r in recorders}
        warm_calls[rt] = slide_calls(result)
    same_tiles = all(
        len(recorded["keras"][n]) == len(recorded["onnx"][n])
        and all(np.array_equal(a, b) for a, b in zip(recorded["keras"][n], recorded["onnx"][n]))
        for n in recorded["keras"]
    )
    tiles = recorded["keras"]
    del recorded
    logger.info("%d px: output agreement on the recorded tiles", size)
    agree = agreement(networks["keras"], networks["onnx"], tiles)

    model_runs: dict[str, list] = {rt: [] for rt in RUNTIMES}
    pipe_runs: dict[str, list] = {rt: [] for rt in RUNTIMES}
    for i in range(args.passes):
        order = RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]
        for rt in order:
            model_runs[rt].append(model_pass(networks[rt], tiles))
        for rt in order:
            pipe_runs[rt].append(pipeline_pass(files, networks[rt], bundles[rt].algorithm, options, scratch))
        logger.info(
            "%d px: pass %d/%d: pipeline keras %.2f s, onnx %.2f s", size, i + 1, args.passes,
            pipe_runs["keras"][-1]["wall"], pipe_runs["onnx"][-1]["wall"],
        )

    variants = []
    for label, threads, spin, nets in onnx_variants(networks["onnx"], onnx_dir, options.batch_size, usable_cpus):
        logger.info("%d px: ONNX Runtime %s", size, label)
        model_pass(nets, tiles)  # warm-up of the fresh sessions
        runs = [model_pass(nets, tiles) for _ in range(args.passes)]
        pipe = [pipeline_pass(files, nets, bundles["onnx"].algorithm, options, scratch) for _ in range(args.passes)]
        variants.append({"label": label, "intra_op_threads": threads, "spinning": spin, "model_runs": runs, "pipeline_runs": pipe})

    return {
        "size": size,
        "same_tiles": same_tiles,
        "tiles": {n: sum(len(b) for b in bs) for n, bs in tiles.items()},
        "agreement": agree,
        "slide_calls": warm_calls,
        "model_runs": model_runs,
        "pipeline_runs": pipe_runs,
        "onnx_thread_variants": variants,
    }


def run_comparison(args, hw: dict[str, Any], used_device: str, started: float) -> dict[str, Any]:
    """Every figure of the runtime section for ``args.bundle`` at ``args.sizes``."""
    import onnxruntime as ort

    from glio_node.bundle import load_bundle
    from glio_node.pipeline.analyze import AnalysisOptions
    from glio_node.runtime.runners import bundle_networks

    onnx_dir = ensure_onnx_bundle(args.bundle, args.cache.parent / "bench-bundles")
    bundles, networks, load_s = {}, {}, {}
    for rt, path in (("keras", args.bundle), ("onnx", onnx_dir)):
        t0 = time.perf_counter()
        bundles[rt] = load_bundle(path, args.device)
        networks[rt] = bundle_networks(bundles[rt], args.batch_size, args.precision)
        load_s[rt] = time.perf_counter() - t0
    if {n.loaded.spec.runtime for n in networks["onnx"]} != {"onnx"} or {n.loaded.spec.runtime for n in networks["keras"]} != {"keras"}:
        raise RuntimeError(f"--runtimes keras,onnx needs a bundle of Keras networks; {args.bundle} is not one")
    options = AnalysisOptions(batch_size=args.batch_size, decode_threads=args.threads, lookahead=args.lookahead)
    runs = []
    with tempfile.TemporaryDirectory(prefix="glio-bench-rt-") as scratch:
        for size in args.sizes:
            runs.append(compare_size(size, args, bundles, networks, onnx_dir, options, Path(scratch), hw["usable_cpus"]))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hw,
        "onnxruntime": ort.__version__,
        "onnx_providers": sorted({p for n in networks["onnx"] for p in n.loaded.model.get_providers()}),
        "loadavg_end": os.getloadavg(),
        "total_seconds": time.perf_counter() - started,
        "command": " ".join([".venv/bin/python", "bench/pipeline.py", *sys.argv[1:]]),
        "device": used_device,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "passes": args.passes,
        "bundle": {"keras": str(args.bundle), "onnx": str(onnx_dir), "name": bundles["keras"].algorithm.name,
                   "version": bundles["keras"].algorithm.version},
        # "... model.export(format='onnx') through tf2onnx 1.17.0, opset 15." -> " through tf2onnx 1.17.0, opset 15"
        "export_route": bundles["onnx"].manifest.provenance.rsplit("model.export(format='onnx')", 1)[-1].rstrip("."),
        "load_seconds": load_s,
        "networks": [n.name for n in networks["keras"]],
        "runs": runs,
    }


def _tps(run: dict[str, Any], net: str) -> float:
    r = run["networks"][net]
    return r["tiles"] / r["wall"] if r["wall"] else float("nan")


def _tps_pipe(run: dict[str, Any], net: str) -> float:
    s = run["model_seconds"][net]
    return run["tiles_inferred"][net] / s if s else float("nan")


def render_section(comparisons: list[dict[str, Any]]) -> str:
    """The markdown section (between the runtimes markers) for one run: one comparison per bundle."""
    c0 = comparisons[0]
    hw = c0["hardware"]
    la0, la1 = hw["loadavg_start"], comparisons[-1]["loadavg_end"]
    v = hw["versions"]
    lines = [SECTION_BEGIN, "## Keras and ONNX Runtime on the same networks", ""]
    add = lines.append
    add(
        "Generated by `bench/pipeline.py --runtimes keras,onnx` (bench/runtimes.py); a plain run keeps this "
        "section when it rewrites the page. Each bundle's Keras networks are exported with `python -m training "
        f"export-onnx` (Keras' `model.export(format=\"onnx\")`{c0['export_route']}) and both bundles run the same "
        "slide in one process: the networks alone on the exact tiles the pipeline fed them (recorded in a warm-up "
        "pass, replayed in its batches), and the whole pipeline (DICOM files to SEG, SR and heatmaps written). "
        "Passes alternate runtimes, the first runtime swapping from pass to pass; medians over "
        f"{c0['passes']} passes. Tiles/s in the pipeline = tiles / seconds inside that network's `predict`."
    )
    add("")
    add("    " + c0["command"])
    add("")
    add(
        f"Run {c0['date']} on {hw.get('cpu', '?')}, {hw['usable_cpus']} usable CPUs, device {c0['device']}, "
        f"TensorFlow {v.get('tensorflow')} / Keras {v.get('keras')}, onnxruntime {c0['onnxruntime']} "
        f"({', '.join(c0['onnx_providers'])}), batch {c0['batch_size']}, precision {c0['precision']} (Keras). "
        f"Load average (1/5/15 min) at start {la0[0]:.2f} / {la0[1]:.2f} / {la0[2]:.2f}, at end "
        f"{la1[0]:.2f} / {la1[1]:.2f} / {la1[2]:.2f}: **the machine was shared with other work during this run** "
        "(about seven other engineers' builds and tests on the same 2 cores), so absolute figures move by tens of "
        "percent between runs; quote the ratios, and only from this one run. "
        f"Total {comparisons[-1]['total_seconds'] / 60:.1f} min."
    )
    add("")
    for c in comparisons:
        add(f"### {c['bundle']['name']} {c['bundle']['version']}")
        add("")
        add(
            f"Bundles loaded in {fmt_s(c['load_seconds']['keras'])} (Keras, `{c['bundle']['keras']}`) and "
            f"{fmt_s(c['load_seconds']['onnx'])} (ONNX, its export)."
        )
        add("")
        for r in c["runs"]:
            lines.extend(_render_size(c, r))
    add(SECTION_END)
    return "\n".join(lines)


def _render_size(c: dict[str, Any], r: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    add = lines.append
    s = r["size"]
    add(f"#### {s} × {s} px slide")
    add("")
    add("| network | tiles | Keras tiles/s alone | ONNX tiles/s alone | ONNX / Keras | Keras tiles/s in pipeline | ONNX tiles/s in pipeline | ONNX / Keras |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in c["networks"]:
        ka = median([_tps(m, n) for m in r["model_runs"]["keras"]])
        oa = median([_tps(m, n) for m in r["model_runs"]["onnx"]])
        kp = median([_tps_pipe(p, n) for p in r["pipeline_runs"]["keras"]])
        op = median([_tps_pipe(p, n) for p in r["pipeline_runs"]["onnx"]])
        add(f"| {n} | {r['tiles'][n]} | {ka:.1f} | {oa:.1f} | {oa / ka:.2f} | {kp:.1f} | {op:.1f} | {op / kp:.2f} |")
    kw = median([p["wall"] for p in r["pipeline_runs"]["keras"]])
    ow = median([p["wall"] for p in r["pipeline_runs"]["onnx"]])
    km = median([m["wall"] for m in r["model_runs"]["keras"]])
    om = median([m["wall"] for m in r["model_runs"]["onnx"]])
    add("")
    add("| wall (median) | Keras | ONNX | ONNX / Keras |")
    add("| --- | --- | --- | --- |")
    add(f"| all networks alone | {fmt_s(km)} | {fmt_s(om)} | {om / km:.2f} |")
    add(f"| whole pipeline | {fmt_s(kw)} | {fmt_s(ow)} | {ow / kw:.2f} |")
    add("")
    add("Every pass (wall seconds, networks alone / whole pipeline): " + "; ".join(
        f"{rt} " + ", ".join(f"{m['wall']:.2f}/{p['wall']:.2f}" for m, p in zip(r["model_runs"][rt], r["pipeline_runs"][rt]))
        for rt in RUNTIMES
    ) + ".")
    add("")
    parts = []
    for n, heads in r["agreement"].items():
        for t, a in heads.items():
            if "label_agreement" in a:
                parts.append(f"{n}/{t}: labels identical on {100 * a['label_agreement']:.4f} % of {a['pixels']:,} px")
            else:
                parts.append(f"{n}/{t}: max |Δp| {a['max_probability_difference']:.1e}")
    kc, oc = r["slide_calls"]["keras"], r["slide_calls"]["onnx"]
    same_calls = set(kc) == set(oc) and all(kc[t]["call"] == oc[t]["call"] for t in kc)
    dp = max((abs(a - b) for t in kc for a, b in zip(kc[t]["probabilities"], oc[t]["probabilities"])), default=0.0)
    add(
        "Sanity (Keras against ONNX on the recorded tiles): " + "; ".join(parts)
        + f". Slide calls {'identical' if same_calls else '**differ**'} (max |Δp| of the slide probabilities {dp:.1e}); "
        f"the pipeline fed both runtimes {'the same' if r['same_tiles'] else '**different**'} tiles."
    )
    add("")
    add("ONNX Runtime thread settings (the ONNX networks only; fresh sessions from the same files, one warm-up call each):")
    add("")
    add("| setting | " + " | ".join(f"{n} tiles/s alone" for n in c["networks"]) + " | "
        + " | ".join(f"{n} tiles/s in pipeline" for n in c["networks"]) + " | pipeline wall |")
    add("| --- |" + " --- |" * (2 * len(c["networks"]) + 1))
    for var in r["onnx_thread_variants"]:
        alone = [median([_tps(m, n) for m in var["model_runs"]]) for n in c["networks"]]
        pipe = [median([_tps_pipe(p, n) for p in var["pipeline_runs"]]) for n in c["networks"]]
        wall = median([p["wall"] for p in var["pipeline_runs"]])
        add(f"| {var['label']} | " + " | ".join(f"{x:.1f}" for x in alone) + " | "
            + " | ".join(f"{x:.1f}" for x in pipe) + f" | {fmt_s(wall)} |")
    add("")
    return lines


def previous_section(text: str) -> str | None:
    start, end = text.find(SECTION_BEGIN), text.find(SECTION_END)
    if start < 0 or end < start:
        return None
    return text[start : end + len(SECTION_END)]


def with_section(page: str, section: str) -> str:
    """``page`` with ``section`` in place of its runtimes section, or before its analysis section."""
    old = previous_section(page)
    if old is not None:
        return page.replace(old, section)
    cut = page.find("## Analysis")
    if cut < 0:
        return page.rstrip("\n") + "\n\n" + section + "\n"
    return page[:cut] + section + "\n\n" + page[cut:]
