"""Calibration as the worker applies it: temperature scaling of slide probabilities, recorded
in the bundle's head and in every call."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from glio_node import coding
from glio_node.bundle import HeadSpec, Manifest, NetworkSpec, load_manifest, manifest_to_toml
from glio_node.errors import BundleError
from glio_node.pipeline.calibration import calibrate
from glio_node.pipeline.stitch import slide_call

SHA = "0" * 64


def test_temperature_one_leaves_the_probabilities_as_they_are():
    p = np.random.default_rng(0).dirichlet(np.ones(4), size=20)
    np.testing.assert_array_equal(calibrate(p, 1.0), p)


def test_temperature_scaling_is_a_softmax_of_scaled_log_probabilities():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    scaled = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(-1, keepdims=True)
    np.testing.assert_allclose(calibrate(p, 2.0), scaled, rtol=1e-12)
    assert (calibrate(p, 2.0).max(-1) < p.max(-1)).all(), "T > 1 softens"
    assert (calibrate(p, 0.5).max(-1) > p.max(-1)).all(), "T < 1 sharpens"
    assert (calibrate(p, 3.0).argmax(-1) == p.argmax(-1)).all(), "the called class never changes"


def test_zero_and_nan_rows_survive_calibration():
    out = calibrate(np.array([[0.0, 1.0], [np.nan, np.nan]]), 1.5)
    np.testing.assert_array_equal(out[0], [0.0, 1.0])
    assert np.isnan(out[1]).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_a_temperature_that_is_not_positive_and_finite_is_refused(bad):
    with pytest.raises(ValueError, match="must be a finite number greater than 0"):
        calibrate(np.array([0.5, 0.5]), bad)


def test_a_calibrated_call_thresholds_the_calibrated_probabilities():
    mean = np.array([0.3, 0.7])
    raw = slide_call("mgmt", coding.MGMT_CLASSES, mean, threshold=0.65)
    assert raw.call == coding.MGMT_CLASSES[1] and not raw.calibrated
    softened = slide_call("mgmt", coding.MGMT_CLASSES, mean, threshold=0.65, temperature=2.0)
    assert softened.calibrated and softened.temperature == 2.0
    assert softened.probabilities == pytest.approx(tuple(calibrate(mean, 2.0)))
    assert softened.probabilities[1] < 0.65 and softened.call is None, "0.7 softened to 0.60: indeterminate"
    nothing = slide_call("mgmt", coding.MGMT_CLASSES, None, threshold=0.65, temperature=2.0)
    assert nothing.call is None and nothing.calibrated


def _manifest(fmt: int, temperature: float | None) -> Manifest:
    heads = (HeadSpec("mgmt", coding.MGMT_CLASSES, indeterminate_below=0.6, temperature=temperature),)
    runtime = {"runtime": "keras"} if fmt >= 2 else {}
    return Manifest(
        name="tiny", version="1.0.0", uid="2.25.99", intended_use="DEMO test bundle. Research use only.",
        is_demo=True, provenance="test_calibration.py", created=datetime(2026, 12, 6, tzinfo=timezone.utc),
        networks=(NetworkSpec("cls", "cls.keras", SHA, 32, 0.5, 0, "scale_0_1", heads, **runtime),),
        format=fmt,
    )


def _written(tmp_path, manifest: Manifest):
    (tmp_path / "cls.keras").write_bytes(b"")
    (tmp_path / "manifest.toml").write_text(manifest_to_toml(manifest))
    return load_manifest(tmp_path)


def test_a_format_2_head_carries_its_temperature_through_the_manifest(tmp_path):
    read = _written(tmp_path, _manifest(2, 1.7))
    assert read.networks[0].head("mgmt").temperature == 1.7
    assert "temperature = 1.7" in (tmp_path / "manifest.toml").read_text()


def test_a_head_without_temperature_and_every_format_1_head_is_not_calibrated(tmp_path):
    assert _written(tmp_path, _manifest(1, None)).networks[0].head("mgmt").temperature is None
    assert "temperature" not in (tmp_path / "manifest.toml").read_text()
    with pytest.raises(BundleError, match="format 1 heads have no temperature"):
        _manifest(1, 1.7)
    text = manifest_to_toml(_manifest(1, None)).replace("indeterminate_below = 0.6", "indeterminate_below = 0.6\ntemperature = 1.7")
    (tmp_path / "manifest.toml").write_text(text)
    with pytest.raises(BundleError, match="temperature"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("bad", [0.0, -2.0, True])
def test_a_bad_temperature_is_named(bad):
    with pytest.raises(BundleError, match=r"head 'mgmt': temperature .* must be a finite number greater than 0"):
        HeadSpec("mgmt", coding.MGMT_CLASSES, temperature=bad)


def test_segmentation_heads_take_no_temperature():
    with pytest.raises(BundleError, match="applies to classifier heads only"):
        HeadSpec("segmentation", coding.REGION_CLASSES, temperature=1.2)
    assert HeadSpec("segmentation", coding.REGION_CLASSES).temperature is None
