"""Shapes, output keys and sizes of the bundle network architectures."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before keras pulls in TensorFlow

import numpy as np
import pytest

from glio_node.runtime.networks import build_classifier, build_unet


def test_unet_outputs_a_softmax_map_keyed_segmentation():
    model = build_unet(64, 5, depth=3, base_filters=4)
    out = model.predict(np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32), verbose=0)
    assert set(out) == {"segmentation"}
    assert out["segmentation"].shape == (2, 64, 64, 5)
    np.testing.assert_allclose(out["segmentation"].sum(-1), 1.0, rtol=1e-4)
    assert model.name == "regions"


def test_classic_unet_has_about_31_million_parameters():
    model = build_unet(320, 2, depth=5, base_filters=64)
    assert 30.5e6 < model.count_params() < 31.5e6
    assert tuple(model.output["segmentation"].shape) == (None, 320, 320, 2)


def test_demo_unet_is_small():
    assert build_unet(320, 10, depth=3, base_filters=8).count_params() < 50_000


def test_unet_refuses_a_tile_the_pooling_cannot_halve():
    with pytest.raises(ValueError, match=r"tile_size 100 px must be divisible by 16"):
        build_unet(100, 3, depth=5)


def test_classifier_has_one_softmax_head_per_task():
    heads = {"subtype": 4, "mgmt": 2, "egfr": 2}
    model = build_classifier(32, heads, base_filters=4, blocks=3)
    out = model.predict(np.zeros((3, 32, 32, 3), np.float32), verbose=0)
    assert {k: v.shape for k, v in out.items()} == {"subtype": (3, 4), "mgmt": (3, 2), "egfr": (3, 2)}
    for v in out.values():
        np.testing.assert_allclose(v.sum(-1), 1.0, rtol=1e-4)
    assert model.name == "molecular"


def test_classic_vgg16_backbone_shape():
    model = build_classifier(224, {"subtype": 4}, base_filters=64, blocks=5, batch_norm=False)
    convs = [layer for layer in model.layers if layer.name.endswith("_conv")]
    assert len(convs) == 13  # VGG16: 13 convolutions
    assert [c.filters for c in convs][-1] == 512
    assert 14.7e6 < model.count_params() < 14.8e6  # VGG16 without its dense top: 14.71 M


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads": {}}, "at least one head"),
        ({"heads": {"mgmt": 1}}, r"head 'mgmt' needs an integer number of classes >= 2, got 1"),
        ({"heads": {"Bad Name": 2}}, "lower-case identifier"),
        ({"heads": {"mgmt": 2}, "blocks": 6}, r"blocks must be 1\.\.5"),
    ],
)
def test_classifier_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_classifier(64, **kwargs)
