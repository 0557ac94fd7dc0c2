"""An aggregator head that is an ONNX graph with a dynamic bag dimension, batched ([1, bag, D], as
STAMP exports) or bag-only ([bag, D] -> [C], [bag], as TRIDENT-style heads): written into a bundle
beside a Keras encoder (and no segmentation network), loaded with its signature checked (a graph with a fixed bag is refused in
one line), and run on a bag by runtime.bag_runner.Aggregator as NumPy says it must."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest

import onnx_graphs as og
from glio_node.bundle import TensorSpec, load_bundle, write_bundle
from glio_node.errors import BundleError
from glio_node.runtime.runners import bundle_aggregators
from tests import two_stage

D = two_stage.EMBED_DIM


def _spec(batched: bool = True):
    """The egfr head as an ONNX graph of the batched ([1, bag, D]) or the bag-only ([bag, D]) form."""
    return two_stage.onnx_aggregator_spec("egfr", batched=batched)


def _write(tmp_path, graph: onnx.ModelProto, batched: bool = True):
    path = tmp_path / "egfr.onnx"
    onnx.save(graph, path)
    networks = (two_stage.encoder_spec(), _spec(batched))  # no segmentation network: none is needed
    models = {"encoder": two_stage.build_encoder(), "egfr-abmil": path}
    return write_bundle(tmp_path / "b", two_stage.manifest(*networks), models)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "bag-only"])
def test_an_onnx_aggregator_runs_on_bags_of_any_size(tmp_path, batched):
    _write(tmp_path, og.attention_graph(D, 2) if batched else og.bag_attention_graph(D, 2), batched)
    [head] = bundle_aggregators(load_bundle(tmp_path / "b", "cpu"))
    assert (head.task, head.encoder) == ("egfr", "encoder")
    for n in (1, 7, 500):
        bag = np.random.default_rng(n).standard_normal((n, D)).astype(np.float16)
        probabilities, attention = head.predict_bag(bag)
        p, a = og.attention_reference(bag.astype(np.float32), D, 2)
        assert probabilities.shape == (1, 2) and attention.shape == (1, n)  # one row per fold
        np.testing.assert_allclose(probabilities[0], p, atol=1e-5)
        np.testing.assert_allclose(attention[0], a, atol=1e-5)


def test_a_bag_only_aggregator_with_batched_outputs_is_refused_in_one_line():
    spec = _spec(batched=False)
    with pytest.raises(BundleError, match=r"an onnx aggregator must declare its graph head output of shape \[2\] "
                       r"\(the bag dynamic\), as the input \['bag', 32\] has no slide dimension"):
        replace(spec, heads=(replace(spec.heads[0], output=TensorSpec("probabilities", (1, 2), "float32")),))


def test_an_onnx_aggregator_with_a_fixed_bag_is_refused_in_one_line(tmp_path):
    with pytest.raises(BundleError, match=r"network 'egfr-abmil' \(egfr-abmil.onnx\): the ONNX graph's signature does not "
                       r"match the manifest: expected inputs \[embeddings float32\[1, bag, 32\]\].*found inputs "
                       r"\[embeddings float32\[1, 100, 32\]\]"):
        _write(tmp_path, og.attention_graph(D, 2, bag=100))
