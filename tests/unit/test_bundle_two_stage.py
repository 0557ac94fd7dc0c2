"""Two-stage bundles (an encoder and attention-MIL aggregator heads, some with k folds): the
manifest says what each network is, is refused when it does not hold together, and round-trips
through write_bundle / load_bundle with every fold hashed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from glio_node import bundle
from glio_node.bundle import TensorSpec, WeightsFile, load_bundle, load_manifest
from glio_node.errors import BundleError
from tests import two_stage


def test_a_two_stage_bundle_with_fold_models_round_trips_and_hashes_every_fold(tmp_path):
    out = tmp_path / "b"
    written = two_stage.write_two_stage_bundle(out, fold_models=two_stage.disagreeing_folds(), max_fold_spread=0.25)
    egfr = written.network_for("egfr")
    assert egfr.kind == "aggregator" and egfr.encoder == "encoder" and len(egfr.folds) == 2
    assert egfr.head("egfr").max_fold_spread == 0.25
    assert all(w.sha256 == bundle.sha256_file(out / w.file) for w in egfr.folds)
    assert load_manifest(out) == written
    loaded = load_bundle(out)
    folds = next(n for n in loaded.networks if n.spec.name == "egfr-abmil").model
    assert len(folds) == 2
    bag = np.random.default_rng(0).random((1, 7, two_stage.EMBED_DIM), dtype=np.float32)
    p0, p1 = (f.predict(bag, verbose=0)["probabilities"][0] for f in folds)
    assert p0.argmax() == 0 and p1.argmax() == 1  # the two folds really are the two models written
    # outputs name the stain normalisation of each network that reads tiles; the aggregator reads embeddings
    assert [n for n, _ in loaded.algorithm.normalizations] == [
        n.name for n in written.networks if n.kind != "aggregator"
    ]


def test_a_changed_fold_file_is_refused_before_keras_reads_it(tmp_path):
    out = tmp_path / "b"
    two_stage.write_two_stage_bundle(out, fold_models=two_stage.agreeing_folds())
    with open(out / "egfr-abmil-fold1.keras", "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match=r"weights file egfr-abmil-fold1.keras .* fails its SHA-256 check"):
        bundle.verify_bundle(out)


def _networks():
    return [two_stage.seg_spec(), two_stage.encoder_spec(), two_stage.aggregator_spec("egfr")]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda n: n.__setitem__(2, replace(n[2], encoder="uni")), r"aggregator 'egfr-abmil' reads encoder 'uni', but the bundle's encoders are \['encoder'\]"),
        (lambda n: n.__setitem__(2, replace(n[2], embed_dim=64)), r"reads embed_dim 64, but encoder 'encoder' gives 32"),
        (lambda n: n.pop(2), r"encoder\(s\) \['encoder'\] are read by no aggregator"),
    ],
)
def test_a_bundle_whose_stages_do_not_fit_together_is_refused(change, message):
    networks = _networks()
    change(networks)
    with pytest.raises(BundleError, match=message):
        two_stage.manifest(*networks)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: replace(two_stage.encoder_spec(), overlap=16), r"overlap 16 px must be 0 for an encoder"),
        (lambda: replace(two_stage.encoder_spec(), embed_dim=None), r"an encoder network needs embed_dim"),
        (lambda: replace(two_stage.encoder_spec(), heads=two_stage.aggregator_spec("egfr").heads), r"an encoder has no heads"),
        (lambda: replace(two_stage.aggregator_spec("egfr"), tile_size=32), r"an aggregator has no tile geometry"),
        (lambda: replace(two_stage.aggregator_spec("egfr"), encoder=None), r"an aggregator must name the encoder it reads"),
        (
            lambda: replace(two_stage.aggregator_spec("egfr"), heads=two_stage.seg_spec().heads),
            r"an aggregator has exactly one slide-level head",
        ),
        (
            lambda: replace(two_stage.aggregator_spec("egfr"), heads=(replace(two_stage.aggregator_spec("egfr").heads[0], max_fold_spread=0.2),)),
            r"max_fold_spread 0.2 applies to heads with 2 or more folds",
        ),
        (
            lambda: replace(two_stage.aggregator_spec("egfr"), folds=(WeightsFile("egfr-abmil.keras", None),)),
            r"folds are for aggregator networks with 2 or more fold models",
        ),
        (
            lambda: replace(two_stage.encoder_spec("onnx"), output=TensorSpec("embeddings", ("batch", 16), "float32")),
            r"an onnx encoder must declare its graph output of shape \['batch', 32\]",
        ),
        (
            lambda: replace(
                two_stage.aggregator_spec("egfr"), runtime="onnx", file="egfr.onnx",
                input=TensorSpec("embeddings", (1, 100, 32), "float32"),
                attention=TensorSpec("attention", (1, "bag"), "float32"),
            ),
            r"an onnx aggregator must declare its graph input of shape \[1, 'bag', 32\]",
        ),
    ],
)
def test_encoder_and_aggregator_records_check_themselves(build, message):
    with pytest.raises(BundleError, match=message):
        build()


def test_an_onnx_aggregator_with_a_dynamic_bag_is_accepted():
    head = two_stage.aggregator_spec("egfr").heads[0]
    spec = replace(
        two_stage.aggregator_spec("egfr"), runtime="onnx", file="egfr.onnx",
        input=TensorSpec("embeddings", (1, "bag", 32), "float32"),
        attention=TensorSpec("attention", (1, "bag"), "float32"),
        heads=(replace(head, output=TensorSpec("probabilities", (1, 2), "float32")),),
    )
    assert [str(t) for t in spec.signature()[1]] == ["probabilities float32[1, 2]", "attention float32[1, bag]"]


def test_write_bundle_wants_one_model_per_fold(tmp_path):
    networks = _networks()
    networks[2] = two_stage.aggregator_spec("egfr", folds=2)
    models = {"regions": two_stage.seg_model(), "encoder": two_stage.build_encoder(), "egfr-abmil": [two_stage.build_head(2, 1)]}
    with pytest.raises(BundleError, match=r"network 'egfr-abmil' has 2 weights file\(s\)"):
        bundle.write_bundle(tmp_path / "b", two_stage.manifest(*networks), models)


def test_a_keras_encoder_with_the_wrong_embedding_size_is_refused(tmp_path):
    models = {"regions": two_stage.seg_model(), "encoder": two_stage.build_encoder(embed_dim=16), "egfr-abmil": two_stage.build_head(2, 1)}
    with pytest.raises(BundleError, match=r"an encoder must map \(None, 32, 32, 3\) -> \(None, 32\)"):
        bundle.write_bundle(tmp_path / "b", two_stage.manifest(*_networks()), models)
