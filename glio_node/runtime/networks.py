"""Network architectures of glio-node model bundles: a UNet for regions, a VGG-shaped classifier.

Backend-agnostic Keras 3 (``keras.layers`` / ``keras.ops`` only), so the same code runs on the
TensorFlow backend on CPU and on JAX on a GPU.  Every model takes float32 tiles of shape
(tile_size, tile_size, 3) that are already normalised as the bundle manifest says (see
``glio_node.bundle.normalize``), and returns a dict keyed by task:

- ``build_unet``:       ``{"segmentation": (tile_size, tile_size, n_classes)}`` softmax;
- ``build_classifier``: ``{task: (n_classes,)}`` softmax, one entry per head.

The output layers carry the task names, so a saved model reloads with the same dict keys.
"""

from __future__ import annotations

import re

import keras
from keras import layers

# Convolutions per block of VGG16: two in the first two blocks, three in the last three.
_VGG16_CONVS = (2, 2, 3, 3, 3)
_HEAD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _conv_bn_relu(x, filters: int, batch_norm: bool, name: str, bn_momentum: float = 0.99):
    x = layers.Conv2D(
        filters, 3, padding="same", use_bias=not batch_norm, kernel_initializer="he_normal", name=f"{name}_conv"
    )(x)
    if batch_norm:
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def build_unet(
    tile_size: int,
    n_classes: int,
    depth: int = 4,
    base_filters: int = 64,
    name: str = "regions",
    batch_norm: bool = True,
) -> keras.Model:
    """Build a UNet (Ronneberger et al. 2015) with 'same' padding.

    ``depth`` counts resolution levels including the bottleneck; level ``i`` has
    ``base_filters * 2**i`` filters, so the classic 64 -> 1024 UNet is ``depth=5, base_filters=64``
    (about 31 M parameters).  Each level is (3x3 conv [-> BN] -> ReLU) x 2; the encoder
    downsamples by 2x2 max-pooling, the decoder upsamples by a 2x2 stride-2 transposed convolution
    and concatenates the encoder's feature map of the same level.  Convolutions use He
    initialisation; without batch norm the input is first mapped from [0, 1] to [-1, 1] (a fixed
    Rescaling layer), which a plain UNet needs to start learning on pale H&E-like tiles.

    Input: float32 (tile_size, tile_size, 3).  Output: ``{"segmentation": softmax
    (tile_size, tile_size, n_classes)}``.

    Raises ValueError if ``tile_size`` is not divisible by ``2**(depth - 1)`` (the pooled feature
    maps would not line up with the skips), or a size is not a positive integer.
    """
    _check_positive(tile_size=tile_size, depth=depth, base_filters=base_filters)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    factor = 2 ** (depth - 1)
    if tile_size % factor:
        raise ValueError(
            f"tile_size {tile_size} px must be divisible by {factor} (2**(depth-1)) for a UNet of "
            f"depth {depth}; use a multiple of {factor}, e.g. {(tile_size // factor + 1) * factor} px"
        )
    inputs = keras.Input(shape=(tile_size, tile_size, 3), dtype="float32", name="image")
    x = inputs if batch_norm else layers.Rescaling(2.0, offset=-1.0, name="center")(inputs)  # [0, 1] -> [-1, 1]
    skips = []
    for level in range(depth - 1):
        filters = base_filters * 2**level
        x = _conv_bn_relu(x, filters, batch_norm, f"enc{level}a")
        x = _conv_bn_relu(x, filters, batch_norm, f"enc{level}b")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    filters = base_filters * 2 ** (depth - 1)
    x = _conv_bn_relu(x, filters, batch_norm, "bottleneck_a")
    x = _conv_bn_relu(x, filters, batch_norm, "bottleneck_b")
    for level in reversed(range(depth - 1)):
        filters = base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _conv_bn_relu(x, filters, batch_norm, f"dec{level}a")
        x = _conv_bn_relu(x, filters, batch_norm, f"dec{level}b")
    logits = layers.Conv2D(n_classes, 1, name="segmentation_logits")(x)
    # float32 softmax even under a mixed-precision policy: the stitcher averages probabilities.
    outputs = layers.Activation("softmax", dtype="float32", name="segmentation")(logits)
    return keras.Model(inputs, {"segmentation": outputs}, name=name)


def build_classifier(
    tile_size: int,
    heads: dict[str, int],
    base_filters: int = 64,
    blocks: int = 5,
    name: str = "molecular",
    batch_norm: bool = True,
    dropout: float = 0.0,
    bn_momentum: float = 0.99,
) -> keras.Model:
    """Build a VGG16-shaped classifier with one softmax head per task.

    The backbone is the first ``blocks`` (1..5) blocks of VGG16: 2, 2, 3, 3, 3 convolutions of
    3x3 [-> BN] -> ReLU, each block closed by 2x2 max-pooling; block ``i`` has
    ``base_filters * 2**min(i, 3)`` filters (64, 128, 256, 512, 512 for the classic net).  Global
    average pooling follows, then per task an optional dropout and a dense softmax layer named
    after the task.  ``bn_momentum`` is the batch-norm moving-average momentum: lower it (e.g. 0.9)
    for short training runs, or the moving statistics used at inference lag the weights.

    ``heads`` maps task name (e.g. "subtype", "mgmt", "egfr") to its number of classes.
    Input: float32 (tile_size, tile_size, 3).  Output: ``{task: softmax (n_classes,)}``.

    Raises ValueError for no heads, a head name that is not a lower-case identifier, fewer than
    two classes, ``blocks`` outside 1..5, or a tile too small for the pooling.
    """
    _check_positive(tile_size=tile_size, base_filters=base_filters, blocks=blocks)
    if blocks > len(_VGG16_CONVS):
        raise ValueError(f"blocks must be 1..{len(_VGG16_CONVS)} (VGG16 has five), got {blocks}")
    if tile_size < 2**blocks:
        raise ValueError(f"tile_size {tile_size} px is too small for {blocks} pooling blocks (min {2**blocks} px)")
    if not heads:
        raise ValueError("a classifier needs at least one head, got none")
    for task, n_classes in heads.items():
        if not _HEAD_NAME.match(task):
            raise ValueError(f"head name {task!r} must be a lower-case identifier such as 'subtype'")
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"head {task!r} needs an integer number of classes >= 2, got {n_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    inputs = keras.Input(shape=(tile_size, tile_size, 3), dtype="float32", name="image")
    x = inputs
    for block in range(blocks):
        filters = base_filters * 2 ** min(block, 3)
        for conv in range(_VGG16_CONVS[block]):
            x = _conv_bn_relu(x, filters, batch_norm, f"block{block + 1}_conv{conv + 1}", bn_momentum)
        x = layers.MaxPooling2D(2, name=f"block{block + 1}_pool")(x)
    features = layers.GlobalAveragePooling2D(name="features")(x)
    outputs = {}
    for task, n_classes in heads.items():
        h = layers.Dropout(dropout, name=f"{task}_dropout")(features) if dropout else features
        outputs[task] = layers.Dense(n_classes, activation="softmax", dtype="float32", name=task)(h)
    return keras.Model(inputs, outputs, name=name)
