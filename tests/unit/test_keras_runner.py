"""The networks run as one device function: uint8 tiles in, class indices and probabilities out.

What a GPU site needs of the runner, checked on the CPU with the shipped demo bundle: the
normalisation and the segmentation argmax moved into the graph change no answer; a mixed-precision
mode changes answers only at the margin and is named in every output; the batch size is 8 on a
CPU unless the operator says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from glio_node.bundle import load_bundle, normalize
from glio_node.errors import BadInput
from glio_node.job import load_keras_models
from glio_node.runtime.keras_runner import KerasNetwork, choose_batch_size, select_device
from glio_node.testing import FAKE_ALGORITHM
from glio_node.writers.common import algorithm_parameters

DEMO = Path(__file__).resolve().parents[2] / "models" / "glio-demo"


@pytest.fixture(scope="module")
def bundle():
    select_device("cpu")
    return load_bundle(DEMO)


def _tiles(network, n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (n, network.spec.tile_size, network.spec.tile_size, 3), dtype=np.uint8)


def test_in_graph_normalisation_and_argmax_give_the_models_own_answers(bundle):
    for loaded in bundle.networks:
        tiles = _tiles(loaded)
        got = KerasNetwork(loaded, batch_size=8).predict(tiles)  # 5 tiles: a padded last batch
        want = loaded.model.predict_on_batch(normalize(tiles, loaded.spec.normalization))
        for task, value in want.items():
            value = np.asarray(value)
            if task == "segmentation":
                assert got[task].dtype == np.uint8 and got[task].shape == value.shape[:-1]
                np.testing.assert_array_equal(got[task], value.argmax(axis=-1))
            else:
                assert got[task].dtype == np.float32
                np.testing.assert_allclose(got[task], value, atol=1e-5)


def test_bfloat16_compute_keeps_float32_outputs_and_nearly_every_answer(bundle):
    for loaded in bundle.networks:
        tiles = _tiles(loaded)
        exact = KerasNetwork(loaded, 8).predict(tiles)
        mixed = KerasNetwork(loaded, 8, precision="bfloat16").predict(tiles)
        for task, value in exact.items():
            if task == "segmentation":
                assert (mixed[task] == value).mean() >= 0.99
            else:
                assert mixed[task].dtype == np.float32
                np.testing.assert_allclose(mixed[task].sum(axis=-1), 1.0, atol=1e-3)
                np.testing.assert_allclose(mixed[task], value, atol=0.05)


def test_an_unknown_precision_is_refused_with_the_allowed_ones(bundle):
    with pytest.raises(BadInput, match=r"precision 'int8' is not one of float32, bfloat16, float16"):
        KerasNetwork(bundle.networks[0], 8, precision="int8")


def test_the_precision_is_named_in_the_outputs_algorithm_parameters(bundle):
    models = load_keras_models(DEMO, "cpu", 8, None, precision="bfloat16")
    assert models.algorithm.precision == "bfloat16"
    assert {n.precision for n in models.runners} == {"bfloat16"}
    assert algorithm_parameters(models.algorithm)["precision"] == "bfloat16"
    assert algorithm_parameters(FAKE_ALGORITHM)["precision"] == "float32"


def test_on_a_cpu_the_batch_size_left_open_is_eight(bundle):
    assert choose_batch_size(bundle, "cpu") == 8
    models = load_keras_models(DEMO, "cpu", 0, None)
    assert models.batch_size == 8 and {n.batch_size for n in models.runners} == {8}
