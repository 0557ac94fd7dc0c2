"""The tf.data input pipeline: shuffled, augmented, normalised batches from extracted tiles.

Augmentations are the ones that are true of histology: a tile has no up, no left and no fixed
zoom centre, so flips, 90° rotations and random crops change nothing a pathologist would call;
colour jitter stands in for staining and scanner variation.  Geometry is applied identically to
the tile and its region labels; colour only to the tile.  Normalisation is the bundle's own
(:func:`glio_node.bundle.normalize`, run through ``tf.numpy_function``), so a network sees in
training exactly what the worker will feed it.  tf.data is used here only, never in the networks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glio_node.bundle import normalize


@dataclass(frozen=True)
class Augmentation:
    """Which augmentations to apply.  ``crop`` is the output size in px (None: no crop)."""

    flips: bool = True
    rotations: bool = True
    crop: int | None = None
    brightness: float = 0.05  # max additive change, fraction of full scale
    contrast: float = 0.1  # max relative change
    saturation: float = 0.1
    hue: float = 0.02


def augment_pair(image, labels, aug: Augmentation, seed):
    """One (image (H, W, 3) uint8, labels (H, W) uint8) pair, augmented with a stateless ``seed``
    (a (2,) int tensor): the same seed gives the same result, so runs are reproducible."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 8)
    lab = tf.cast(labels, tf.int32)[..., None]
    both = tf.concat([tf.cast(image, tf.int32), lab], axis=-1)  # geometry applied once to both
    if aug.flips:
        both = tf.image.stateless_random_flip_left_right(both, seeds[0])
        both = tf.image.stateless_random_flip_up_down(both, seeds[1])
    if aug.rotations:
        k = tf.random.stateless_uniform([], seeds[2], 0, 4, dtype=tf.int32)
        both = tf.image.rot90(both, k)
    if aug.crop is not None:
        both = tf.image.stateless_random_crop(both, [aug.crop, aug.crop, 4], seeds[3])
    img = tf.cast(both[..., :3], tf.float32) / 255.0
    if aug.brightness:
        img = tf.image.stateless_random_brightness(img, aug.brightness, seeds[4])
    if aug.contrast:
        img = tf.image.stateless_random_contrast(img, 1 - aug.contrast, 1 + aug.contrast, seeds[5])
    if aug.saturation:
        img = tf.image.stateless_random_saturation(img, 1 - aug.saturation, 1 + aug.saturation, seeds[6])
    if aug.hue:
        img = tf.image.stateless_random_hue(img, aug.hue, seeds[7])
    img = tf.cast(tf.round(tf.clip_by_value(img, 0.0, 1.0) * 255.0), tf.uint8)
    return img, tf.cast(both[..., 3], tf.uint8)


def make_dataset(
    images: np.ndarray,
    targets: np.ndarray,
    normalization: str,
    batch_size: int,
    seed: int,
    aug: Augmentation | None = None,
    n_classes: int | None = None,
):
    """A tf.data.Dataset of (normalised float32 tiles, targets).

    ``targets`` are region label maps (N, H, W) (one-hot to ``n_classes``; 255 = unlabelled becomes
    an all-zero vector, so it adds nothing to any loss) or class indices (N,) (one-hot to
    ``n_classes``).  With ``aug`` the dataset is shuffled and augmented anew each epoch.
    """
    import tensorflow as tf

    is_map = targets.ndim == 3
    ds = tf.data.Dataset.from_tensor_slices((images, targets))
    if aug is not None:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        counter = tf.data.Dataset.counter().map(lambda i: tf.stack([tf.cast(seed, tf.int64), i]))
        ds = tf.data.Dataset.zip((ds, counter))

        def _aug(pair, s):
            img, tgt = pair
            if is_map:
                return augment_pair(img, tgt, aug, s)
            dummy = tf.zeros(tf.shape(img)[:2], tf.uint8)
            out, _ = augment_pair(img, dummy, aug, s)
            return out, tgt

        ds = ds.map(_aug, num_parallel_calls=1)

    def _norm(img, tgt):
        x = tf.numpy_function(lambda t: normalize(t, normalization), [img], tf.float32)
        x.set_shape(img.shape)
        if n_classes is not None:
            tgt = tf.one_hot(tf.cast(tgt, tf.int32), n_classes)  # 255 -> all zeros
        return x, tgt

    return ds.map(_norm, num_parallel_calls=1).batch(batch_size).prefetch(1)
