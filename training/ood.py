"""Fit a bundle's out-of-distribution reference (glio_node/ood.py) from a patient split.

The reference is fitted on the **training** patients' classifier tiles, the two slide thresholds
on the **validation** patients' slides (glio_node/ood.py says how); the test
patients are never used, so a test figure with the gate on stays a test figure.  Features are
the classifier's global-average-pooled layer ``features`` (glio_node.runtime.networks), taken
through the same sub-model the worker builds (``keras_runner.with_features``), on tiles
normalised as the bundle says.

``train`` calls ``fit_gate`` for every new bundle; ``python -m training fit-ood --bundle B
--config C`` (``add_to_bundle``) adds a gate to an existing bundle from its config's split
without retraining.  Two-stage (MIL) bundles: the gate is on the encoder, its features the
embeddings (``fit_mil_gate``, from the embedding cache); ``train-mil`` fits it by default and
``fit-ood --bundle B --mil-run RUN --dataset D`` (``add_to_mil_bundle``) adds it to an existing
bundle from the run's split.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from glio_node.bundle import Manifest, OodSpec, load_bundle, verify_bundle, write_bundle
from glio_node.ood import (
    DEFAULT_COMPONENTS,
    DEFAULT_MARGIN,
    DEFAULT_QUANTILE,
    FEATURES_KEY,
    OodReference,
    fit_lower_threshold,
    fit_reference,
    fit_slide_threshold,
    save_reference,
    slide_score,
    tile_scores,
)

FEATURES_LAYER = "features"  # build_classifier's GlobalAveragePooling2D
OOD_FILE = "ood-reference.npz"


@dataclass(frozen=True)
class FittedGate:
    reference: OodReference
    spec: OodSpec  # sha256 None until write_bundle hashes the file
    report: dict  # per-set slide scores (validation, and training for comparison): the run folder's ood.json


def tile_features(sub, images: np.ndarray, normalization: str, batch: int = 64) -> np.ndarray:
    """(N, T, T, 3) uint8 tiles -> (N, D) features; ``sub`` is ``keras_runner.with_features(model, layer)``."""
    from glio_node.bundle import normalize

    out = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        out.append(np.asarray(sub.predict_on_batch(normalize(chunk, normalization))[FEATURES_KEY]).reshape(len(chunk), -1))
    return np.concatenate(out)


def fit_gate(
    model,
    network: str,
    normalization: str,
    tiles_by_slide: dict[str, np.ndarray],
    train: tuple[str, ...],
    validation: tuple[str, ...],
    components: int = DEFAULT_COMPONENTS,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
) -> FittedGate:
    """A Keras classifier's gate: reference from the ``train`` slides' tiles, thresholds from the
    ``validation`` slides'; features from its ``features`` layer."""
    from glio_node.runtime.keras_runner import with_features

    sub = with_features(model, FEATURES_LAYER)
    wanted = set(train) | set(validation)  # no other slide's tiles go through the network
    features = {s: tile_features(sub, t, normalization) for s, t in tiles_by_slide.items() if s in wanted and len(t)}
    return fit_gate_on_features(features, network, FEATURES_LAYER, train, validation, components, quantile, margin)


