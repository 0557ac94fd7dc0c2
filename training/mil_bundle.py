"""A ``train-mil`` run -> a format-2 bundle: the encoder network and one ABMIL aggregator per task.

The manifest's two-stage networks are docs/model-bundle.md's (glio_node.bundle): one network of
kind ``encoder`` (tile -> ``embed_dim`` vector, with the tile geometry and normalisation the
worker cuts and feeds tiles by) and, per slide-level task, one of kind ``aggregator`` that names
the encoder it reads (``encoder = "encoder"``), its ``embed_dim`` and its one head (task and
classes).  An ONNX encoder declares its graph input and output, read from the graph itself.
The encoder file is copied byte for byte, so the bundle's encoder SHA-256 is the one the
embedding cache was keyed by: the heads were trained on exactly that encoder's embeddings.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

from glio_node.bundle import FORMAT, HeadSpec, NetworkOrigin, Manifest, NetworkSpec, OodSpec, TensorSpec, bundle_dir, sha256_file, verify_bundle, write_bundle
from glio_node.coding import CLASSES_BY_TASK
from training.run import INDETERMINATE_BELOW, INTENDED_USE

ENCODER_NAME = "encoder"


def _dim(d) -> int | str:
    return d if isinstance(d, int) and d > 0 else "batch"


def encoder_network(
    path: Path, tile_size: int, um_per_px: float, normalization: str, embed_dim: int, origin: NetworkOrigin | None = None
) -> NetworkSpec:
    """The encoder's network table; an ONNX graph's input and output as ONNX Runtime reads them."""
    runtime = "onnx" if path.suffix == ".onnx" else "keras"
    extra = {}
    if runtime == "onnx":
        from glio_node.runtime.onnx_runner import graph_signature, open_session  # noqa: PLC0415

        inputs, outputs = graph_signature(open_session(path, "cpu"))
        (iname, ishape, idtype), (oname, _, odtype) = inputs[0], outputs[0]
        extra = {
            "input": TensorSpec(iname, tuple(_dim(d) if i == 0 else d for i, d in enumerate(ishape)), idtype),
            "output": TensorSpec(oname, ("batch", embed_dim), odtype),
        }
    return NetworkSpec(
        name=ENCODER_NAME, file=f"{ENCODER_NAME}{path.suffix}", sha256=None, tile_size=tile_size, um_per_px=um_per_px,
        overlap=0, normalization=normalization, heads=(), runtime=runtime, kind="encoder", embed_dim=embed_dim,
        origin=origin, **extra,
    )


def aggregator_network(task: str, embed_dim: int) -> NetworkSpec:
    """One Keras ABMIL head (glio_node.runtime.mil) reading the encoder's embeddings."""
    head = HeadSpec(task, CLASSES_BY_TASK[task], indeterminate_below=INDETERMINATE_BELOW[task])
    return NetworkSpec(
        name=f"{task}-abmil", file=f"{task}-abmil.keras", sha256=None, tile_size=None, um_per_px=None, overlap=None,
        normalization=None, heads=(head,), runtime="keras", kind="aggregator", embed_dim=embed_dim, encoder=ENCODER_NAME,
    )


