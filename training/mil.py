"""Attention-MIL training: tile embeddings extracted once per slide, then ABMIL heads trained on them.

The two-stage models of docs/model-bundle.md ("encoder" then "aggregator") are trained in two
steps, as STAMP and CLAM train them:

1. ``embed_slides``: every slide's tissue tiles (the worker's own tiling, training/tiles.py) go
   through a frozen tile encoder (a ``.keras`` model or an ``.onnx`` graph: tile -> embedding
   vector) once; the slide's (N, D) embeddings are cached as float16 in one ``.npz`` whose name
   carries the encoder file's SHA-256 and the slide's identity and tile geometry (the same hash
   the tile shards use: file names, sizes, modification times, mask, spacing, tile size, tissue
   threshold).  A second run with the same encoder and slides opens no slide, decodes no frame
   and calls the encoder zero times; another encoder, a changed slide or another tile geometry
   makes new entries.  No tile image is kept: only the embeddings.
2. ``train_abmil``: a gated attention-MIL head (glio_node.runtime.mil.build_abmil) per task is
   trained on the training patients' bags.  Bags are sampled to a fixed size per step
   (``bag_size`` tiles drawn from a slide, with replacement only when it has fewer) so that they
   batch, as STAMP does; early stopping and the checkpoint watch the validation patients only,
   on their whole bags (one slide per call, as the worker runs it).  The test patients are
   scored once, at the end (:func:`score`, patient-level bootstrap 95 % intervals).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glio_node.bundle import normalize, sha256_file
from training.bootstrap import classification_intervals
from training.dataset import SlideRecord
from training.metrics import roc_auc
from training.tiles import TileSpec, _inputs_hash, extract_slide

EMBEDDINGS_FORMAT = 1  # bump when the cache layout or the extraction changes


class Encoder:
    """A frozen tile encoder: RGB uint8 tiles (B, T, T, 3) -> float32 embeddings (B, D).

    ``path`` is a ``.keras`` model (loaded with ``safe_mode``) or an ``.onnx`` graph (ONNX Runtime
    on the CPU) with one input, tiles (B, T, T, 3) float32 after ``normalization``
    (glio_node.bundle.normalize), and the embedding as its first output (a Keras model with a
    dict output must have one entry).  ``calls`` counts the batches it has encoded.
    """

    def __init__(self, path: str | Path, normalization: str = "scale_0_1", batch_size: int = 64):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"encoder {self.path} does not exist; build one with `python -m training encoder`")
        self.sha256 = sha256_file(self.path)
        self.normalization = normalization
        self.batch_size = batch_size
        self.calls = 0
        if self.path.suffix == ".onnx":
            from glio_node.runtime.onnx_runner import open_session  # noqa: PLC0415

            self.runtime = "onnx"
            session = open_session(self.path, "cpu")
            name = session.get_inputs()[0].name
            self._run = lambda x: session.run(None, {name: x})[0]
        elif self.path.suffix == ".keras":
            import keras  # noqa: PLC0415

            self.runtime = "keras"
            model = keras.saving.load_model(self.path, safe_mode=True, compile=False)

            def run(x):
                out = model(x, training=False)
                if isinstance(out, Mapping):
                    if len(out) != 1:
                        raise ValueError(f"encoder {self.path} outputs {sorted(out)}; an encoder has one output, the embedding")
                    out = next(iter(out.values()))
                return np.asarray(out)

            self._run = run
        else:
            raise ValueError(f"encoder {self.path}: the file must end in .keras or .onnx")

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(tiles), self.batch_size):
            self.calls += 1
            emb = self._run(normalize(tiles[start:start + self.batch_size], self.normalization))
            out.append(np.asarray(emb, np.float32).reshape(len(tiles[start:start + self.batch_size]), -1))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class Bag:
    """A slide's tissue tiles as embeddings: (N, D) float16, and each tile's grid (row, col)."""

    slide_id: str
    embeddings: np.ndarray
    cells: np.ndarray


@dataclass
class ExtractionStats:
    """What one ``embed_slides`` call cost: 0 frames and 0 encoder calls when all was cached."""

    slides_cached: int = 0
    slides_encoded: int = 0
    frames_decoded: int = 0
    encoder_calls: int = 0
    tiles: int = 0


def cache_path(cache_dir: Path, record: SlideRecord, spec: TileSpec, encoder_sha256: str) -> Path:
    """Where a slide's embeddings are cached: keyed by the encoder's SHA-256 and the slide's
    identity and tile geometry (training.tiles' input hash)."""
    key = f"{EMBEDDINGS_FORMAT}-{encoder_sha256[:16]}-{_inputs_hash(record, spec)}"
    return Path(cache_dir) / f"{record.slide_id}-{spec.tile_size}px-{spec.um_per_px:g}um-{key}.npz"


def embed_slides(
    records: Sequence[SlideRecord], spec: TileSpec, encoder: Encoder, dataset_root: Path, cache_dir: Path
) -> tuple[dict[str, Bag], ExtractionStats]:
    """Each slide's bag from the cache, or decoded, encoded and cached (then its tiles dropped)."""
    stats = ExtractionStats()
    calls_before = encoder.calls
    bags: dict[str, Bag] = {}
    cache_dir = Path(cache_dir)
    for record in records:
        path = cache_path(cache_dir, record, spec, encoder.sha256)
        if path.is_file():
            with np.load(path) as z:
                bags[record.slide_id] = Bag(record.slide_id, z["embeddings"], z["cells"])
            stats.slides_cached += 1
        else:
            shard = extract_slide(record, spec, dataset_root)
            if len(shard.images) == 0:
                raise ValueError(f"slide {record.slide_id} has no tissue tile at {spec.tile_size} px, {spec.um_per_px} µm/px; "
                                 "lower min_tissue or check the slide")
            emb = encoder(shard.images).astype(np.float16)
            stats.frames_decoded += shard.frames_decoded
            stats.slides_encoded += 1
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, embeddings=emb, cells=shard.cells)
            tmp.replace(path)  # a killed run leaves no half-written entry under the real name
            bags[record.slide_id] = Bag(record.slide_id, emb, shard.cells)
        stats.tiles += len(bags[record.slide_id].embeddings)
    stats.encoder_calls = encoder.calls - calls_before
    return bags, stats