def fit_gate_on_features(
    features_by_slide: dict[str, np.ndarray],
    network: str,
    features: str,
    train: tuple[str, ...],
    validation: tuple[str, ...],
    components: int = DEFAULT_COMPONENTS,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
) -> FittedGate:
    """Any network's gate from per-slide tile features (N_s, D): the reference from the ``train``
    slides', the two thresholds from the ``validation`` slides' (a MIL encoder's: its cached
    embeddings).  Slides in neither set are ignored, so passing the test slides changes nothing.
    The report names the slides of each set it used."""
    train_feats = {s: features_by_slide[s] for s in train if len(features_by_slide.get(s, ()))}
    if not train_feats:
        raise ValueError("no training slide has tiles: the OOD reference needs tiles")
    reference = fit_reference(np.concatenate(list(train_feats.values())), components)
    val_scores = {
        s: slide_score(tile_scores(reference, features_by_slide[s]))
        for s in validation
        if len(features_by_slide.get(s, ()))
    }
    threshold = fit_slide_threshold(list(val_scores.values()), quantile, margin)
    low = fit_lower_threshold(list(val_scores.values()), quantile, margin)
    train_scores = [slide_score(tile_scores(reference, f)) for f in train_feats.values()]
    spec = OodSpec(
        network=network, features=features, file=OOD_FILE, sha256=None, slide_threshold=threshold,
        slide_threshold_low=low,
        quantile=quantile, margin=margin, validation_slides=len(val_scores),
    )
    report = {
        "network": network,
        "features": features,
        "slide_threshold": threshold,
        "slide_threshold_low": low,
        "rule": (f"out above {margin} x the {quantile} quantile or below the {1 - quantile:.2f} quantile / {margin} "
                 "of the validation slides' median tile scores"),
        "components": int(reference.components.shape[0]),
        "dimensions": reference.dimensions,
        "reference_slides": sorted(train_feats),  # the reference: training slides only
        "threshold_slides": sorted(val_scores),  # the thresholds: validation slides only
        "validation_slide_scores": sorted(v for v in val_scores.values() if v is not None),
        "training_slide_scores": sorted(v for v in train_scores if v is not None),
    }
    return FittedGate(reference, spec, report)


def write_with_gate(bundle_dir: Path, manifest: Manifest, gate: FittedGate, models: dict, licences: dict | None = None, note: str = "") -> Manifest:
    """Write the bundle with its [ood] table and reference file (format 2)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / OOD_FILE
        save_reference(gate.reference, path)
        provenance = f"{manifest.provenance} {note}".strip() if note else manifest.provenance
        final = replace(manifest, format=2, ood=gate.spec, provenance=provenance)
        return write_bundle(bundle_dir, final, models, licences, ood_reference=path)


def fit_mil_gate(bags: dict, train: tuple[str, ...], validation: tuple[str, ...], encoder: str) -> FittedGate:
    """A two-stage bundle's gate on its encoder: the reference from the training slides' cached
    embeddings (training.mil.Bag), the thresholds from the validation slides'; the worker scores
    the same embeddings the aggregators read, so the gate costs no extra network call."""
    from glio_node.manifest import ENCODER_FEATURES

    wanted = set(train) | set(validation)
    features = {s: np.asarray(b.embeddings, np.float32) for s, b in bags.items() if s in wanted}
    return fit_gate_on_features(features, encoder, ENCODER_FEATURES, train, validation)


def save_gate(run_dir: Path, gate: FittedGate) -> Path:
    """The run folder's ``ood-reference.npz`` and ``ood.json`` (the spec's figures and the report)."""
    run_dir = Path(run_dir)
    path = run_dir / OOD_FILE
    save_reference(gate.reference, path)
    s = gate.spec
    spec = {"network": s.network, "features": s.features, "slide_threshold": s.slide_threshold,
            "slide_threshold_low": s.slide_threshold_low, "quantile": s.quantile, "margin": s.margin,
            "validation_slides": s.validation_slides}
    write_report(run_dir, {**gate.report, "spec": spec})
    return path


def _bundle_models(bundle_dir: Path, m: Manifest) -> tuple[dict, dict]:
    """Every network's weights file(s) and licence in ``bundle_dir``, to rewrite it byte for byte."""
    models = {n.name: [bundle_dir / w.file for w in n.folds] if n.folds else bundle_dir / n.file for n in m.networks}
    licences = {n.name: bundle_dir / n.origin.licence_file for n in m.networks if n.origin is not None}
    return models, licences


