"""VGG16 transfer-learning classifiers (shared/seeds/000): one head or one backbone for several.

The UNet is glio_node.runtime.networks.build_unet (configurable depth and width; the classic
64 -> 1024 is ``depth=5, base_filters=64``).  Here: ``keras.applications.VGG16`` without its top,
loaded from a local weights file (hospital machines have no network, so nothing is downloaded;
``weights=None`` means random initialisation), a global-average-pooled feature vector and one
softmax head per task.  Training follows the method's frozen-then-fine-tune schedule:
:func:`set_trainable` freezes the backbone for the first phase and unfreezes its last blocks for
the second.  Backend-agnostic Keras 3, no tf.* inside the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import keras

VGG_BLOCKS = ("block1", "block2", "block3", "block4", "block5")


def build_vgg16_classifier(
    tile_size: int,
    heads: Mapping[str, int],
    weights: str | Path | None = None,
    dropout: float = 0.5,
    dense: int = 256,
    name: str = "vgg16_classifier",
) -> keras.Model:
    """A VGG16 backbone with one softmax head per task: ``heads`` maps task -> number of classes
    (e.g. ``{"subtype": 4}``, or ``{"subtype": 4, "mgmt": 2, "egfr": 2}`` for the multi-head
    option).  Input: float32 (tile_size, tile_size, 3) already normalised ("imagenet" for
    ImageNet weights).  Output: dict task -> (n_classes,) probabilities.

    ``weights`` is a local ``.h5``/``.weights.h5`` file of VGG16 without top, or None.  Raises
    ValueError for a missing file or a tile smaller than 32 px (five 2x poolings).
    """
    if not heads:
        raise ValueError("a classifier needs at least one head, e.g. {'subtype': 4}")
    if tile_size < 32:
        raise ValueError(f"tile_size {tile_size} px is too small for VGG16 (at least 32 px)")
    if weights is not None and not Path(weights).is_file():
        raise ValueError(f"VGG16 weights file {weights} does not exist; give a local file or none (random initialisation)")
    inputs = keras.Input((tile_size, tile_size, 3), name="tiles")
    backbone = keras.applications.VGG16(include_top=False, weights=None, input_shape=(tile_size, tile_size, 3))
    if weights is not None:
        backbone.load_weights(str(weights))
    x = backbone(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(dense, activation="relu", name="features")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = {task: keras.layers.Dense(n, activation="softmax", name=task)(x) for task, n in heads.items()}
    return keras.Model(inputs, outputs, name=name)


def set_trainable(model: keras.Model, phase: str, fine_tune_blocks: int = 2) -> None:
    """``phase`` "frozen": only the heads learn; "fine_tune": also the last ``fine_tune_blocks``
    VGG blocks.  Recompile the model after calling this (Keras reads trainability at compile)."""
    if phase not in ("frozen", "fine_tune"):
        raise ValueError(f"phase {phase!r} is not 'frozen' or 'fine_tune'")
    backbone = model.get_layer("vgg16")
    open_blocks = VGG_BLOCKS[len(VGG_BLOCKS) - fine_tune_blocks :] if phase == "fine_tune" else ()
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = any(layer.name.startswith(b) for b in open_blocks)