def sample_bags(bags: Sequence[np.ndarray], bag_size: int, per_slide: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(S * per_slide, bag_size, D) float32 bags drawn from each slide, and each bag's slide index.

    A slide with at least ``bag_size`` tiles gives distinct tiles; a smaller one repeats some.
    """
    out, owner = [], []
    for i, emb in enumerate(bags):
        n = len(emb)
        for _ in range(per_slide):
            idx = rng.choice(n, bag_size, replace=n < bag_size)
            out.append(np.asarray(emb[idx], np.float32))
            owner.append(i)
    return np.stack(out), np.array(owner)


@dataclass(frozen=True)
class MilConfig:
    """How an ABMIL head is trained (``python -m training train-mil`` flags)."""

    bag_size: int = 64  # tiles per sampled training bag
    bags_per_slide: int = 4  # sampled bags per slide and epoch
    batch_size: int = 16  # bags per step
    epochs: int = 40
    patience: int = 8  # epochs without a better validation loss before stopping
    learning_rate: float = 1e-3
    hidden: int = 64
    attention_dim: int = 32
    dropout: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("bag_size", "bags_per_slide", "batch_size", "epochs", "patience", "hidden", "attention_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MIL {key} {value!r} must be a positive integer")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"MIL learning_rate {self.learning_rate!r} must be in (0, 1)")


@dataclass
class TrainedHead:
    model: object  # keras.Model: build_abmil's head with the best validation weights
    best_epoch: int
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_loss


def _cross_entropy(probabilities: np.ndarray, truth: np.ndarray) -> float:
    p = np.clip(probabilities[np.arange(len(truth)), truth], 1e-7, 1.0)
    return float(-np.mean(np.log(p)))


def predict(model, bags: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each slide's probabilities (S, C) and attention (N_i,) over its whole bag, one slide per
    call as the worker runs it."""
    probs, attention = [], []
    for emb in bags:
        out = model(np.asarray(emb, np.float32)[None], training=False)
        probs.append(np.asarray(out["probabilities"])[0])
        attention.append(np.asarray(out["attention"])[0])
    return np.stack(probs), attention


def train_abmil(
    train_bags: Sequence[np.ndarray], train_truth: Sequence[int],
    val_bags: Sequence[np.ndarray], val_truth: Sequence[int],
    n_classes: int, config: MilConfig = MilConfig(), verbose: bool = False,
) -> TrainedHead:
    """An ABMIL head trained on fixed-size bags sampled from ``train_bags`` each epoch; the
    weights kept are those of the epoch with the lowest validation loss (whole bags)."""
    import keras  # noqa: PLC0415

    from glio_node.runtime.mil import PROBABILITIES, build_abmil  # noqa: PLC0415

    if not train_bags or not val_bags:
        raise ValueError(f"MIL training needs training and validation slides, got {len(train_bags)} and {len(val_bags)}")
    keras.utils.set_random_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    embed_dim = int(train_bags[0].shape[1])
    head = build_abmil(embed_dim, n_classes, hidden=config.hidden, attention_dim=config.attention_dim, dropout=config.dropout)
    trainer = keras.Model(head.inputs, head.outputs[PROBABILITIES] if isinstance(head.outputs, dict) else head.output[PROBABILITIES])
    trainer.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss="categorical_crossentropy")
    train_truth, val_truth = np.asarray(train_truth), np.asarray(val_truth)
    best, best_loss, best_epoch, stale, history = head.get_weights(), math.inf, 0, 0, []
    for epoch in range(1, config.epochs + 1):
        x, owner = sample_bags(train_bags, config.bag_size, config.bags_per_slide, rng)
        y = np.eye(n_classes, dtype=np.float32)[train_truth[owner]]
        fit = trainer.fit(x, y, batch_size=config.batch_size, epochs=1, shuffle=True, verbose=0)
        val_probs, _ = predict(head, val_bags)
        val_loss = _cross_entropy(val_probs, val_truth)
        history.append({"epoch": epoch, "train_loss": float(fit.history["loss"][-1]), "val_loss": val_loss})
        if verbose:
            print(f"epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, validation loss {val_loss:.4f}")
        if val_loss < best_loss - 1e-6:
            best, best_loss, best_epoch, stale = head.get_weights(), val_loss, epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    head.set_weights(best)
    return TrainedHead(head, best_epoch, history)


def score(truth: Sequence[int], probabilities: np.ndarray, patients: Sequence[str], class_names: Sequence[str]) -> dict:
    """Slide-level metrics with patient-level bootstrap 95 % intervals; for two classes also
    ``roc_auc`` and its ``roc_auc_ci`` (one class against the other: the same for either class)."""
    truth = np.asarray(truth)
    ci = classification_intervals(truth, probabilities, patients, class_names)
    out = {"slides": len(truth), "patients": len(set(patients)),
           "accuracy": float(np.mean(np.argmax(probabilities, axis=1) == truth)), "ci": ci}
    if len(class_names) == 2:
        positive = class_names[0]  # "amplified", "methylated": glio_node.coding lists the finding first
        out["roc_auc"] = roc_auc(truth == 0, probabilities[:, 0])
        out["roc_auc_ci"] = ci["per_class"][positive]["roc_auc"]
    return out
