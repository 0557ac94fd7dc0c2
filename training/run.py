"""``python -m training train --config run.toml``: one run from a dataset folder to a model bundle.

The run reads top to bottom: config -> dataset (validated) -> patient split into train,
validation and test -> tiles (cached shards, the worker's tiling) -> train the region UNet ->
train the molecular classifier (early stopping, checkpoints and learning-rate schedule watch the
validation patients only) -> score both on the validation and, once, on the test patients (pixel
level, tile level and slide level as the worker calls, each with a patient-level bootstrap 95 %
interval) -> write the run folder -> export the bundle.  The run folder holds everything needed to repeat
it: the config as given, the seed, the git commit, per-epoch metrics (CSV) and confusion
matrices (CSV, and PNG with the loss curves), the best checkpoints, the final metrics (JSON) and a
model card.

``python -m training crossval --config run.toml`` trains every fold of a k-fold or
leave-one-patient-out split instead (:func:`crossval`) and summarises them; it exports nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import subprocess
import tomllib
import uuid
import zlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from glio_node import coding
from glio_node.bundle import HeadSpec, Manifest, NetworkSpec, normalize, write_bundle
from training.augment import Augmentation, make_dataset
from glio_node.pipeline.calibration import calibrate
from training.bootstrap import classification_intervals, confusion_intervals
from training.calibration import choose_threshold, coverage_accuracy, fit_temperature, reliability
from training.dataset import LABEL_VALUES, REGION_NAMES, load_dataset
from training.errors import ConfigError
from training.losses import categorical_crossentropy, get_loss
from training.metrics import (
    classification_report,
    confusion_matrix,
    segmentation_report_from_confusion,
    slide_level_report,
)
from training.splits import STRATIFY_CHOICES, Split, make_splits
from training.synthetic_dataset import PARAMETERS_FILE, SyntheticParameters
from training.tiles import Shard, TileSpec, load_or_extract

CLS_TASKS = ("subtype", "mgmt", "egfr")

INDETERMINATE_BELOW = {"subtype": 0.5, "mgmt": 0.6, "egfr": 0.6}

INTENDED_USE = "Research use only. Not for diagnosis."
DEMO_INTENDED_USE = "DEMO model trained on synthetic slides only. Research use only. Not for diagnosis."


@dataclass(frozen=True)
class NetConfig:
    um_per_px: float
    tile_size: int
    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 1e-3
    loss: str = "categorical_crossentropy"
    depth: int = 3  # UNet levels / classifier VGG blocks
    base_filters: int = 8
    overlap: int = 0  # segmentation only: the worker's stitching overlap, recorded in the manifest
    min_tissue: float = 0.5
    patience: int = 5
    # classifier only:
    max_tiles_per_slide: int | None = None  # random subset per slide (seeded); None: all tiles
    bn_momentum: float = 0.9  # 0.99 (Keras' default) lags the weights in short runs: validation at chance
    backbone: str = "small"  # "small": glio_node's VGG-shaped build_classifier; "vgg16": keras VGG16
    weights: str | None = None  # vgg16 only: local weights file (no top), relative to the config file
    frozen_epochs: int = 0  # vgg16 only: epochs with the backbone frozen before fine-tuning
    fine_tune_blocks: int = 2  # vgg16 only: last VGG blocks opened for fine-tuning


@dataclass(frozen=True)
class CalibrationConfig:
    """``[calibration]``: what is chosen on the validation slides for each classifier head (docs/training.md)."""

    enabled: bool = True  # false: no temperature, the fixed INDETERMINATE_BELOW thresholds
    temperature_min: float = 0.5  # bounds of the 1-D temperature search (0.5: at most a square of the odds)
    temperature_max: float = 10.0
    target_accuracy: float = 0.9  # the indeterminate threshold: lowest giving this selective accuracy ...
    min_coverage: float = 0.5  # ... while calling at least this fraction of the validation slides
    ece_bins: int = 10  # equal-width top-label bins of the expected calibration error

    def __post_init__(self) -> None:
        if not 0.0 < self.temperature_min < self.temperature_max:
            raise ConfigError(f"calibration: temperature_min {self.temperature_min} and temperature_max {self.temperature_max} must satisfy 0 < min < max")
        for name in ("target_accuracy", "min_coverage"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"calibration.{name} {getattr(self, name)} must be in [0, 1]")
        if not isinstance(self.ece_bins, int) or self.ece_bins < 1:
            raise ConfigError(f"calibration.ece_bins {self.ece_bins!r} must be a whole number >= 1")


@dataclass(frozen=True)
class RunConfig:
    """One run, read from a TOML file (training/configs/*.toml; docs/training.md lists the keys)."""

    name: str  # bundle name: models/<name>/
    version: str
    dataset: Path
    runs_dir: Path
    models_dir: Path
    seed: int
    validation_fraction: float
    segmentation: NetConfig
    classifier: NetConfig
    normalization: str = "scale_0_1"
    intended_use: str = INTENDED_USE
    is_demo: bool = False  # RunConfig.load: true whenever the data is synthetic (demo_flag)
    augmentation: dict = field(default_factory=dict)
    split_method: str = "fixed"  # "kfold" (split_k folds) or "lopo" (one per patient): `train` tests on fold split_fold, `crossval` on each
    split_k: int = 5
    split_fold: int = 0
    test_fraction: float = 0.2  # fixed split: this fraction of the patients is the test set
    stratify: str = "subtype"  # every class of this task in every set; "none" for datasets too small for that
    synthetic: SyntheticParameters | None = None  # write the dataset with these when it is missing
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        data = read_config(Path(path))
        base = Path(path).resolve().parent
        split = data.get("split", {})
        try:
            classifier = dict(data["classifier"])
            if classifier.get("weights"):
                classifier["weights"] = str((base / classifier["weights"]).resolve())
            if split.get("method", "fixed") not in ("fixed", "kfold", "lopo"):
                raise ConfigError(f"split.method {split.get('method')!r} is not 'fixed', 'kfold' or 'lopo'")
            if split.get("stratify", "subtype") not in STRATIFY_CHOICES:
                raise ConfigError(f"split.stratify {split.get('stratify')!r} is not one of {', '.join(map(repr, STRATIFY_CHOICES))}")
            if classifier.get("backbone", "small") not in ("small", "vgg16"):
                raise ConfigError(f"classifier.backbone {classifier.get('backbone')!r} is not 'small' or 'vgg16'")
            dataset = (base / data["dataset"]).resolve()
            is_demo = demo_flag(data.get("is_demo"), synthetic_data("synthetic" in data, dataset))
            intended_use = data.get("intended_use", DEMO_INTENDED_USE if is_demo else INTENDED_USE)
            if is_demo and "demo" not in intended_use.lower():
                raise ConfigError(
                    f"intended_use {intended_use!r} must say DEMO: the bundle is a demo "
                    f"(trained on synthetic slides); e.g. {DEMO_INTENDED_USE!r}"
                )
            return cls(
                name=data["name"],
                version=data["version"],
                dataset=dataset,
                runs_dir=(base / data.get("runs_dir", "runs")).resolve(),
                models_dir=(base / data.get("models_dir", "models")).resolve(),
                seed=int(data.get("seed", 0)),
                validation_fraction=float(data.get("validation_fraction", 0.25)),
                segmentation=NetConfig(**data["segmentation"]),
                classifier=NetConfig(**classifier),
                normalization=data.get("normalization", "scale_0_1"),
                intended_use=intended_use,
                is_demo=is_demo,
                augmentation=data.get("augmentation", {}),
                split_method=split.get("method", "fixed"),
                split_k=int(split.get("k", 5)),
                split_fold=int(split.get("fold", 0)),
                test_fraction=float(split.get("test_fraction", 0.2)),
                stratify=str(split.get("stratify", "subtype")),
                synthetic=SyntheticParameters.from_table(data["synthetic"]) if "synthetic" in data else None,
                calibration=CalibrationConfig(**data.get("calibration", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"run config {path}: {exc}; see docs/training.md for the keys") from exc


def synthetic_data(has_synthetic_table: bool, dataset: Path) -> bool:
    """Is the run's data synthetic: the config writes it (a ``[synthetic]`` table), or the dataset
    folder was written by ``python -m training synthetic`` (it holds ``synthetic.json``)?"""
    return has_synthetic_table or (Path(dataset) / PARAMETERS_FILE).is_file()


def demo_flag(given: object, synthetic: bool) -> bool:
    """The bundle's ``is_demo``: as given, true when not given and the data is synthetic.

    A model trained on synthetic slides is a demo whatever the config says (docs/model-bundle.md):
    ``is_demo = false`` with synthetic data raises ``ConfigError``, as does a value not a boolean.
    """
    if given is None:
        return synthetic
    if not isinstance(given, bool):
        raise ConfigError(f"is_demo must be true or false, got {given!r}")
    if synthetic and not given:
        raise ConfigError(
            "is_demo = false, but the dataset is synthetic (a [synthetic] table, or synthetic.json "
            "in the dataset folder): a bundle trained on synthetic slides is always a demo; "
            "remove is_demo or set it to true"
        )
    return given


def read_config(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A run config's tables, after ``extends = "other.toml"`` (relative to the file): the other
    file's tables, with this file's keys laid over them table by table.  A smoke-test config
    extends the real one and changes only sizes, so CI trains what the real run trains."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"run config {path}: 'extends' loops back to itself")
    data = tomllib.loads(path.read_text())
    parent = data.pop("extends", None)
    if parent is None:
        return data
    merged = read_config(path.parent / parent, (*_seen, path))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _git_commit() -> str:
    """The checkout's commit, marked when the tree has uncommitted changes (read-only git calls)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit (no git checkout)"
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def ensure_dataset(cfg: RunConfig) -> None:
    """Write the config's synthetic dataset when it is missing; refuse one written differently.

    Only for configs with a ``[synthetic]`` table (the demo bundle and the tests): a real dataset
    is the data scientist's folder and is never written here."""
    if cfg.synthetic is None:
        return
    from training.synthetic_dataset import PARAMETERS_FILE, write_synthetic_dataset

    marker = cfg.dataset / PARAMETERS_FILE
    if marker.is_file():
        try:  # keys added since (minority_fraction) take their defaults: older datasets stay valid
            written = SyntheticParameters.from_table(json.loads(marker.read_text()))
        except (ValueError, TypeError):
            written = None
        if written != cfg.synthetic:
            raise ConfigError(
                f"{cfg.dataset} was written with other [synthetic] parameters than the config's "
                f"({marker}); delete the folder to have it written again"
            )
        return
    if cfg.dataset.exists() and any(cfg.dataset.iterdir()):
        raise ConfigError(f"{cfg.dataset} exists but is no synthetic dataset of this config (no {PARAMETERS_FILE}); move it away or point `dataset` elsewhere")
    write_synthetic_dataset(cfg.dataset, params=cfg.synthetic)


class _EpochReport:
    """Keras callback after every epoch: the confusion matrix on the validation tiles (CSV per
    epoch, PNG of the latest) and the metric curves so far (PNG)."""

    def __new__(cls, *args, **kwargs):
        import keras

        from training.plots import plot_confusion, plot_history

        class Callback(keras.callbacks.Callback):
            def __init__(self, x, y_true, task, classes, net, out: Path):
                super().__init__()
                self.x, self.y_true, self.task, self.classes, self.net, self.out = x, y_true, task, tuple(classes), net, out
                self.history: dict[str, list[float]] = {}

            def on_epoch_end(self, epoch, logs=None):
                for k, v in (logs or {}).items():
                    self.history.setdefault(k, []).append(float(v))
                plot_history(self.history, f"{self.net}: loss per epoch", self.out / f"metrics-{self.net}.png")
                if len(self.x) == 0:
                    return
                pred = self.model.predict(self.x, batch_size=16, verbose=0)[self.task]
                cm = confusion_matrix(self.y_true, np.argmax(pred, axis=-1), len(self.classes))
                np.savetxt(self.out / f"confusion-{self.task}-epoch{epoch + 1:03d}.csv", cm, fmt="%d", delimiter=",")
                plot_confusion(cm, self.classes, f"{self.task}, validation tiles, epoch {epoch + 1}", self.out / f"confusion-{self.task}-latest.png")

        return Callback(*args, **kwargs)


def _callbacks(run_dir: Path, net: str, cfg: NetConfig, x_val, y_val, task, classes):
    import keras

    monitor = "val_loss" if len(x_val) else "loss"
    return [
        keras.callbacks.ModelCheckpoint(run_dir / f"best-{net}.keras", monitor=monitor, save_best_only=True),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=cfg.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, patience=max(1, cfg.patience // 2), factor=0.5),
        keras.callbacks.CSVLogger(run_dir / f"metrics-{net}.csv", append=True),  # vgg16 fits twice
        _EpochReport(x_val, y_val, task, classes, net, run_dir),
    ]


def _stack(shards: list[Shard], ts: int):
    if not shards or not sum(len(s.images) for s in shards):
        return np.zeros((0, ts, ts, 3), np.uint8)
    return np.concatenate([s.images for s in shards])


def _subsample(shard: Shard, max_tiles: int | None, seed: int) -> Shard:
    """At most ``max_tiles`` of a slide's tiles, drawn at random (seeded by the run and the slide):
    slide-level labels are learnt from many slides, not from many tiles of a few, and one large
    slide should not outweigh the rest."""
    if max_tiles is None or len(shard.images) <= max_tiles:
        return shard
    rng = np.random.default_rng([seed, zlib.crc32(shard.slide_id.encode())])
    keep = np.sort(rng.choice(len(shard.images), max_tiles, replace=False))
    labels = None if shard.labels is None else shard.labels[keep]
    return replace(shard, images=shard.images[keep], labels=labels, cells=shard.cells[keep])


def _one_hot_or_zero(values: list[str | None], classes: tuple[str, ...]) -> np.ndarray:
    """One-hot slide labels; an unknown label is all zeros, so it adds nothing to the loss."""
    out = np.zeros((len(values), len(classes)), np.float32)
    for i, v in enumerate(values):
        if v is not None:
            out[i, classes.index(v)] = 1.0
    return out


@dataclass
class FoldResult:
    """One split trained and scored: the metrics (``metrics.json``: set sizes, then the
    validation and the test set's reports) and the two trained networks."""

    metrics: dict
    unet: object
    classifier: object


@dataclass(frozen=True)
class _Tiles:
    """Every slide's shards, read once per run (cross-validation trains many folds on them)."""

    segmentation: dict[str, Shard]  # slides with a region mask only
    classifier: dict[str, Shard]


def _start_run(config_path: Path, kind: str = "") -> tuple[RunConfig, Path, str, list]:
    """Load the config, make the run folder (``runs/<name><kind>-<stamp>/``) with the config as
    given and resolved, the seed and the git commit; write the synthetic dataset if the config
    has one; return the validated dataset's records."""
    import keras

    cfg = RunConfig.load(config_path)
    keras.utils.set_random_seed(cfg.seed)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = cfg.runs_dir / f"{cfg.name}{kind}-{stamp}"
    run_dir.mkdir(parents=True)
    shutil.copy(config_path, run_dir / "config.toml")
    (run_dir / "config-effective.json").write_text(json.dumps(read_config(config_path), indent=2, default=str) + "\n")  # with `extends` resolved
    commit = _git_commit()
    (run_dir / "run.json").write_text(json.dumps({"seed": cfg.seed, "git": commit, "keras": keras.__version__, "backend": keras.backend.backend()}, indent=2))
    ensure_dataset(cfg)
    return cfg, run_dir, commit, load_dataset(cfg.dataset)


def _load_tiles(cfg: RunConfig, records, segmentation: bool = True) -> _Tiles:
    """Every slide's shards; ``segmentation=False``: the classifier's only (the site-shift
    experiment trains no UNet), and score_set then reports no regions."""
    cache = cfg.dataset / ".tiles"
    seg, cl = cfg.segmentation, cfg.classifier
    seg_spec = TileSpec(seg.um_per_px, seg.tile_size, seg.min_tissue)
    cl_spec = TileSpec(cl.um_per_px, cl.tile_size, cl.min_tissue)
    return _Tiles(
        segmentation={r.slide_id: load_or_extract(r, seg_spec, cfg.dataset, cache) for r in records if r.mask_path} if segmentation else {},
        classifier={r.slide_id: _subsample(load_or_extract(r, cl_spec, cfg.dataset, cache), cl.max_tiles_per_slide, cfg.seed) for r in records},
    )


def _splits(cfg: RunConfig, records, config_path: Path) -> list:
    """The config's patient splits of the dataset; a split the dataset cannot give (k above the
    number of patients, one patient only) is the config's mistake."""
    try:
        return make_splits(records, cfg.split_method, cfg.seed, cfg.validation_fraction, cfg.split_k, cfg.test_fraction, cfg.stratify)
    except ValueError as exc:
        raise ConfigError(f"run config {config_path}: {exc}") from exc


def _write_split(out: Path, split) -> None:
    (out / "split.json").write_text(json.dumps({"name": split.name, "train": split.train, "validation": split.validation, "test": split.test}, indent=2))


def train(config_path: Path, verbose: int = 2, model_card_dir: Path | None = None) -> dict:
    """Run the config at ``config_path`` on its one split (``split.fold`` of a k-fold or
    leave-one-patient-out split); return the final metrics.  Writes the run folder and the
    bundle; raises DatasetError / ConfigError with what to fix."""
    cfg, run_dir, commit, records = _start_run(config_path)
    splits = _splits(cfg, records, config_path)
    if not 0 <= cfg.split_fold < len(splits):
        raise ConfigError(f"split.fold {cfg.split_fold} outside 0..{len(splits) - 1} ({cfg.split_method}, k={cfg.split_k})")
    split = splits[cfg.split_fold]
    _write_split(run_dir, split)
    tiles = _load_tiles(cfg, records)
    result = train_split(cfg, records, split, tiles, run_dir, verbose)
    gate = _fit_gate(cfg, result.classifier, split, tiles, run_dir)
    bundle = export_bundle(cfg, result.unet, result.classifier, result.metrics, commit, config_path, gate)
    (run_dir / "bundle.txt").write_text(str(bundle) + "\n")
    write_model_card(run_dir, cfg, result.metrics, commit, split, model_card_dir)
    return result.metrics


def crossval(config_path: Path, verbose: int = 2) -> dict:
    """Train and score every fold of the config's k-fold or leave-one-patient-out split, each in
    ``runs/<name>-cv-<stamp>/fold-NN/`` (its split, metrics, plots, checkpoints), and write
    ``cv-summary.json`` and ``cv-summary.md``: each test metric's mean and standard deviation over
    the folds, and the folds' test results pooled (every slide is tested exactly once; each fold
    stops early and keeps its checkpoint on its own inner validation patients).
    Exports no bundle: cross-validation estimates how well the config trains; the bundle comes
    from ``train`` on the chosen split.  Returns the summary."""
    import keras

    cfg, run_dir, _, records = _start_run(config_path, kind="-cv")
    if cfg.split_method == "fixed":
        raise ConfigError(f"run config {config_path}: cross-validation needs split.method \"kfold\" or \"lopo\", not \"fixed\"")
    splits = _splits(cfg, records, config_path)
    tiles = _load_tiles(cfg, records)
    folds = []
    for i, split in enumerate(splits):
        fold_dir = run_dir / f"fold-{i:02d}"
        fold_dir.mkdir()
        _write_split(fold_dir, split)
        keras.backend.clear_session()
        keras.utils.set_random_seed(cfg.seed)  # every fold starts from the config's seed, not from where the last fold left it
        if verbose:
            print(f"fold {i + 1}/{len(splits)} ({split.name}): {len(split.train)} training, {len(split.validation)} validation slide(s), test {' '.join(split.test)}", flush=True)
        result = train_split(cfg, records, split, tiles, fold_dir, verbose)
        folds.append((split.name, result.metrics))
    summary = summarise_folds(folds, {r.slide_id: r.patient_id for r in records}, cfg.seed)
    summary["split"] = {"method": cfg.split_method, "k": len(splits), "seed": cfg.seed}
    (run_dir / "cv-summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (run_dir / "cv-summary.md").write_text(cv_summary_markdown(cfg, summary))
    return summary


def train_split(cfg: RunConfig, records, split: Split, tiles: _Tiles, run_dir: Path, verbose: int) -> FoldResult:
    """Train both networks on ``split.train``, choosing epochs and checkpoints on
    ``split.validation``; then score both sets and ``split.test`` (the test patients are seen here
    for the first and only time).  Per-epoch CSVs, plots, checkpoints, metrics.json and the test
    set's final confusion matrices go to ``run_dir``."""
    import keras

    from glio_node.runtime.networks import build_unet

    by_id = {r.slide_id: r for r in records}
    aug = Augmentation(**cfg.augmentation)

    # --- regions (UNet) ---
    seg = cfg.segmentation
    seg_shards = tiles.segmentation
    tr = [seg_shards[s] for s in split.train if s in seg_shards]
    va = [seg_shards[s] for s in split.validation if s in seg_shards]
    xs, ys = _stack(tr, seg.tile_size), np.concatenate([s.labels for s in tr]) if tr else None
    xv, yv = _stack(va, seg.tile_size), np.concatenate([s.labels for s in va]) if va else np.zeros((0, seg.tile_size, seg.tile_size), np.uint8)
    n_regions = len(REGION_NAMES)
    unet = build_unet(seg.tile_size, n_regions, depth=seg.depth, base_filters=seg.base_filters, name="regions", batch_norm=False)
    unet.compile(optimizer=keras.optimizers.Adam(seg.learning_rate), loss={"segmentation": get_loss(seg.loss)})
    train_ds = make_dataset(xs, ys, cfg.normalization, seg.batch_size, cfg.seed, aug, n_regions)
    val_ds = make_dataset(xv, yv, cfg.normalization, seg.batch_size, cfg.seed, None, n_regions) if len(xv) else None
    xv_norm = normalize(xv, cfg.normalization)
    unet.fit(
        train_ds.map(lambda x, y: (x, {"segmentation": y})),
        validation_data=val_ds.map(lambda x, y: (x, {"segmentation": y})) if val_ds else None,
        epochs=seg.epochs,
        verbose=verbose,
        callbacks=_callbacks(run_dir, "regions", seg, xv_norm, yv, "segmentation", REGION_NAMES),
    )

    # --- molecular (multi-head classifier) ---
    clf = train_classifier(cfg, split, tiles.classifier, by_id, run_dir, verbose)
    validation = score_set(cfg, unet, clf, split.validation, tiles, by_id)
    chosen = choose_calibration(cfg.calibration, validation)  # validation only: the test set is not scored yet
    test = score_set(cfg, unet, clf, split.test, tiles, by_id)
    metrics = {
        "sets": _set_sizes(split, by_id),
        "validation": validation,
        "test": test,
        "calibration": calibration_report(cfg.calibration, chosen, validation, test),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    _write_confusion_csvs(run_dir, metrics["test"])
    _write_calibration_plots(run_dir, metrics["calibration"])
    return FoldResult(metrics, unet, clf)


def train_classifier(cfg: RunConfig, split: Split, cl_shards: dict[str, Shard], by_id, run_dir: Path, verbose: int):
    """The multi-head molecular classifier trained on ``split.train``'s tiles, early stopping,
    checkpoint and learning-rate schedule watching ``split.validation``'s (``cfg.normalization``
    applied to both).  Per-epoch CSV, plots and the best checkpoint go to ``run_dir``.  Only the
    train and validation slides' shards are read: ``cl_shards`` may lack the test slides."""
    import keras

    from glio_node.runtime.networks import build_classifier

    cl = cfg.classifier

    def targets(ids):
        out = {}
        for task in CLS_TASKS:
            per_tile = [by_id[s].labels.get(task) for s in ids for _ in range(len(cl_shards[s].images))]
            out[task] = _one_hot_or_zero(per_tile, LABEL_VALUES[task])
        return out

    xc = _stack([cl_shards[s] for s in split.train], cl.tile_size)
    xcv = _stack([cl_shards[s] for s in split.validation], cl.tile_size)
    yc, ycv = targets(split.train), targets(split.validation)
    heads = {t: len(LABEL_VALUES[t]) for t in CLS_TASKS}
    xcv_norm = normalize(xcv, cfg.normalization)
    fit = {
        "x": normalize(xc, cfg.normalization),
        "y": yc,
        "batch_size": cl.batch_size,
        "shuffle": True,
        "validation_data": (xcv_norm, ycv) if len(xcv) else None,
        "verbose": verbose,
    }
    callbacks = _callbacks(run_dir, "molecular", cl, xcv_norm, np.argmax(ycv["subtype"], -1), "subtype", LABEL_VALUES["subtype"])
    losses = {t: categorical_crossentropy for t in CLS_TASKS}
    if cl.backbone == "vgg16":
        from training.networks import build_vgg16_classifier, set_trainable

        clf = build_vgg16_classifier(cl.tile_size, heads, weights=cl.weights, name="molecular")
        if cl.frozen_epochs:
            set_trainable(clf, "frozen")
            clf.compile(optimizer=keras.optimizers.Adam(cl.learning_rate), loss=losses)
            clf.fit(**fit, epochs=cl.frozen_epochs, callbacks=callbacks)
        set_trainable(clf, "fine_tune", cl.fine_tune_blocks)
        clf.compile(optimizer=keras.optimizers.Adam(cl.learning_rate / 10), loss=losses)
        clf.fit(**fit, epochs=cl.frozen_epochs + cl.epochs, initial_epoch=cl.frozen_epochs, callbacks=callbacks)
    else:
        clf = build_classifier(cl.tile_size, heads, base_filters=cl.base_filters, blocks=cl.depth, name="molecular", bn_momentum=cl.bn_momentum)
        clf.compile(optimizer=keras.optimizers.Adam(cl.learning_rate), loss=losses)
        clf.fit(**fit, epochs=cl.epochs, callbacks=callbacks)
    return clf


def _set_sizes(split: Split, by_id) -> dict:
    """Patients and slides in each set (counts only: no patient id leaves the dataset)."""
    sets = {"train": split.train, "validation": split.validation, "test": split.test}
    return {name: {"patients": len({by_id[s].patient_id for s in ids}), "slides": len(ids)} for name, ids in sets.items()}


def _offsets(shards: list[Shard]) -> np.ndarray:
    return np.cumsum([0] + [len(s.images) for s in shards])


def score_set(cfg: RunConfig, unet, clf, slide_ids: tuple[str, ...], tiles: _Tiles, by_id) -> dict:
    """Every metric of one held-out set with its patient-level bootstrap 95 % interval (``ci``):
    regions per pixel (accuracy, mean Dice, macro-F1, MCC, per-class Dice); per molecular task per
    tile and per slide as the worker calls (accuracy, balanced accuracy, per-class sensitivity,
    specificity and ROC AUC).  Each report keeps its slides' confusion matrices (regions, tiles)
    or truth and mean probabilities (slides), by slide id, so cross-validation can pool and
    resample them."""
    out: dict = {}
    seg_ids = [s for s in slide_ids if s in tiles.segmentation and len(tiles.segmentation[s].images)]
    if seg_ids:
        shards = [tiles.segmentation[s] for s in seg_ids]
        x = normalize(_stack(shards, cfg.segmentation.tile_size), cfg.normalization)
        pred = np.argmax(unet.predict(x, batch_size=8, verbose=0)["segmentation"], axis=-1)
        o = _offsets(shards)
        cms = np.stack([confusion_matrix(sh.labels, pred[o[i] : o[i + 1]], len(REGION_NAMES)) for i, sh in enumerate(shards)])
        report = segmentation_report_from_confusion(cms.sum(axis=0), REGION_NAMES)
        report["ci"] = confusion_intervals(cms, [by_id[s].patient_id for s in seg_ids], REGION_NAMES, seed=cfg.seed)
        report["slides"] = {s: cm.tolist() for s, cm in zip(seg_ids, cms)}
        out["regions"] = report

    shards = [tiles.classifier[s] for s in slide_ids]
    x = normalize(_stack(shards, cfg.classifier.tile_size), cfg.normalization)
    if not len(x):
        return out
    probs = clf.predict(x, batch_size=32, verbose=0)
    o = _offsets(shards)
    for task in CLS_TASKS:
        classes = LABEL_VALUES[task]
        labelled = [i for i, s in enumerate(slide_ids) if by_id[slide_ids[i]].labels.get(task)]
        if not any(o[i + 1] > o[i] for i in labelled):
            continue
        per_slide = {slide_ids[i]: probs[task][o[i] : o[i + 1]] for i in labelled}
        truth = {s: classes.index(by_id[s].labels[task]) for s in per_slide}
        with_tiles = [s for s in per_slide if len(per_slide[s])]
        groups = [by_id[s].patient_id for s in with_tiles]
        tile_truth = np.concatenate([[truth[s]] * len(per_slide[s]) for s in with_tiles])
        tile = classification_report(tile_truth, np.concatenate([per_slide[s] for s in with_tiles]), classes)
        tile_cms = np.stack([confusion_matrix(np.full(len(per_slide[s]), truth[s]), np.argmax(per_slide[s], -1), len(classes)) for s in with_tiles])
        tile["ci"] = confusion_intervals(tile_cms, groups, classes, seed=cfg.seed)
        tile["slides"] = {s: cm.tolist() for s, cm in zip(with_tiles, tile_cms)}
        slide = slide_level_report(per_slide, truth, classes)
        scored = list(slide["slides"])
        slide["ci"] = classification_intervals(
            [slide["slides"][s]["truth"] for s in scored], np.array([slide["slides"][s]["probabilities"] for s in scored]),
            [by_id[s].patient_id for s in scored], classes, seed=cfg.seed,
        )
        out[task] = {"tile": tile, "slide": slide}
    return out


def _slide_arrays(set_metrics: dict, task: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One set's slide-level mean probabilities (n, C) and truth (n,) of ``task``, or None."""
    slides = set_metrics.get(task, {}).get("slide", {}).get("slides", {})
    if not slides:
        return None
    ids = sorted(slides)
    return np.array([slides[i]["probabilities"] for i in ids], dtype=np.float64), np.array([slides[i]["truth"] for i in ids])


def choose_calibration(cal: CalibrationConfig, validation: dict) -> dict[str, dict]:
    """Per classifier head with validation slides: the temperature fitted on them and the
    indeterminate threshold chosen on their calibrated probabilities.  Sees the validation set only."""
    if not cal.enabled:
        return {}
    chosen = {}
    for task in CLS_TASKS:
        arrays = _slide_arrays(validation, task)
        if arrays is None:
            continue
        probs, truth = arrays
        t = fit_temperature(probs, truth, (cal.temperature_min, cal.temperature_max))
        chosen[task] = {"temperature": t, "threshold": choose_threshold(calibrate(probs, t), truth, cal.target_accuracy, cal.min_coverage)}
    return chosen


def _calibration_on(set_metrics: dict, task: str, t: float, threshold: float, bins: int) -> dict | None:
    arrays = _slide_arrays(set_metrics, task)
    if arrays is None:
        return None
    probs, truth = arrays
    after = calibrate(probs, t)
    before_r, after_r = reliability(probs, truth, bins), reliability(after, truth, bins)
    called = after.max(axis=1) >= threshold
    thresholds, coverage, accuracy = coverage_accuracy(after, truth)
    return {
        "slides": len(truth),
        "ece_before": before_r.ece,
        "ece_after": after_r.ece,
        "coverage": float(called.mean()),
        "selective_accuracy": float((after.argmax(1) == truth)[called].mean()) if called.any() else float("nan"),
        "reliability_before": {"counts": before_r.counts.tolist(), "confidence": before_r.confidence.tolist(), "accuracy": before_r.accuracy.tolist()},
        "reliability_after": {"counts": after_r.counts.tolist(), "confidence": after_r.confidence.tolist(), "accuracy": after_r.accuracy.tolist()},
        "coverage_accuracy": {"threshold": thresholds.tolist(), "coverage": coverage.tolist(), "selective_accuracy": accuracy.tolist()},
    }


def calibration_report(cal: CalibrationConfig, chosen: dict[str, dict], validation: dict, test: dict) -> dict:
    """metrics.json's ``calibration``: how it was chosen, and per head the temperature, the
    threshold with the set it was chosen on, and on each set the ECE before and after, the
    coverage and selective accuracy at the threshold, the reliability bins and the coverage-accuracy curve."""
    out: dict = {
        "method": "temperature scaling of the slide-level probabilities (mean of tile probabilities), NLL minimised by a bounded 1-D search",
        "fitted_on": "validation",
        "ece": {"bins": cal.ece_bins, "binning": "equal-width bins of the top-class probability (top-label ECE)"},
        "target_accuracy": cal.target_accuracy,
        "min_coverage": cal.min_coverage,
        "temperature_bounds": [cal.temperature_min, cal.temperature_max],
        "enabled": cal.enabled,
    }
    for task, c in chosen.items():
        t, th = c["temperature"], c["threshold"]
        entry = {
            "temperature": t,
            "temperature_at_bound": bool(math.isclose(t, cal.temperature_min, rel_tol=1e-3) or math.isclose(t, cal.temperature_max, rel_tol=1e-3)),
            "threshold": {"value": th.threshold, "chosen_on": "validation", "target_met": th.target_met},
        }
        for name, set_metrics in (("validation", validation), ("test", test)):
            scored = _calibration_on(set_metrics, task, t, th.threshold, cal.ece_bins)
            if scored is not None:
                entry[name] = scored
        out[task] = entry
    return out


def _figures(set_metrics: dict) -> list[tuple[str, float, list | None]]:
    """The headline figures of one set's reports as ``(key, value, [ci_low, ci_high] or None)``:
    the manifest's ``[validation]`` keys (before their set prefix), the model card's and the
    cross-validation summary's rows."""
    rows: list[tuple[str, float, list | None]] = []
    if "regions" in set_metrics:
        r = set_metrics["regions"]
        ci = r.get("ci", {})
        for key, metric in (("pixel_accuracy", "accuracy"), ("mean_dice", "mean_dice"), ("macro_f1", "macro_f1"), ("mcc", "mcc")):
            if metric in r:
                rows.append((f"regions_{key}", r[metric], ci.get(metric)))
    for task in CLS_TASKS:
        if task not in set_metrics:
            continue
        tile, slide = set_metrics[task]["tile"], set_metrics[task]["slide"]
        rows.append((f"{task}_tile_accuracy", tile["accuracy"], tile.get("ci", {}).get("accuracy")))
        ci = slide.get("ci", {})
        rows.append((f"{task}_slide_accuracy", slide["accuracy"], ci.get("accuracy")))
        if "balanced_accuracy" in slide:
            rows.append((f"{task}_slide_balanced_accuracy", slide["balanced_accuracy"], ci.get("balanced_accuracy")))
        for name, vals in slide["per_class"].items():
            for metric in ("sensitivity", "specificity", "roc_auc"):
                rows.append((f"{task}_{name}_{metric}", vals[metric], ci.get("per_class", {}).get(name, {}).get(metric)))
    return rows


def _finite(v) -> bool:
    return v is not None and not math.isnan(float(v))


def summarise_folds(folds: list[tuple[str, dict]], patient_of: dict[str, str] | None = None, seed: int = 0) -> dict:
    """Cross-validation summary of ``(fold name, metrics)`` pairs, metrics as train_split writes
    them (pure).  Every figure is a test figure: each fold's outer fold.

    ``metrics``: each headline number (the manifest's ``test_`` keys) as mean, sample standard
    deviation (``sd``, None for one fold) and the number of folds that had it (a fold whose test
    patients lack a label has no number for that task).  ``pooled``: the folds' test results
    taken together, each slide counted once: region pixels from the summed confusion matrices;
    per task the slide calls re-scored from every slide's mean probabilities (so ROC AUC is
    pooled too) and the summed tile confusion matrix.  With ``patient_of`` (slide id -> patient),
    each pooled report gets its patient-level bootstrap interval (``ci``, seeded by ``seed``).
    """
    per_fold = [{"fold": name, **{f"test_{k}": float(v) for k, v, _ in _figures(m["test"]) if _finite(v)}} for name, m in folds]
    keys = sorted({k for row in per_fold for k in row if k != "fold"})
    stats = {}
    for key in keys:
        values = np.array([row[key] for row in per_fold if key in row], dtype=np.float64)
        stats[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else None, "n": len(values)}
    tests = [m["test"] for _, m in folds]

    def confusion_ci(reports: list[dict], classes) -> dict | None:
        slides = {sid: cm for r in reports for sid, cm in r.get("slides", {}).items()}
        if patient_of is None or not slides:
            return None
        ids = sorted(slides)
        return confusion_intervals(np.array([slides[i] for i in ids]), [patient_of[i] for i in ids], classes, seed=seed)

    pooled: dict = {}
    region_reports = [t["regions"] for t in tests if "regions" in t]
    if region_reports:
        pooled["regions"] = segmentation_report_from_confusion(sum(np.asarray(r["confusion_matrix"]) for r in region_reports), REGION_NAMES)
        if (ci := confusion_ci(region_reports, REGION_NAMES)) is not None:
            pooled["regions"]["ci"] = ci
    for task in CLS_TASKS:
        reports = [t[task] for t in tests if task in t]
        if not reports:
            continue
        tile_cm = sum(np.asarray(r["tile"]["confusion_matrix"]) for r in reports)
        tile = {"n": int(tile_cm.sum()), "accuracy": float(np.trace(tile_cm) / tile_cm.sum()) if tile_cm.sum() else float("nan"), "confusion_matrix": tile_cm.tolist()}
        if (ci := confusion_ci([r["tile"] for r in reports], LABEL_VALUES[task])) is not None:
            tile["ci"] = ci
        entry = {"tile": tile}
        slides = {sid: sl for r in reports for sid, sl in r["slide"].get("slides", {}).items()}
        if slides:
            ids = sorted(slides)
            truth = np.array([slides[i]["truth"] for i in ids])
            probs = np.array([slides[i]["probabilities"] for i in ids], dtype=np.float64)
            entry["slide"] = classification_report(truth, probs, LABEL_VALUES[task])
            if patient_of is not None:
                entry["slide"]["ci"] = classification_intervals(truth, probs, [patient_of[i] for i in ids], LABEL_VALUES[task], seed=seed)
        pooled[task] = entry
    return {"folds": per_fold, "metrics": stats, "pooled": pooled}


def _with_ci(value, ci) -> str:
    if not _finite(value):
        return "–"
    if ci is None or not (_finite(ci[0]) and _finite(ci[1])):
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def cv_summary_markdown(cfg: RunConfig, summary: dict) -> str:
    """cv-summary.md: the table a data scientist reads first."""
    folds = summary["folds"]
    lines = [
        f"# Cross-validation: {cfg.name} {cfg.version}",
        "",
        (
            f"{len(folds)} fold(s), split by patient ({cfg.split_method}), seed {cfg.seed}. Every figure is a **test** figure: "
            "each fold is scored on its outer fold, which no choosing step saw (early stopping, checkpoint and learning-rate "
            "schedule watched an inner validation set drawn from the other folds). Mean and sample standard deviation over "
            "folds; each fold's value in order."
        ),
        "",
        "| metric | mean | sd | folds | " + " | ".join(f["fold"] for f in folds) + " |",
        "|---" * (4 + len(folds)) + "|",
    ]
    for key, st in summary["metrics"].items():
        sd = "–" if st["sd"] is None else f"{st['sd']:.3f}"
        values = " | ".join(f"{f[key]:.3f}" if key in f else "–" for f in folds)
        lines.append(f"| {key} | {st['mean']:.3f} | {sd} | {st['n']} | {values} |")
    lines += ["", "## Pooled over folds (each slide tested once; patient-level bootstrap 95 % intervals)", ""]
    pooled = summary["pooled"]
    if "regions" in pooled:
        r, ci = pooled["regions"], pooled["regions"].get("ci", {})
        lines.append(
            f"- regions: pixel accuracy {_with_ci(r['accuracy'], ci.get('accuracy'))}, mean Dice {_with_ci(r['mean_dice'], ci.get('mean_dice'))}, "
            f"macro-F1 {_with_ci(r['macro_f1'], ci.get('macro_f1'))}, MCC {_with_ci(r['mcc'], ci.get('mcc'))} ({r['n']} pixels)"
        )
    for task in CLS_TASKS:
        if task in pooled and "slide" in pooled[task]:
            sl, ci = pooled[task]["slide"], pooled[task]["slide"].get("ci", {})
            tile = pooled[task]["tile"]
            lines.append(
                f"- {task}: slide accuracy {_with_ci(sl['accuracy'], ci.get('accuracy'))}, balanced accuracy "
                f"{_with_ci(sl['balanced_accuracy'], ci.get('balanced_accuracy'))} on {sl['n']} slide(s); tile accuracy "
                f"{_with_ci(tile['accuracy'], tile.get('ci', {}).get('accuracy'))}"
            )
            lines.append(f"  slide confusion (rows truth, columns call; {', '.join(LABEL_VALUES[task])}): {sl['confusion_matrix']}")
    return "\n".join(lines) + "\n"


def _card_set_table(set_metrics: dict) -> list[str]:
    lines = ["| metric | value [95 % CI] |", "|---|---|"]
    lines += [f"| {key} | {_with_ci(v, ci)} |" for key, v, ci in _figures(set_metrics)]
    if "regions" in set_metrics:
        r = set_metrics["regions"]
        ci = r.get("ci", {}).get("per_class", {})
        lines += [f"| regions_{name}_dice | {_with_ci(vals['dice'], ci.get(name, {}).get('dice'))} |" for name, vals in r["per_class"].items() if _finite(vals["dice"])]
    return lines + [""]


def model_card(cfg: RunConfig, metrics: dict, commit: str, split, images: list[str] = (), prefix: str = "") -> str:
    """A Markdown model card for docs/model-cards/<name>.md: what it is for, what it was trained
    on, its test metrics with patient-level intervals, its validation metrics marked as such, and
    its plots (``images``, file names under ``prefix``)."""
    sets = metrics["sets"]
    about = next((m[t]["slide"]["ci"]["bootstrap"] for m in (metrics["test"],) for t in CLS_TASKS if t in m), None)
    resamples = f"{about['n_resamples']} resamples, seed {about['seed']}" if about else f"seed {cfg.seed}"
    lines = [
        f"# Model card: {cfg.name} {cfg.version}",
        "",
        f"Intended use: {cfg.intended_use}",
        "",
        (
            f"Trained by `python -m training train` at {commit}, seed {cfg.seed}, on dataset `{cfg.dataset.name}`, split by patient "
            f"({split.name}, stratified by {cfg.stratify}): "
            + ", ".join(f"{name} {n['patients']} patient(s) ({n['slides']} slide(s))" for name, n in sets.items())
            + "."
        ),
        "",
        (
            "Which set each figure comes from: **test** figures were computed once, after training, on patients that no "
            "choosing step saw. **Validation** figures come from the patients on which early stopping, the checkpoint and the "
            "learning-rate schedule were chosen, so they are optimistic. Intervals are patient-level bootstrap 95 % intervals "
            f"(percentile method, {resamples}); the slide metrics are the worker's calls (mean of tile probabilities)."
        ),
        "",
        f"## Test set ({sets['test']['patients']} patients)",
        "",
        *_card_set_table(metrics["test"]),
        f"## Validation set ({sets['validation']['patients']} patients; chose epochs and checkpoints, optimistic)",
        "",
        *_card_set_table(metrics["validation"]),
        *_card_calibration(metrics),
    ]
    if images:
        lines += [
            "## Plots",
            "",
            "Loss per epoch (training and validation), final confusion matrices on the test patients, and per head the "
            "reliability diagram (validation before and after temperature scaling, test) and the coverage-accuracy curve "
            "(calibrated probabilities, validation and test; x marks the chosen threshold).",
            "",
        ]
        lines += [f"![{name}]({prefix}{name})" for name in images] + [""]
    return "\n".join(lines)


def _write_confusion_csvs(run_dir: Path, metrics: dict) -> None:
    """confusion-<task>-final.csv and .png of the test set: regions per pixel, molecular tasks per tile."""
    from training.plots import plot_confusion

    for task, m in metrics.items():
        cm = m["confusion_matrix"] if "confusion_matrix" in m else m["tile"]["confusion_matrix"]
        with (run_dir / f"confusion-{task}-final.csv").open("w", newline="") as f:
            csv.writer(f).writerows(cm)
        classes = REGION_NAMES if task == "regions" else LABEL_VALUES[task]
        unit = "pixels" if task == "regions" else "tiles"
        plot_confusion(np.asarray(cm), classes, f"{task}, test {unit}", run_dir / f"confusion-{task}-final.png")


def _write_calibration_plots(run_dir: Path, calibration: dict) -> None:
    """reliability-<task>.png (validation before and after temperature scaling, test after) and
    coverage-<task>.png (coverage-accuracy curves of the calibrated probabilities, validation and test)."""
    from training.plots import plot_coverage_accuracy, plot_reliability

    for task in CLS_TASKS:
        if task not in calibration:
            continue
        c = calibration[task]
        curves = {}
        if "validation" in c:
            curves["validation, before"] = c["validation"]["reliability_before"]
            curves[f"validation, after (T = {c['temperature']:.2f})"] = c["validation"]["reliability_after"]
        if "test" in c:
            curves["test, before"] = c["test"]["reliability_before"]
            curves["test, after"] = c["test"]["reliability_after"]
        plot_reliability(curves, f"{task}: slide reliability, {calibration['ece']['bins']} bins", run_dir / f"reliability-{task}.png")
        sets = {("test (scored once)" if name == "test" else name): c[name]["coverage_accuracy"] for name in ("validation", "test") if name in c}
        plot_coverage_accuracy(sets, c["threshold"]["value"], f"{task}: chosen on validation", run_dir / f"coverage-{task}.png")


def _card_images(run_dir: Path, metrics: dict) -> list[str]:
    names = [f"metrics-{net}.png" for net in ("regions", "molecular")] + [f"confusion-{task}-final.png" for task in metrics["test"]]
    names += [f"{kind}-{task}.png" for task in CLS_TASKS for kind in ("reliability", "coverage")]
    return [n for n in names if (run_dir / n).is_file()]


def _card_calibration(metrics: dict) -> list[str]:
    """The model card's calibration and abstention section (empty without calibration)."""
    cal = metrics.get("calibration", {})
    tasks = [t for t in CLS_TASKS if t in cal]
    if not tasks:
        return []

    def f(entry: dict, key: str) -> str:
        return f"{entry[key]:.3f}" if key in entry and _finite(entry[key]) else "n/a"

    lines = [
        "## Calibration and abstention (chosen on the validation set)",
        "",
        (
            f"Each head's slide probabilities (mean of tile probabilities) are temperature-scaled, `softmax(log p / T)`, with T "
            f"fitted on the validation slides by minimising their negative log-likelihood (bounded search in "
            f"[{cal['temperature_bounds'][0]}, {cal['temperature_bounds'][1]}]); the worker applies T before the threshold. "
            f"The indeterminate threshold is the lowest calibrated top probability at which the validation slides called reach "
            f"selective accuracy >= {cal['target_accuracy']} while at least {cal['min_coverage']:.0%} of them are called "
            "(when none does, the most accurate threshold keeping that coverage, marked \"no\" under target met). "
            f"ECE: top-label expected calibration error, {cal['ece']['bins']} equal-width bins. Test figures were computed once, "
            "after T and the threshold were chosen; with few validation slides both are rough, and a T marked (bound) stopped at "
            "the search's bound (separable or wholly wrong validation slides): treat its probabilities with care."
        ),
        "",
        "| head | T | threshold | target met | val slides | val ECE before -> after | val coverage / sel. acc. | test ECE before -> after | test coverage / sel. acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tasks:
        c = cal[t]
        v, te = c.get("validation", {}), c.get("test", {})
        lines.append(
            f"| {t} | {c['temperature']:.3f}{' (bound)' if c.get('temperature_at_bound') else ''} | {c['threshold']['value']:.3f} | {'yes' if c['threshold']['target_met'] else 'no'} | "
            f"{v.get('slides', 0)} | {f(v, 'ece_before')} -> {f(v, 'ece_after')} | {f(v, 'coverage')} / {f(v, 'selective_accuracy')} | "
            f"{f(te, 'ece_before')} -> {f(te, 'ece_after')} | {f(te, 'coverage')} / {f(te, 'selective_accuracy')} |"
        )
    return lines + ["", "Reliability diagrams (`reliability-<head>.png`) and coverage-accuracy curves (`coverage-<head>.png`, validation and test marked as such) are under Plots.", ""]


def write_model_card(run_dir: Path, cfg: RunConfig, metrics: dict, commit: str, split, card_dir: Path | None) -> None:
    """model-card.md in the run folder (plots beside it); with ``card_dir`` (e.g. docs/model-cards)
    also ``card_dir/<name>.md`` with its plots copied to ``card_dir/<name>/``.  Only when asked,
    so test runs never write into the checkout."""
    images = _card_images(run_dir, metrics)
    (run_dir / "model-card.md").write_text(model_card(cfg, metrics, commit, split, images, prefix=""))
    if card_dir is not None:
        (card_dir / cfg.name).mkdir(parents=True, exist_ok=True)
        for name in images:
            shutil.copy(run_dir / name, card_dir / cfg.name / name)
        (card_dir / f"{cfg.name}.md").write_text(model_card(cfg, metrics, commit, split, images, prefix=f"{cfg.name}/"))


def _summary(metrics: dict) -> dict[str, float]:
    """The manifest's ``[validation]`` table: every headline figure of the test set (``test_``)
    and of the validation set (``val_``), each with its patient-level 95 % interval
    (``<key>_ci_low`` / ``<key>_ci_high``), and the sets' sizes.  Undefined figures are left out
    (the table holds finite numbers only)."""
    out: dict[str, float] = {}
    for name, size in metrics["sets"].items():
        short = {"validation": "val"}.get(name, name)
        out[f"{short}_patients"] = size["patients"]
        out[f"{short}_slides"] = size["slides"]
    for set_name, prefix in (("test", "test_"), ("validation", "val_")):
        for key, value, ci in _figures(metrics[set_name]):
            if not _finite(value):
                continue
            out[prefix + key] = value
            if ci is not None and _finite(ci[0]) and _finite(ci[1]):
                out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = ci
    out.update(_calibration_summary(metrics.get("calibration", {})))
    return {k: float(v) for k, v in out.items() if _finite(v)}


def _calibration_summary(calibration: dict) -> dict[str, float]:
    """``[validation]`` keys of calibration: the temperature and threshold (``val_``: chosen on
    validation), the target they were chosen for, and per set the ECE before and after
    temperature scaling and the coverage and selective accuracy at the threshold."""
    out: dict[str, float] = {}
    if not any(t in calibration for t in CLS_TASKS):
        return out
    out["val_calibration_target_accuracy"] = calibration["target_accuracy"]
    out["val_calibration_min_coverage"] = calibration["min_coverage"]
    out["calibration_ece_bins"] = calibration["ece"]["bins"]
    for task in CLS_TASKS:
        if task not in calibration:
            continue
        c = calibration[task]
        out[f"val_{task}_temperature"] = c["temperature"]
        out[f"val_{task}_indeterminate_below"] = c["threshold"]["value"]
        out[f"val_{task}_threshold_target_met"] = 1.0 if c["threshold"]["target_met"] else 0.0
        for set_name, prefix in (("validation", "val_"), ("test", "test_")):
            if set_name in c:
                for key in ("ece_before", "ece_after", "coverage", "selective_accuracy"):
                    out[f"{prefix}{task}_{key}"] = c[set_name][key]
    return out


def config_digest(config_path: Path) -> str:
    """SHA-256 of the effective config (``extends`` resolved, canonical JSON): a bundle's
    provenance carries it, so a test can tell when a shipped bundle no longer matches its config."""
    canonical = json.dumps(read_config(config_path), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def provenance(cfg: RunConfig, config_path: Path, commit: str, framework: str) -> str:
    """The manifest's provenance: the command, the code, the data (synthetic said so) and the config's digest."""
    config_path = Path(config_path).resolve()
    root = Path(__file__).resolve().parent.parent
    shown = config_path.relative_to(root) if config_path.is_relative_to(root) else config_path.name
    textures = "procedurally rendered textures of glio_node.synthetic, no patient data, nothing resembling real tissue"
    if cfg.synthetic is not None:
        data = (
            f"synthetic slides only, written by `python -m training synthetic` from the config's [synthetic] table "
            f"({cfg.synthetic.patients} patients; {textures})"
        )
    elif synthetic_data(False, cfg.dataset):
        data = (
            f"synthetic slides only, written by `python -m training synthetic` "
            f"({cfg.dataset.name}/{PARAMETERS_FILE} holds its parameters; {textures})"
        )
    else:
        data = f"the slides in {cfg.dataset.name}/"
    return (
        f"Trained by `python -m training train --config {shown}` at {commit} with {framework} on {data}; "
        f"seed {cfg.seed}, split by patient into train, validation (early stopping, checkpoint) and test (scored once, "
        f"the [validation] table's test_ keys); config SHA-256 {config_digest(config_path)}."
    )


def _classifier_head(task: str, calibration: dict) -> HeadSpec:
    """A molecular head with the temperature and threshold chosen on validation; without them
    (calibration off, no validation slide labelled for the task) not calibrated, fixed threshold."""
    chosen = calibration.get(task)
    if chosen is None:
        return HeadSpec(task=task, classes=coding.CLASSES_BY_TASK[task], indeterminate_below=INDETERMINATE_BELOW[task])
    return HeadSpec(task=task, classes=coding.CLASSES_BY_TASK[task], indeterminate_below=chosen["threshold"]["value"],
                    temperature=chosen["temperature"])


def _fit_gate(cfg: RunConfig, clf, split: Split, tiles: _Tiles, run_dir: Path):
    """The OOD gate (training/ood.py): reference on the training patients' classifier tiles,
    threshold on the validation patients'; the report goes to the run folder's ood.json."""
    from training.ood import fit_gate, write_report

    gate = fit_gate(clf, "molecular", cfg.normalization, {s: sh.images for s, sh in tiles.classifier.items()},
                    split.train, split.validation)
    write_report(run_dir, gate.report)
    return gate


def export_bundle(cfg: RunConfig, unet, clf, metrics: dict, commit: str, config_path: Path, gate=None) -> Path:
    """Write models/<name>/ with the manifest of docs/model-bundle.md (and its OOD gate, when given)."""
    import keras

    networks = (
        NetworkSpec(
            name="regions", file="regions.keras", sha256=None, tile_size=cfg.segmentation.tile_size,
            um_per_px=cfg.segmentation.um_per_px, overlap=cfg.segmentation.overlap, normalization=cfg.normalization,
            heads=(HeadSpec(task="segmentation", classes=coding.REGION_CLASSES),),
        ),
        NetworkSpec(
            name="molecular", file="molecular.keras", sha256=None, tile_size=cfg.classifier.tile_size,
            um_per_px=cfg.classifier.um_per_px, overlap=0, normalization=cfg.normalization,
            heads=tuple(_classifier_head(t, metrics.get("calibration", {})) for t in CLS_TASKS),
        ),
    )
    manifest = Manifest(
        name=cfg.name,
        version=cfg.version,
        uid=f"2.25.{uuid.uuid4().int}",
        intended_use=cfg.intended_use,
        is_demo=cfg.is_demo,
        provenance=provenance(cfg, config_path, commit, f"Keras {keras.__version__} ({keras.backend.backend()} backend)"),
        created=datetime.now(UTC).replace(microsecond=0),
        networks=networks,
        validation=_summary(metrics),
    )
    out = cfg.models_dir / cfg.name
    if gate is None:
        write_bundle(out, manifest, {"regions": unet, "molecular": clf})
    else:
        from training.ood import write_with_gate

        write_with_gate(out, manifest, gate, {"regions": unet, "molecular": clf})
    return out