def write_mil_bundle(
    out_dir: Path, run_dir: Path, metrics: dict, name: str, version: str = "0.1.0",
    intended_use: str | None = None, is_demo: bool | None = None, segmentation_from: Path | None = None,
    licence: Path | None = None, source: str | None = None, licence_name: str | None = None,
) -> Manifest:
    """The bundle of a ``train_mil`` run (its ``metrics`` and ``run_dir`` with ``<task>.keras``).

    ``segmentation_from``: a verified bundle whose segmentation-only network is copied byte for
    byte into this one (optional: without it the bundle is the encoder and its heads, which the
    worker analyses without regions; e.g. the demo bundle's ``regions``).  ``licence`` and ``source``: an encoder we did not make (a local
    ONNX file, air-gapped: nothing is downloaded) is stored with its licence text and source, as
    ``glio-node models import`` stores a tile network, and named in every output.  Raises
    BundleError, ValueError naming what to fix.
    """
    encoder_path = Path(metrics["encoder"]["file"])
    if sha256_file(encoder_path) != metrics["encoder"]["sha256"]:
        raise ValueError(f"encoder {encoder_path} changed since the heads were trained on its embeddings; rerun train-mil")
    tile = metrics["tile"]
    embed_dim = int(metrics["embed_dim"])
    synthetic = bool(metrics.get("synthetic"))
    is_demo = synthetic if is_demo is None else is_demo
    intended_use = intended_use or ("DEMO model trained on synthetic slides only. " if is_demo else "") + INTENDED_USE
    if (licence is None) != (source is None):
        raise ValueError("give both --licence and --source for an encoder we did not make, or neither")
    origin = None
    licences: dict[str, Path] = {}
    if licence is not None:
        from glio_node.bundle_import import licence_title  # noqa: PLC0415

        origin = NetworkOrigin(source, f"{ENCODER_NAME}.LICENCE.txt", None,
                               licence_name or licence_title(Path(licence).read_text(encoding="utf-8")))
        licences[ENCODER_NAME] = Path(licence)
    networks = [encoder_network(encoder_path, tile["tile_size"], tile["um_per_px"], metrics["normalization"], embed_dim, origin)]
    models: dict[str, Path] = {ENCODER_NAME: encoder_path}
    validation: dict[str, float] = {}
    if segmentation_from is not None:
        source = verify_bundle(segmentation_from)
        segs = [n for n in source.networks if n.tasks == ("segmentation",)]
        if len(segs) != 1:
            raise ValueError(f"bundle {segmentation_from} has {len(segs)} segmentation-only networks; name a bundle with exactly one")
        networks.append(segs[0])
        models[segs[0].name] = bundle_dir(segmentation_from) / segs[0].file
        if segs[0].origin is not None:
            licences[segs[0].name] = bundle_dir(segmentation_from) / segs[0].origin.licence_file
        provenance_seg = f" Segmentation network {segs[0].name!r} copied from bundle {source.name} {source.version}."
    else:
        provenance_seg = ""
    for task, t in metrics["tasks"].items():
        spec = aggregator_network(task, embed_dim)
        networks.append(spec)
        models[spec.name] = Path(run_dir) / f"{task}.keras"
        for where, key in (("test", "test"), ("validation", "val")):
            m = t[where]
            validation[f"{key}_{task}_slide_accuracy"] = m["accuracy"]
            if "roc_auc" in m:
                validation[f"{key}_{task}_slide_roc_auc"] = m["roc_auc"]
                lo, hi = m["roc_auc_ci"]
                validation[f"{key}_{task}_slide_roc_auc_ci_low"], validation[f"{key}_{task}_slide_roc_auc_ci_high"] = lo, hi
    provenance = (
        f"ABMIL heads trained by `python -m training train-mil` on {metrics['sets']['train']['slides']} training slides "
        f"(checkpoint on {metrics['sets']['validation']['slides']} validation slides, test scored once on "
        f"{metrics['sets']['test']['slides']}) from embeddings of encoder {encoder_path.name} "
        f"(SHA-256 {metrics['encoder']['sha256']})" + ("; synthetic slides" if synthetic else "") + "." + provenance_seg
    )
    ood, reference = _run_gate(Path(run_dir), metrics)
    if ood is not None:
        provenance += (f" Out-of-distribution gate on the encoder's embeddings: reference from the "
                       f"{len(metrics['ood']['reference_slides'])} training slides, thresholds from the "
                       f"{ood.validation_slides} validation slides (test patients unused).")
    manifest = Manifest(
        name=name, version=version, uid=f"2.25.{uuid.uuid4().int}", intended_use=intended_use, is_demo=is_demo,
        provenance=provenance, created=datetime.now(UTC).replace(microsecond=0), networks=tuple(networks),
        validation={k: float(v) for k, v in validation.items() if v == v}, format=FORMAT, ood=ood,
    )
    return write_bundle(out_dir, manifest, models, licences, ood_reference=reference)


def _run_gate(run_dir: Path, metrics: dict) -> tuple[OodSpec | None, Path | None]:
    """The run's encoder gate (``train_mil(ood=True)``'s ood.json and reference), or (None, None)."""
    if "ood" not in metrics:
        return None, None
    reference = run_dir / metrics["ood"]["file"]
    report = run_dir / "ood.json"
    if not reference.is_file() or not report.is_file():
        raise ValueError(f"run {run_dir} lists an OOD gate but {reference.name} or ood.json is missing; rerun train-mil")
    spec = json.loads(report.read_text())["spec"]
    return OodSpec(file=reference.name, sha256=None, **spec), reference
