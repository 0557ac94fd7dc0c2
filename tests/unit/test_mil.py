"""The reference ABMIL aggregator keeps the aggregator contract (glio_node/runtime/mil.py):
probabilities per slide, attention per tile summing to one, any bag size, saved and reloaded
with safe_mode on, and attention that finds the tiles that carry the label."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from glio_node.runtime.mil import ATTENTION, PROBABILITIES, build_abmil


def test_any_bag_size_gives_slide_probabilities_and_one_attention_weight_per_tile():
    model = build_abmil(embed_dim=16, n_classes=3)
    for n in (1, 7, 1000):
        out = model.predict_on_batch(np.random.default_rng(n).normal(size=(1, n, 16)).astype("float32"))
        assert out[PROBABILITIES].shape == (1, 3)
        assert out[ATTENTION].shape == (1, n)
        np.testing.assert_allclose(out[PROBABILITIES].sum(axis=-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(out[ATTENTION].sum(axis=-1), 1.0, rtol=1e-5)
        assert (out[ATTENTION] >= 0).all()


def test_a_saved_head_reloads_with_safe_mode_and_gives_the_same_outputs(tmp_path):
    model = build_abmil(embed_dim=8, n_classes=2)
    x = np.random.default_rng(0).normal(size=(2, 50, 8)).astype("float32")
    before = model.predict_on_batch(x)
    model.save(tmp_path / "head.keras")
    again = keras.saving.load_model(tmp_path / "head.keras", compile=False, safe_mode=True)
    after = again.predict_on_batch(x)
    for key in (PROBABILITIES, ATTENTION):
        np.testing.assert_allclose(after[key], before[key], atol=1e-6)


def test_trained_on_bags_where_a_few_tiles_carry_the_label_attention_goes_to_those_tiles():
    rng = np.random.default_rng(1)
    d, n, bags = 8, 40, 128
    x = rng.normal(size=(bags, n, d)).astype("float32")
    y = rng.integers(0, 2, size=bags)
    witnesses = np.zeros((bags, n), bool)
    for b in np.nonzero(y)[0]:  # a positive bag: 4 of its 40 tiles have a shifted first feature
        k = rng.choice(n, 4, replace=False)
        x[b, k, 0] += 4.0
        witnesses[b, k] = True
    keras.utils.set_random_seed(0)
    model = build_abmil(embed_dim=d, n_classes=2, hidden=16, attention_dim=8, dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={PROBABILITIES: "sparse_categorical_crossentropy"})
    model.fit(x, {PROBABILITIES: y}, epochs=30, batch_size=16, verbose=0)
    out = model.predict(x, verbose=0)
    assert (out[PROBABILITIES].argmax(-1) == y).mean() >= 0.95
    positive = np.nonzero(y)[0]
    on_witnesses = (out[ATTENTION][positive] * witnesses[positive]).sum(axis=1)
    assert on_witnesses.mean() > 0.5  # 4 of 40 tiles: 0.1 if attention were uniform


@pytest.mark.parametrize("bad", [dict(embed_dim=0, n_classes=2), dict(embed_dim=4, n_classes=1), dict(embed_dim=4, n_classes=2, dropout=1.0)])
def test_bad_sizes_are_refused_with_the_value(bad):
    with pytest.raises(ValueError, match=r"must be"):
        build_abmil(**bad)
