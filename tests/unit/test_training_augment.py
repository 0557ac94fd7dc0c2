"""Augmentation moves a tile and its labels together, recolours only the tile, and is reproducible."""

from __future__ import annotations

import numpy as np

from training.augment import Augmentation, augment_pair, make_dataset


def _coded_tile(size=32):
    """A tile whose red channel encodes each pixel's label, so alignment can be checked after
    any flip, rotation or crop."""
    labels = (np.arange(size * size).reshape(size, size) % 7).astype(np.uint8)
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = labels * 30
    image[..., 1] = 128
    return image, labels


def test_geometry_keeps_tile_and_labels_aligned_and_is_seeded():
    import tensorflow as tf

    image, labels = _coded_tile()
    aug = Augmentation(crop=24, brightness=0, contrast=0, saturation=0, hue=0)
    outs = set()
    for s in range(8):
        img, lab = augment_pair(image, labels, aug, tf.constant([1, s], tf.int64))
        img, lab = img.numpy(), lab.numpy()
        assert img.shape == (24, 24, 3) and lab.shape == (24, 24)
        np.testing.assert_array_equal(img[..., 0] // 30, lab)
        again, _ = augment_pair(image, labels, aug, tf.constant([1, s], tf.int64))
        np.testing.assert_array_equal(again.numpy(), img)
        outs.add(img.tobytes())
    assert len(outs) > 4  # seeds really vary the geometry


def test_colour_jitter_changes_the_tile_not_the_labels():
    import tensorflow as tf

    image, labels = _coded_tile()
    img, lab = augment_pair(image, labels, Augmentation(flips=False, rotations=False, brightness=0.2), tf.constant([0, 3], tf.int64))
    np.testing.assert_array_equal(lab.numpy(), labels)
    assert not np.array_equal(img.numpy(), image)


def test_batches_are_normalised_as_the_worker_does_and_unlabelled_pixels_count_for_nothing():
    image, labels = _coded_tile()
    labels = labels.copy()
    labels[0, 0] = 255
    ds = make_dataset(np.stack([image, image]), np.stack([labels, labels]), "scale_0_1", 2, seed=0, n_classes=7)
    x, y = next(iter(ds))
    np.testing.assert_allclose(x.numpy()[0], image / 255.0, atol=1e-6)
    assert y.shape == (2, 32, 32, 7) and y.numpy()[0, 0, 0].sum() == 0 and y.numpy()[0, 0, 1].sum() == 1
