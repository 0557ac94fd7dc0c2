"""Train the demo bundle ``models/glio-demo/`` on synthetic patches, and write it.

    python -m training.demo [--out models/glio-demo] [--seed 0] [--fast]

Everything the networks see is painted by ``glio_node.synthetic.textures``: random Voronoi region
layouts (``blob_labels``) with glass where a random tissue mask says so, each patch with a random
molecular ``Signature``.  To look like what the worker reads from a pyramid, a patch is either
painted directly at the network's spacing or painted 2x/4x finer and box-averaged down, and half
the patches go through JPEG.

- "regions": UNet (depth 3, 8 base filters) on 320-px tiles at 2.0 µm/px; the label is the region
  class of each pixel, class 0 ("other") on glass (the pipeline masks glass separately).
- "molecular": VGG-shaped classifier (4 blocks, 8 base filters) on 160-px tiles at 0.5 µm/px
  with three heads, subtype / mgmt / egfr, labelled with the patch's Signature.

Held-out metrics (patches from an independent seed stream) go into the manifest's [validation]
table.  ``--fast`` trains a token model in seconds, for tests of the plumbing only.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from glio_node import coding
from glio_node.bundle import HeadSpec, Manifest, NetworkSpec, normalize, write_bundle
from glio_node.synthetic import textures

logger = logging.getLogger("training.demo")

BUNDLE_NAME = "glio-demo"
BUNDLE_VERSION = "0.1.0"
INTENDED_USE = "DEMO model trained on synthetic slides only. Research use only. Not for diagnosis."
REPO_ROOT = Path(__file__).resolve().parent.parent

SEG_TILE, SEG_UM_PER_PX, SEG_OVERLAP = 320, 2.0, 32
CLS_TILE, CLS_UM_PER_PX = 160, 0.5
NORMALIZATION = "scale_0_1"
CLS_TASKS = ("subtype", "mgmt", "egfr")
# Slide calls below these top probabilities are reported as indeterminate.
INDETERMINATE_BELOW = {"subtype": 0.5, "mgmt": 0.6, "egfr": 0.6}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one training run."""

    seg_train: int  # segmentation training patches
    seg_val: int  # held-out segmentation patches
    seg_epochs: int
    cls_train: int  # classifier training patches
    cls_val: int
    cls_epochs: int
    unet_depth: int = 3
    unet_base_filters: int = 8
    # No batch norm in the UNet: with patches that are half glass or all tissue, the batch
    # statistics differ so much from the moving averages that held-out accuracy in inference
    # mode fell to 0.74 (0.89 with batch statistics).  Without it the UNet centres its input and
    # uses He initialisation; the classifier keeps batch norm (held-out accuracy >= 0.99).
    unet_batch_norm: bool = False
    cls_blocks: int = 4
    cls_base_filters: int = 8
    seg_batch: int = 8
    cls_batch: int = 32
    # Batch-norm momentum of the classifier: with Keras' default 0.99 and a few hundred steps the
    # moving statistics lagged the weights and held-out mgmt/egfr accuracy was 0.52 (train 0.99).
    cls_bn_momentum: float = 0.9
    seg_learning_rate: float = 5e-3  # Adam, cosine decay to 2 % over the run
    cls_learning_rate: float = 3e-3


FULL = DemoConfig(seg_train=480, seg_val=64, seg_epochs=7, cls_train=2400, cls_val=400, cls_epochs=5)
FAST = DemoConfig(seg_train=8, seg_val=4, seg_epochs=1, cls_train=32, cls_val=16, cls_epochs=1)


# --- synthetic patches --------------------------------------------------------------------------------


def _random_signature(rng: np.random.Generator) -> textures.Signature:
    return textures.Signature(
        subtype=int(rng.integers(len(textures.SUBTYPES))),
        mgmt_methylated=bool(rng.random() < 0.5),
        egfr_amplified=bool(rng.random() < 0.5),
    )


