"""Losses of the method (shared/seeds/000): cross-entropies, weighted cross-entropy, Dice, generalised Dice.

Backend-agnostic Keras 3 (keras.ops only) so that a GPU machine may train with JAX.  Every loss
takes one-hot (or soft) targets ``y_true`` and probabilities ``y_pred`` with classes on the last
axis, and returns one value per sample (Keras averages over the batch).  tests/unit/
test_training_losses.py checks each against a NumPy reference.
"""

from __future__ import annotations

from collections.abc import Sequence

from keras import ops

EPSILON = 1e-7
SMOOTH = 1e-5  # keeps Dice defined for a class absent from both target and prediction


def _spatial_axes(y) -> list[int]:
    return list(range(1, len(y.shape) - 1))


def _per_sample_mean(x):
    axes = list(range(1, len(x.shape)))
    return ops.mean(x, axis=axes) if axes else x


def categorical_crossentropy(y_true, y_pred):
    """-sum_c t_c log p_c, averaged over pixels (for a segmentation map) per sample."""
    p = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
    return _per_sample_mean(-ops.sum(y_true * ops.log(p), axis=-1))


def binary_crossentropy(y_true, y_pred):
    """-(t log p + (1-t) log(1-p)), averaged over the last axis and pixels per sample."""
    p = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
    return _per_sample_mean(-(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p)))


def weighted_categorical_crossentropy(class_weights: Sequence[float]):
    """Categorical cross-entropy with class ``c``'s term multiplied by ``class_weights[c]``.

    For rare regions (microvascular proliferation covers a sliver of a slide) so that they are not
    drowned by cellular tumour.
    """
    w = ops.convert_to_tensor([float(x) for x in class_weights], dtype="float32")

    def loss(y_true, y_pred):
        p = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
        return _per_sample_mean(-ops.sum(w * y_true * ops.log(p), axis=-1))

    loss.__name__ = "weighted_categorical_crossentropy"
    return loss


def dice_loss(y_true, y_pred):
    """1 - mean over classes of soft Dice (2|T∩P| + s) / (|T| + |P| + s), per sample."""
    axes = _spatial_axes(y_true)
    inter = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - ops.mean((2.0 * inter + SMOOTH) / (total + SMOOTH), axis=-1)


def generalized_dice_loss(y_true, y_pred):
    """Generalised Dice (Sudre et al. 2017): class weights 1 / (sum of target)^2, per sample."""
    axes = _spatial_axes(y_true)
    ref = ops.sum(y_true, axis=axes)
    w = 1.0 / ops.maximum(ref * ref, EPSILON)
    # A class absent from the target would get weight 1/eps and dominate; give it none.
    w = ops.where(ref > 0, w, ops.zeros_like(w))
    inter = ops.sum(w * ops.sum(y_true * y_pred, axis=axes), axis=-1)
    union = ops.sum(w * (ref + ops.sum(y_pred, axis=axes)), axis=-1)
    return 1.0 - (2.0 * inter + SMOOTH) / (union + SMOOTH)


LOSSES = {
    "categorical_crossentropy": categorical_crossentropy,
    "binary_crossentropy": binary_crossentropy,
    "dice": dice_loss,
    "generalized_dice": generalized_dice_loss,
}


def get_loss(name: str, class_weights: Sequence[float] | None = None):
    """The loss called ``name`` in a run config ("weighted_categorical_crossentropy" needs weights)."""
    if name == "weighted_categorical_crossentropy":
        if class_weights is None or len(class_weights) == 0:
            raise ValueError("weighted_categorical_crossentropy needs class_weights in the run config")
        return weighted_categorical_crossentropy(class_weights)
    if name not in LOSSES:
        raise ValueError(f"loss {name!r} is not one of {sorted(LOSSES) + ['weighted_categorical_crossentropy']}")
    return LOSSES[name]