def add_to_mil_bundle(bundle_dir: Path, run_dir: Path, dataset: Path, cache_dir: Path | None = None) -> tuple[Manifest, dict]:
    """``fit-ood --mil-run``: a gate on a two-stage bundle's encoder, from the ``train-mil`` run
    that trained its heads (``RUN/metrics.json``: the split, the tile geometry, the encoder's
    SHA-256).  Embeddings come from the run's cache (keyed by that SHA-256); only the training and
    validation slides are embedded or read, the test patients' are not.  Rewrites the bundle
    with the gate (weights copied byte for byte); returns the manifest and the report."""
    from training.dataset import load_dataset
    from training.mil import Encoder, embed_slides
    from training.mil_run import SplitConfig, split_records
    from training.tiles import TileSpec

    bundle_dir, run_dir = Path(bundle_dir), Path(run_dir)
    m = verify_bundle(bundle_dir)
    encoders = [n for n in m.networks if n.kind == "encoder"]
    if len(encoders) != 1:
        raise ValueError(f"bundle {bundle_dir} has {len(encoders)} encoder networks; fit-ood --mil-run needs one")
    encoder = encoders[0]
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path} is missing: give the train-mil run folder that trained this bundle's heads")
    metrics = json.loads(metrics_path.read_text())
    if metrics["encoder"]["sha256"] != encoder.sha256:
        raise ValueError(
            f"bundle {bundle_dir}'s encoder (SHA-256 {encoder.sha256[:12]}…) is not the one run {run_dir} trained on "
            f"({metrics['encoder']['sha256'][:12]}…): give that bundle's own train-mil run"
        )
    split_cfg = SplitConfig(**metrics["split"])
    records = load_dataset(dataset)
    split, by_id = split_records(records, split_cfg)
    wanted = [by_id[s] for s in (*split.train, *split.validation)]  # the test patients' slides are not read
    bags, _ = embed_slides(wanted, TileSpec(**metrics["tile"]), Encoder(bundle_dir / encoder.file, encoder.normalization),
                           Path(dataset), Path(cache_dir) if cache_dir else Path(dataset) / ".embeddings")
    gate = fit_mil_gate(bags, split.train, split.validation, encoder.name)
    models, licences = _bundle_models(bundle_dir, m)
    note = (f"OOD reference on encoder {encoder.name!r} fitted by `python -m training fit-ood --mil-run` on the embeddings of "
            f"{len(gate.report['reference_slides'])} training slides (thresholds on {gate.spec.validation_slides} "
            "validation slides; test patients unused).")
    written = write_with_gate(bundle_dir, m, gate, models, licences, note)
    return written, gate.report


def add_to_bundle(bundle_dir: Path, config_path: Path) -> tuple[Manifest, dict]:
    """``fit-ood``: fit a gate for the existing bundle from its config's dataset and split, and
    rewrite the bundle with it (weights copied byte for byte).  Returns the manifest and the report."""
    from training.dataset import load_dataset
    from training.run import RunConfig, _splits, _subsample, ensure_dataset
    from training.tiles import TileSpec, load_or_extract

    cfg = RunConfig.load(config_path)
    ensure_dataset(cfg)
    records = load_dataset(cfg.dataset)
    split = _splits(cfg, records, config_path)[cfg.split_fold]
    bundle = load_bundle(bundle_dir, "cpu")
    m = bundle.manifest
    network = next((n for n in bundle.networks if n.spec.kind == "tiles" and n.spec.runtime == "keras"
                    and all(h.task != "segmentation" for h in n.spec.heads)), None)
    if network is None:
        raise ValueError(f"bundle {bundle_dir} has no keras classifier network to take OOD features from")
    cl = cfg.classifier
    spec = TileSpec(network.spec.um_per_px, network.spec.tile_size, cl.min_tissue)
    wanted = set(split.train) | set(split.validation)  # the test patients' slides are not even read
    tiles = {
        r.slide_id: _subsample(load_or_extract(r, spec, cfg.dataset, cfg.dataset / ".tiles"), cl.max_tiles_per_slide, cfg.seed).images
        for r in records
        if r.slide_id in wanted
    }
    gate = fit_gate(network.model, network.spec.name, network.spec.normalization, tiles, split.train, split.validation)
    models, licences = _bundle_models(Path(bundle_dir), m)
    note = (f"OOD reference fitted by `python -m training fit-ood` on the training patients of split {split.name} "
            f"(threshold on {gate.spec.validation_slides} validation slides; test patients unused).")
    written = write_with_gate(Path(bundle_dir), m, gate, models, licences, note)
    return written, gate.report


def write_report(run_dir: Path, report: dict) -> None:
    (run_dir / "ood.json").write_text(json.dumps(report, indent=2))
