"""An aggregator head that is an ONNX graph with a dynamic bag dimension: written into a bundle
beside a Keras encoder, loaded with its signature checked (a graph with a fixed bag is refused in
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


def _spec():
    head = two_stage.aggregator_spec("egfr").heads[0]
    return replace(
        two_stage.aggregator_spec("egfr"), runtime="onnx", file="egfr-abmil.onnx",
        input=TensorSpec("embeddings", (1, "bag", D), "float32"),
        attention=TensorSpec("attention", (1, "bag"), "float32"),
        heads=(replace(head, output=TensorSpec("probabilities", (1, 2), "float32")),),
    )


def _write(tmp_path, graph: onnx.ModelProto):
    path = tmp_path / "egfr.onnx"
    onnx.save(graph, path)
    networks = (two_stage.seg_spec(), two_stage.encoder_spec(), _spec())
    models = {"regions": two_stage.seg_model(), "encoder": two_stage.build_encoder(), "egfr-abmil": path}
    return write_bundle(tmp_path / "b", two_stage.manifest(*networks), models)


def test_an_onnx_aggregator_runs_on_bags_of_any_size(tmp_path):
    _write(tmp_path, og.attention_graph(D, 2))
    [head] = bundle_aggregators(load_bundle(tmp_path / "b", "cpu"))
    assert (head.task, head.encoder) == ("egfr", "encoder")
    for n in (1, 7, 500):
        bag = np.random.default_rng(n).standard_normal((n, D)).astype(np.float16)
        probabilities, attention = head.predict_bag(bag)
        p, a = og.attention_reference(bag.astype(np.float32), D, 2)
        assert probabilities.shape == (1, 2) and attention.shape == (1, n)
        np.testing.assert_allclose(probabilities[0], p, atol=1e-5)
        np.testing.assert_allclose(attention[0], a, atol=1e-5)


def test_an_onnx_aggregator_with_a_fixed_bag_is_refused_in_one_line(tmp_path):
    with pytest.raises(BundleError, match=r"network 'egfr-abmil' \(egfr-abmil.onnx\): the ONNX graph's signature does not "
                       r"match the manifest: expected inputs \[embeddings float32\[1, bag, 32\]\].*found inputs "
                       r"\[embeddings float32\[1, 100, 32\]\]"):
        _write(tmp_path, og.attention_graph(D, 2, bag=100))
