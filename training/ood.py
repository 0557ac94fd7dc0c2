"""Fit a bundle's out-of-distribution reference (glio_node/ood.py) from a patient split.

The reference is fitted on the **training** patients' classifier tiles, the two slide thresholds
on the **validation** patients' slides (glio_node/ood.py says how); the test
patients are never used, so a test figure with the gate on stays a test figure.  Features are
the classifier's global-average-pooled layer ``features`` (glio_node.runtime.networks), taken
through the same sub-model the worker builds (``keras_runner.with_features``), on tiles
normalised as the bundle says.

``train`` calls ``fit_gate`` for every new bundle; ``python -m training fit-ood --bundle B
--config C`` (``add_to_bundle``) adds a gate to an existing bundle from its config's split
without retraining.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from glio_node.bundle import Manifest, OodSpec, load_bundle, write_bundle
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
    """Reference from the ``train`` slides' tiles, threshold from the ``validation`` slides'."""
    from glio_node.runtime.keras_runner import with_features

    sub = with_features(model, FEATURES_LAYER)
    train_feats = [tile_features(sub, tiles_by_slide[s], normalization) for s in train if len(tiles_by_slide.get(s, ()))]
    if not train_feats:
        raise ValueError("no training slide has classifier tiles: the OOD reference needs tiles")
    reference = fit_reference(np.concatenate(train_feats), components)
    val_scores = {
        s: slide_score(tile_scores(reference, tile_features(sub, tiles_by_slide[s], normalization)))
        for s in validation
        if len(tiles_by_slide.get(s, ()))
    }
    threshold = fit_slide_threshold(list(val_scores.values()), quantile, margin)
    low = fit_lower_threshold(list(val_scores.values()), quantile, margin)
    train_scores = [slide_score(tile_scores(reference, f)) for f in train_feats]
    spec = OodSpec(
        network=network, features=FEATURES_LAYER, file=OOD_FILE, sha256=None, slide_threshold=threshold,
        slide_threshold_low=low,
        quantile=quantile, margin=margin, validation_slides=len(val_scores),
    )
    report = {
        "slide_threshold": threshold,
        "slide_threshold_low": low,
        "rule": (f"out above {margin} x the {quantile} quantile or below the {1 - quantile:.2f} quantile / {margin} "
                 "of the validation slides' median tile scores"),
        "components": int(reference.components.shape[0]),
        "dimensions": reference.dimensions,
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
    models = {n.name: bundle_dir / n.file for n in m.networks}
    licences = {n.name: bundle_dir / n.origin.licence_file for n in m.networks if n.origin is not None}
    note = (f"OOD reference fitted by `python -m training fit-ood` on the training patients of split {split.name} "
            f"(threshold on {gate.spec.validation_slides} validation slides; test patients unused).")
    written = write_with_gate(Path(bundle_dir), m, gate, models, licences, note)
    return written, gate.report


def write_report(run_dir: Path, report: dict) -> None:
    (run_dir / "ood.json").write_text(json.dumps(report, indent=2))
