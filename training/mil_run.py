"""``python -m training encoder`` and ``train-mil``: a small tile encoder, then ABMIL heads on it.

``encoder``: our own tiny tile encoder for the worked example and the minority-tissue experiment
(docs/training.md, "Attention-MIL").  A small VGG-shaped CNN (glio_node.runtime.networks
build_classifier) is trained briefly as a *tile classifier on slide labels* (every tile of a slide
carries its slide's label; early stopping on the validation patients' tiles), and then:

- truncated to its global-average-pooled features: ``encoder.keras``, tile -> embedding, the
  encoder a two-stage bundle runs (export it with ``export-onnx-encoder`` to ONNX);
- kept whole as the baseline of the seed's 2021 method: ``tile-classifier.keras``, whose slide
  call is the mean of its tile probabilities.  It is scored once on the test patients here
  (``baseline.json``), on the same split ``train-mil`` uses, so both figures are comparable.

``train-mil``: embeddings of every slide once (cached, training/mil.py), an ABMIL head per task
trained on the training patients (checkpoint on validation), scored once on the test patients;
``metrics.json`` in the run folder, and a format-2 bundle of the encoder and the heads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training.dataset import LABEL_VALUES, SlideRecord, load_dataset
from training.mil import Encoder, MilConfig, embed_slides, predict, score, train_abmil
from training.splits import Split, make_splits
from training.synthetic_dataset import PARAMETERS_FILE
from training.tiles import TileSpec, load_or_extract

@dataclass(frozen=True)
class SplitConfig:
    """The patient split both commands use: the same arguments give the same split."""

    seed: int = 0
    validation_fraction: float = 0.25
    test_fraction: float = 0.3
    stratify: str = "egfr"


def split_records(records: list[SlideRecord], split: SplitConfig) -> tuple[Split, dict[str, SlideRecord]]:
    s = make_splits(records, "fixed", split.seed, split.validation_fraction, 5, split.test_fraction, split.stratify)[0]
    return s, {r.slide_id: r for r in records}


def _truth(records: list[SlideRecord], task: str) -> np.ndarray:
    values = LABEL_VALUES[task]
    missing = [r.slide_id for r in records if r.labels.get(task) is None]
    if missing:
        raise ValueError(f"task {task!r}: slides {', '.join(missing[:5])} have no label; label them or leave them out of labels.csv")
    return np.array([values.index(r.labels[task]) for r in records])


def _sets(split: Split, by_id: dict[str, SlideRecord]) -> dict[str, list[SlideRecord]]:
    return {name: [by_id[i] for i in getattr(split, name)] for name in ("train", "validation", "test")}


def build_encoder(
    dataset: Path, out_dir: Path, task: str, spec: TileSpec, split: SplitConfig = SplitConfig(),
    epochs: int = 4, blocks: int = 2, base_filters: int = 8, batch_size: int = 64, patience: int = 2,
    normalization: str = "scale_0_1", verbose: int = 0,
) -> dict:
    """Train the tile classifier on slide labels, write ``tile-classifier.keras``, ``encoder.keras``
    (its pooled features) and ``baseline.json`` (mean of tile probabilities on the test patients)."""
    import keras  # noqa: PLC0415

    from glio_node.bundle import normalize  # noqa: PLC0415
    from glio_node.runtime.networks import build_classifier  # noqa: PLC0415

    records = load_dataset(dataset)
    s, by_id = split_records(records, split)
    sets = _sets(s, by_id)
    cache = Path(dataset) / ".tiles"
    shards = {r.slide_id: load_or_extract(r, spec, Path(dataset), cache) for r in records}

    def tiles_of(rs: list[SlideRecord]) -> tuple[np.ndarray, np.ndarray]:
        truth = _truth(rs, task)
        x = np.concatenate([shards[r.slide_id].images for r in rs])
        y = np.concatenate([np.full(len(shards[r.slide_id].images), t) for r, t in zip(rs, truth)])
        return normalize(x, normalization), y

    n = len(LABEL_VALUES[task])
    keras.utils.set_random_seed(split.seed)
    model = build_classifier(spec.tile_size, {task: n}, base_filters=base_filters, blocks=blocks, bn_momentum=0.9)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss={task: "sparse_categorical_crossentropy"})
    x, y = tiles_of(sets["train"])
    xv, yv = tiles_of(sets["validation"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    fit = model.fit(x, {task: y}, validation_data=(xv, {task: yv}), epochs=epochs, batch_size=batch_size,
                    callbacks=[stop], verbose=verbose)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / "tile-classifier.keras")
    encoder = keras.Model(model.input, model.get_layer("features").output, name="encoder")
    encoder.save(out_dir / "encoder.keras")
    # Baseline: slide call = mean of tile probabilities, test patients scored once.
    test = sets["test"]
    probs = np.stack([np.asarray(model.predict(normalize(shards[r.slide_id].images, normalization), verbose=0)[task]).mean(axis=0)
                      for r in test])
    result = {
        "method": "tile classifier trained on slide labels; slide call = mean of tile probabilities",
        "task": task,
        "tile": asdict(spec),
        "split": asdict(split),
        "epochs_run": len(fit.history["loss"]),
        "embed_dim": int(encoder.output.shape[-1]),
        "test_slides": [r.slide_id for r in test],
        "test": score(_truth(test, task), probs, [r.patient_id for r in test], LABEL_VALUES[task]),
    }
    (out_dir / "baseline.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def train_mil(
    dataset: Path, encoder_path: Path, tasks: tuple[str, ...], run_dir: Path, spec: TileSpec,
    cache_dir: Path | None = None, split: SplitConfig = SplitConfig(), config: MilConfig = MilConfig(),
    normalization: str = "scale_0_1", verbose: bool = False, ood: bool = True,
) -> dict:
    """Embed every slide (cached), train one ABMIL head per task, score the test patients once.

    Writes ``RUN_DIR/<task>.keras`` (the heads), ``RUN_DIR/attention/<slide>.npz`` (each test
    slide's attention over its tiles' grid cells) and ``RUN_DIR/metrics.json``; returns the metrics.
    ``ood`` (default): also the encoder's out-of-distribution gate, ``RUN_DIR/ood-reference.npz``
    and ``ood.json`` (training/ood.py ``fit_mil_gate``: reference on the training slides'
    embeddings, thresholds on the validation slides'; the test slides are not used), which
    ``write_mil_bundle`` puts in the bundle.
    """
    encoder = Encoder(encoder_path, normalization)  # first: a missing encoder is said before the dataset is read
    records = load_dataset(dataset)
    s, by_id = split_records(records, split)
    sets = _sets(s, by_id)
    cache_dir = Path(cache_dir) if cache_dir else Path(dataset) / ".embeddings"
    bags, stats = embed_slides(records, spec, encoder, Path(dataset), cache_dir)
    run_dir = Path(run_dir)
    (run_dir / "attention").mkdir(parents=True, exist_ok=True)
    metrics: dict = {"encoder": {"file": str(Path(encoder_path).resolve()), "sha256": encoder.sha256, "runtime": encoder.runtime},
                     "embed_dim": int(next(iter(bags.values())).embeddings.shape[1]), "normalization": normalization,
                     "synthetic": (Path(dataset) / PARAMETERS_FILE).is_file(), "tile": asdict(spec), "split": asdict(split), "mil": asdict(config), "extraction": asdict(stats),
                     "sets": {k: {"slides": len(v), "patients": len({r.patient_id for r in v})} for k, v in sets.items()},
                     "test_slides": [r.slide_id for r in sets["test"]], "tasks": {}}
    if ood:
        from training.mil_bundle import ENCODER_NAME  # noqa: PLC0415
        from training.ood import fit_mil_gate, save_gate  # noqa: PLC0415

        gate = fit_mil_gate(bags, s.train, s.validation, ENCODER_NAME)
        save_gate(run_dir, gate)
        metrics["ood"] = {"file": "ood-reference.npz", "reference_slides": gate.report["reference_slides"],
                          "threshold_slides": gate.report["threshold_slides"],
                          "slide_threshold_low": gate.spec.slide_threshold_low, "slide_threshold": gate.spec.slide_threshold}
    for task in tasks:
        def of(name: str):
            rs = sets[name]
            return [bags[r.slide_id].embeddings for r in rs], _truth(rs, task)

        (tb, tt), (vb, vt), (xb, xt) = of("train"), of("validation"), of("test")
        head = train_abmil(tb, tt, vb, vt, len(LABEL_VALUES[task]), config, verbose=verbose)
        head.model.save(run_dir / f"{task}.keras")
        val_probs, _ = predict(head.model, vb)
        test_probs, attention = predict(head.model, xb)
        test = sets["test"]
        for r, a in zip(test, attention):
            np.savez(run_dir / "attention" / f"{r.slide_id}-{task}.npz", attention=a, cells=bags[r.slide_id].cells)
        metrics["tasks"][task] = {
            "best_epoch": head.best_epoch,
            "history": head.history,
            "validation": score(vt, val_probs, [r.patient_id for r in sets["validation"]], LABEL_VALUES[task]),
            "test": score(xt, test_probs, [r.patient_id for r in test], LABEL_VALUES[task]),
        }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
