"""VGG16 smoke test: builds, loads a local weights file, one frozen step, one fine-tune step."""

from __future__ import annotations

import numpy as np
import pytest

from training.networks import build_vgg16_classifier, set_trainable

HEADS = {"subtype": 4, "mgmt": 2, "egfr": 2}


def _backbone_weights(model):
    return [w.copy() for w in model.get_layer("vgg16").get_weights()]


def test_vgg16_multi_head_loads_local_weights_and_trains_frozen_then_fine_tuned(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    donor = build_vgg16_classifier(32, {"subtype": 4})
    weights = tmp_path / "vgg16_notop.weights.h5"
    donor.get_layer("vgg16").save_weights(weights)

    model = build_vgg16_classifier(32, HEADS, weights=weights)
    for a, b in zip(_backbone_weights(model), donor.get_layer("vgg16").get_weights()):
        np.testing.assert_array_equal(a, b)

    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype("float32")
    y = {t: keras.utils.to_categorical(np.arange(4) % n, n) for t, n in HEADS.items()}
    loss = {t: "categorical_crossentropy" for t in HEADS}

    set_trainable(model, "frozen")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    before = _backbone_weights(model)
    model.train_on_batch(x, y)
    assert all(np.array_equal(a, b) for a, b in zip(before, _backbone_weights(model)))

    set_trainable(model, "fine_tune", fine_tune_blocks=1)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    model.train_on_batch(x, y)
    after = dict(zip([w.path for w in model.get_layer("vgg16").weights], _backbone_weights(model)))
    changed = {p for p, a, b in zip(after, before, after.values()) if not np.array_equal(a, b)}
    assert changed and all("block5" in p for p in changed)
    out = model.predict(x, verbose=0)
    assert {t: out[t].shape for t in HEADS} == {"subtype": (4, 4), "mgmt": (4, 2), "egfr": (4, 2)}


def test_a_missing_weights_file_is_named():
    with pytest.raises(ValueError, match="weights file /nowhere.h5 does not exist"):
        build_vgg16_classifier(32, {"subtype": 4}, weights="/nowhere.h5")