def _paint(
    rng: np.random.Generator,
    labels: np.ndarray,
    tissue: np.ndarray,
    um_per_px: float,
    signature: textures.Signature,
    supersample: int,
) -> np.ndarray:
    """Render at ``um_per_px / supersample`` and box-average down, as a pyramid level is made."""
    s = supersample
    if s > 1:
        labels = np.repeat(np.repeat(labels, s, axis=0), s, axis=1)
        tissue = np.repeat(np.repeat(tissue, s, axis=0), s, axis=1)
    x0, y0 = rng.uniform(0.0, 20000.0, size=2)
    img = textures.render(
        labels, float(x0), float(y0), um_per_px / s, signature, tissue=tissue, seed=int(rng.integers(1 << 16))
    )
    if s > 1:
        rows, cols = img.shape[0] // s, img.shape[1] // s
        img = img.reshape(rows, s, cols, s, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    if rng.random() < 0.5:  # the slides the worker reads are usually JPEG-compressed
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
        img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return img


def segmentation_patch(rng: np.random.Generator, tile: int = SEG_TILE, um_per_px: float = SEG_UM_PER_PX):
    """One (image uint8 (tile, tile, 3), label uint8 (tile, tile)) pair; glass is labelled 0."""
    n_classes = len(textures.REGION_CLASSES)
    labels = textures.blob_labels(tile, tile, n_classes, rng, cell=int(rng.integers(tile // 8, tile // 2)))
    if rng.random() < 0.5:
        tissue = np.ones((tile, tile), dtype=bool)
    else:
        tissue = textures.blob_labels(tile, tile, 2, rng, cell=int(rng.integers(tile // 4, tile))).astype(bool)
    img = _paint(rng, labels, tissue, um_per_px, _random_signature(rng), int(rng.choice((1, 2, 4))))
    return img, np.where(tissue, labels, 0).astype(np.uint8)


def classifier_patch(rng: np.random.Generator, tile: int = CLS_TILE, um_per_px: float = CLS_UM_PER_PX):
    """One (image uint8 (tile, tile, 3), (subtype, mgmt, egfr) label indices) pair.

    At least half of every patch is tissue (the worker classifies tissue tiles only).  Label
    indices follow ``glio_node.coding``: mgmt 0 = methylated, egfr 0 = amplified.
    """
    n_classes = len(textures.REGION_CLASSES)
    labels = textures.blob_labels(tile, tile, n_classes, rng, cell=int(rng.integers(tile // 4, tile + 1)))
    tissue = np.ones((tile, tile), dtype=bool)
    if rng.random() < 0.3:
        mask = textures.blob_labels(tile, tile, 2, rng, cell=int(rng.integers(tile // 3, tile))).astype(bool)
        tissue = mask if mask.mean() >= 0.5 else ~mask
    signature = _random_signature(rng)
    img = _paint(rng, labels, tissue, um_per_px, signature, int(rng.choice((1, 2))))
    return img, (signature.subtype, 0 if signature.mgmt_methylated else 1, 0 if signature.egfr_amplified else 1)


def _render_chunk(kind: str, seed: np.random.SeedSequence, count: int):
    rng = np.random.default_rng(seed)
    make = segmentation_patch if kind == "segmentation" else classifier_patch
    images, labels = zip(*(make(rng) for _ in range(count)))
    return np.stack(images), np.asarray(labels, dtype=np.uint8)


def render_patches(kind: str, count: int, seed: np.random.SeedSequence, workers: int = 1):
    """``count`` patches of ``kind`` ("segmentation" | "classifier"), reproducible from ``seed``.

    The patches come in chunks of 16 with one child seed each, so the result does not depend on
    ``workers`` (processes are spawned, never forked, so this is safe after Keras is imported).
    """
    sizes = [min(16, count - start) for start in range(0, count, 16)]
    seeds = seed.spawn(len(sizes))
    if workers <= 1 or len(sizes) == 1:
        chunks = [_render_chunk(kind, s, n) for s, n in zip(seeds, sizes)]
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            chunks = list(pool.map(_render_chunk, [kind] * len(sizes), seeds, sizes))
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


# --- training ----------------------------------------------------------------------------------------------


def _cosine_adam(learning_rate: float, steps: int):
    import keras  # noqa: PLC0415

    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, steps), alpha=0.02)
    return keras.optimizers.Adam(schedule)


def train_regions(cfg: DemoConfig, x: np.ndarray, y: np.ndarray, verbose: int):
    """Train the UNet on uint8 patches ``x`` and label maps ``y``; returns the model."""
    from glio_node.runtime.networks import build_unet  # noqa: PLC0415 - imports keras

    model = build_unet(
        SEG_TILE,
        len(coding.REGION_CLASSES),
        depth=cfg.unet_depth,
        base_filters=cfg.unet_base_filters,
        name="regions",
        batch_norm=cfg.unet_batch_norm,
    )
    steps = cfg.seg_epochs * -(-len(x) // cfg.seg_batch)
    model.compile(
        optimizer=_cosine_adam(cfg.seg_learning_rate, steps),
        loss={"segmentation": "sparse_categorical_crossentropy"},
        metrics={"segmentation": ["sparse_categorical_accuracy"]},
    )
    model.fit(
        normalize(x, NORMALIZATION),
        {"segmentation": y.astype(np.int32)},
        batch_size=cfg.seg_batch,
        epochs=cfg.seg_epochs,
        shuffle=True,
        verbose=verbose,
    )
    return model


def train_molecular(cfg: DemoConfig, x: np.ndarray, y: np.ndarray, verbose: int):
    """Train the three-headed classifier on uint8 patches ``x`` and labels ``y`` (n, 3)."""
    from glio_node.runtime.networks import build_classifier  # noqa: PLC0415 - imports keras

    heads = {task: len(coding.CLASSES_BY_TASK[task]) for task in CLS_TASKS}
    model = build_classifier(
        CLS_TILE,
        heads,
        base_filters=cfg.cls_base_filters,
        blocks=cfg.cls_blocks,
        name="molecular",
        bn_momentum=cfg.cls_bn_momentum,
    )
    steps = cfg.cls_epochs * -(-len(x) // cfg.cls_batch)
    model.compile(
        optimizer=_cosine_adam(cfg.cls_learning_rate, steps),
        loss={task: "sparse_categorical_crossentropy" for task in CLS_TASKS},
        metrics={task: ["sparse_categorical_accuracy"] for task in CLS_TASKS},
    )
    model.fit(
        normalize(x, NORMALIZATION),
        {task: y[:, i].astype(np.int32) for i, task in enumerate(CLS_TASKS)},
        batch_size=cfg.cls_batch,
        epochs=cfg.cls_epochs,
        shuffle=True,
        verbose=verbose,
    )
    return model


def evaluate_regions(model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pixel accuracy (all pixels; pixels of tissue classes 1.. only) and mean IoU over present classes."""
    pred = np.argmax(model.predict(normalize(x, NORMALIZATION), batch_size=8, verbose=0)["segmentation"], axis=-1)
    ious = []
    for c in range(len(coding.REGION_CLASSES)):
        union = np.sum((pred == c) | (y == c))
        if union:
            ious.append(np.sum((pred == c) & (y == c)) / union)
    return {
        "regions_pixel_accuracy": float(np.mean(pred == y)),
        "regions_pixel_accuracy_classes_1_9": float(np.mean(pred[y > 0] == y[y > 0])),
        "regions_mean_iou": float(np.mean(ious)),
        "regions_val_patches": float(len(x)),
    }


def evaluate_molecular(model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Patch accuracy per head."""
    out = model.predict(normalize(x, NORMALIZATION), batch_size=64, verbose=0)
    metrics = {f"{task}_patch_accuracy": float(np.mean(np.argmax(out[task], -1) == y[:, i])) for i, task in enumerate(CLS_TASKS)}
    metrics["molecular_val_patches"] = float(len(x))
    return metrics


# --- the bundle ----------------------------------------------------------------------------------------------


def _git_revision() -> str:
    """The checkout's commit, marked when the tree has uncommitted changes (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit (no git checkout)"
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def demo_manifest(cfg: DemoConfig, argv: list[str], validation: dict[str, float]) -> Manifest:
    """The demo bundle's manifest (without weight hashes: write_bundle adds them)."""
    import keras  # noqa: PLC0415

    provenance = (
        f"Trained by `python -m training.demo {' '.join(argv)}` at {_git_revision()} with Keras "
        f"{keras.__version__} ({keras.backend.backend()} backend), on procedurally rendered synthetic patches only "
        "(glio_node.synthetic.textures; no patient data, nothing resembling real tissue): "
        f"regions: {cfg.seg_train} patches of {SEG_TILE} px at {SEG_UM_PER_PX} um/px, {cfg.seg_epochs} epochs; "
        f"molecular: {cfg.cls_train} patches of {CLS_TILE} px at {CLS_UM_PER_PX} um/px, {cfg.cls_epochs} epochs. "
        "Validation: held-out synthetic patches from an independent seed stream."
    )
    networks = (
        NetworkSpec(
            name="regions",
            file="regions.keras",
            sha256=None,
            tile_size=SEG_TILE,
            um_per_px=SEG_UM_PER_PX,
            overlap=SEG_OVERLAP,
            normalization=NORMALIZATION,
            heads=(HeadSpec(task="segmentation", classes=coding.REGION_CLASSES),),
        ),
        NetworkSpec(
            name="molecular",
            file="molecular.keras",
            sha256=None,
            tile_size=CLS_TILE,
            um_per_px=CLS_UM_PER_PX,
            overlap=0,
            normalization=NORMALIZATION,
            heads=tuple(
                HeadSpec(task=t, classes=coding.CLASSES_BY_TASK[t], indeterminate_below=INDETERMINATE_BELOW[t])
                for t in CLS_TASKS
            ),
        ),
    )
    return Manifest(
        name=BUNDLE_NAME,
        version=BUNDLE_VERSION,
        uid=f"2.25.{uuid.uuid4().int}",
        intended_use=INTENDED_USE,
        is_demo=True,
        provenance=provenance,
        created=datetime.now(timezone.utc).replace(microsecond=0),
        networks=networks,
        validation=validation,
    )


def build_demo_bundle(out: Path, seed: int = 0, fast: bool = False, workers: int | None = None) -> Manifest:
    """Render data, train both networks, measure them on held-out patches, write the bundle to ``out``."""
    import keras  # noqa: PLC0415

    cfg = FAST if fast else FULL
    workers = (1 if fast else min(2, os.cpu_count() or 1)) if workers is None else workers
    verbose = 0 if fast else 2
    keras.utils.set_random_seed(seed)
    train_seq, val_seq = np.random.SeedSequence([seed, 1]), np.random.SeedSequence([seed, 2])
    seg_train_seed, cls_train_seed = train_seq.spawn(2)
    seg_val_seed, cls_val_seed = val_seq.spawn(2)
    validation: dict[str, float] = {}
    t0 = time.monotonic()

    x, y = render_patches("segmentation", cfg.seg_train, seg_train_seed, workers)
    xv, yv = render_patches("segmentation", cfg.seg_val, seg_val_seed, workers)
    logger.info("rendered %d + %d segmentation patches in %.0f s", len(x), len(xv), time.monotonic() - t0)
    t1 = time.monotonic()
    regions = train_regions(cfg, x, y, verbose)
    validation.update(evaluate_regions(regions, xv, yv))
    logger.info("regions trained in %.0f s: %s", time.monotonic() - t1, validation)
    del x, y, xv, yv

    t2 = time.monotonic()
    x, y = render_patches("classifier", cfg.cls_train, cls_train_seed, workers)
    xv, yv = render_patches("classifier", cfg.cls_val, cls_val_seed, workers)
    logger.info("rendered %d + %d classifier patches in %.0f s", len(x), len(xv), time.monotonic() - t2)
    t3 = time.monotonic()
    molecular = train_molecular(cfg, x, y, verbose)
    validation.update(evaluate_molecular(molecular, xv, yv))
    logger.info("molecular trained in %.0f s: %s", time.monotonic() - t3, validation)

    argv = [f"--out {out}", f"--seed {seed}"] + (["--fast"] if fast else [])
    manifest = demo_manifest(cfg, argv, validation)
    written = write_bundle(out, manifest, {"regions": regions, "molecular": molecular})
    logger.info("wrote %s in %.0f s total", out, time.monotonic() - t0)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models") / BUNDLE_NAME, help="bundle folder to (re)write")
    parser.add_argument("--seed", type=int, default=0, help="seed of data rendering and weight initialisation")
    parser.add_argument("--fast", action="store_true", help="tiny run for tests: a token model in seconds")
    parser.add_argument("--workers", type=int, default=None, help="processes that render patches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    manifest = build_demo_bundle(args.out, seed=args.seed, fast=args.fast, workers=args.workers)
    print(f"wrote {args.out}: {manifest.name} {manifest.version}, validation {dict(manifest.validation)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
