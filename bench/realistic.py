"""A bundle of realistic cost with random weights, for the benchmarks only.

The demo bundle's networks are tiny (30 k and 121 k parameters); no deployment runs such nets, and
with them the per-slide fixed costs hide what the pipeline costs around real inference.  This
bundle has the demo's heads, classes and normalisation but the sizes people run:

- ``regions``: UNet of depth 5, base 16 (about 1.94 M parameters), 320-px tiles at 0.5 µm/px, no
  overlap (about 9.5 GFLOP per tile);
- ``molecular``: the VGG16-shaped classifier at base 64 (about 14.7 M parameters) on 160-px tiles
  at 0.5 µm/px.

The weights are random (seeded), so its calls mean nothing: the manifest says so, and it is
written under ``.cache/`` only, never shipped.  Built once per cache folder and reused.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from pathlib import Path

REALISTIC_NAME = "glio-bench-realistic"
REALISTIC_VERSION = "0.1.0"
UNET_DEPTH, UNET_BASE = 5, 16
VGG_BASE = 64
REGIONS_UM_PER_PX = 0.5


def realistic_manifest(demo_manifest):
    """The demo manifest with the realistic networks' geometry and a name that says what it is."""
    networks = []
    for n in demo_manifest.networks:
        seg = any(h.task == "segmentation" for h in n.heads)
        networks.append(
            dataclasses.replace(
                n,
                file=f"{n.name}.keras",
                sha256=None,
                tile_size=320 if seg else 160,
                um_per_px=REGIONS_UM_PER_PX if seg else n.um_per_px,
                overlap=0 if seg else n.overlap,
            )
        )
    return dataclasses.replace(
        demo_manifest,
        name=REALISTIC_NAME,
        version=REALISTIC_VERSION,
        uid="2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, f"glio-node/{REALISTIC_NAME}/{REALISTIC_VERSION}").int),
        intended_use="DEMO benchmark bundle with random weights: its outputs mean nothing. Not for diagnosis.",
        is_demo=True,
        provenance=(
            f"Built by bench/realistic.py with random seeded weights: UNet depth {UNET_DEPTH} base {UNET_BASE}, "
            f"VGG16-shaped classifier base {VGG_BASE}; for measuring speed and memory only."
        ),
        created=datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc),
        networks=tuple(networks),
        validation={},
        ood=None,  # the demo's gate describes the demo's features; random weights have none to compare
    )


def build_models(manifest, seed: int = 0) -> dict:
    """Keras models for ``manifest``'s networks (random weights, ``seed``)."""
    import keras

    from glio_node.runtime.networks import build_classifier, build_unet

    keras.utils.set_random_seed(seed)
    models = {}
    for n in manifest.networks:
        if any(h.task == "segmentation" for h in n.heads):
            models[n.name] = build_unet(n.tile_size, len(n.heads[0].classes), depth=UNET_DEPTH, base_filters=UNET_BASE, name=n.name)
        else:
            models[n.name] = build_classifier(
                n.tile_size, {h.task: len(h.classes) for h in n.heads}, base_filters=VGG_BASE, name=n.name
            )
    return models


def ensure_realistic_bundle(demo_bundle: Path, cache: Path) -> Path:
    """The realistic bundle's folder under ``cache``, written on first use from ``demo_bundle``'s
    manifest (heads and classes); raises ``BundleError`` if the demo manifest does not verify."""
    from glio_node.bundle import verify_bundle, write_bundle
    from glio_node.errors import BundleError

    out = cache / f"{REALISTIC_NAME}-{REALISTIC_VERSION}-unet{UNET_DEPTH}x{UNET_BASE}-vgg{VGG_BASE}"
    if (out / "manifest.toml").is_file():
        try:
            verify_bundle(out)
            return out
        except BundleError:  # a stale or broken cache is rebuilt, never trusted
            pass
    manifest = realistic_manifest(verify_bundle(demo_bundle))
    write_bundle(out, manifest, build_models(manifest))
    return out


def flops_per_tile(model) -> int:
    """Floating-point operations (multiply and add counted apart) of one tile through ``model``'s
    convolutions, transposed convolutions and dense layers: what the arithmetic floor counts.
    Batch norm, activations and pooling are left out (a few per cent of a conv net's work)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose, keras.layers.Dense)):
            kernel = layer.kernel.shape  # (kh, kw, in, out) / (kh, kw, out, in) / (in, out)
            k_size = 1
            for d in kernel:
                k_size *= int(d)
            if isinstance(layer, keras.layers.Dense):
                positions = 1
            elif isinstance(layer, keras.layers.Conv2DTranspose):
                positions = int(layer.input.shape[1]) * int(layer.input.shape[2])
            else:
                positions = int(layer.output.shape[1]) * int(layer.output.shape[2])
            total += 2 * positions * k_size
    return total
