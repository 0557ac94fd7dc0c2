"""The out-of-distribution gate on numpy fakes: a slide like the training slides keeps its calls,
a slide unlike them gets every call "indeterminate (out of distribution)", and the reference
file is plain data (no pickle)."""

from __future__ import annotations

import numpy as np
import pytest

from glio_node.job import _calls
from glio_node.ood import (
    OodGate,
    OodReferenceError,
    fit_lower_threshold,
    fit_reference,
    fit_slide_threshold,
    load_reference,
    save_reference,
    slide_score,
    tile_scores,
)
from glio_node.pipeline.analyze import AnalysisOptions, analyze
from glio_node.testing import FAKE_ALGORITHM, FakeClassifier, FakeSegmenter, FakeSlide, colour_features, tissue_image

MM_PER_PX = 0.0005


def _training_features(seeds=range(4)) -> np.ndarray:
    """Colour features of the fake classifier's tiles, cut from slides like the ones analysed."""
    feats = []
    for seed in seeds:
        image, tissue = tissue_image(seed=seed)
        small = image[::4, ::4]  # 2 µm/px, the classifier's spacing
        inside = tissue[::4, ::4]
        for r in range(0, small.shape[0] - 32, 16):
            for c in range(0, small.shape[1] - 32, 16):
                if inside[r : r + 32, c : c + 32].mean() >= 0.5:
                    feats.append(colour_features(small[None, r : r + 32, c : c + 32])[0])
    return np.array(feats)


def test_a_training_like_tile_scores_about_one_and_a_shifted_one_far_more():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(12, 12))
    train = rng.normal(size=(500, 12)) @ mixing
    reference = fit_reference(train, components=4)
    inside = tile_scores(reference, rng.normal(size=(200, 12)) @ mixing)  # new tiles, same distribution
    assert 0.7 < float(np.median(inside)) < 1.3
    outside = tile_scores(reference, train[:200] + 10 * train.std(axis=0))
    assert float(np.median(outside)) > 5
    assert slide_score(np.array([[np.nan, 1.0], [2.0, 3.0]])) == 2.0
    assert slide_score(np.full((2, 2), np.nan)) is None


def test_the_slide_threshold_is_a_margin_times_a_quantile_of_the_validation_slides():
    assert fit_slide_threshold([1.0, 1.0, 2.0], quantile=1.0, margin=1.5) == pytest.approx(3.0)
    assert fit_lower_threshold([1.0, 2.0, 2.0], quantile=1.0, margin=2.0) == pytest.approx(0.5)
    with pytest.raises(OodReferenceError, match="no validation slide has a tile"):
        fit_slide_threshold([None])


def test_the_reference_round_trips_through_npz_and_a_pickled_file_is_refused(tmp_path):
    reference = fit_reference(np.random.default_rng(1).normal(size=(50, 6)), components=3)
    save_reference(reference, tmp_path / "ood.npz")
    back = load_reference(tmp_path / "ood.npz")
    np.testing.assert_array_equal(back.components, reference.components)
    assert back.residual_variance == reference.residual_variance

    np.savez(tmp_path / "bad.npz", mean=np.array([object()], dtype=object), components=reference.components,
             variances=reference.variances, residual_variance=np.array(1.0))
    with pytest.raises(OodReferenceError, match="not a readable .npz"):
        load_reference(tmp_path / "bad.npz")
    with pytest.raises(OodReferenceError, match="do not fit the OOD reference's 6 dimensions"):
        tile_scores(reference, np.zeros((2, 5)))


def _gate() -> OodGate:
    reference = fit_reference(_training_features(), components=4)
    validation = [slide_score(tile_scores(reference, _training_features([seed]))) for seed in (10, 11)]
    return OodGate("fake-mgmt", reference, fit_slide_threshold(validation))


def _analyse(image, gate):
    runners = (FakeSegmenter(), FakeClassifier(features=True, indeterminate_below=0.0))
    # QC off: the fake slide's 0.02 mm² of tissue fails slide QC, and its swapped-channel stain
    # reads as pen; both would withhold the calls before the gate is asked (tests/unit/test_qc.py).
    return analyze(FakeSlide(image, MM_PER_PX), runners, FAKE_ALGORITHM, AnalysisOptions(qc=None), ood=gate)[0]


def test_a_slide_like_the_training_slides_keeps_its_calls():
    gate = _gate()
    result = _analyse(tissue_image(seed=20)[0], gate)

    assert result.ood is not None and not result.ood.out_of_distribution
    assert result.ood.slide_score < gate.slide_threshold
    assert [c.call is not None and not c.out_of_distribution for c in result.calls] == [True]
    scores = result.ood.tile_scores.array
    assert np.isfinite(scores).sum() >= 3 and np.isnan(scores).any()  # glass tiles are not scored


def test_a_slide_unlike_them_gets_every_call_indeterminate_out_of_distribution():
    image, tissue = tissue_image(seed=20)
    image[tissue] = image[tissue][:, [1, 2, 0]]  # another stain: the channels swapped
    result = _analyse(image, _gate())

    assert result.ood.out_of_distribution and result.ood.slide_score > result.ood.slide_threshold
    assert all(c.call is None and c.out_of_distribution for c in result.calls)
    assert all(not np.isnan(p) for c in result.calls for p in c.probabilities)  # kept for the record
    assert _calls(result)[0] == {"mgmt": "indeterminate (out of distribution)"}
    assert any("out of distribution" in n for n in result.notes)


def test_the_manifests_ood_table_is_checked_on_construction():
    from dataclasses import replace
    from pathlib import Path

    from glio_node.bundle import BundleError, OodSpec, load_manifest

    shipped = load_manifest(Path(__file__).resolve().parents[2] / "models" / "glio-demo")
    demo = replace(shipped, ood=None)
    spec = OodSpec("molecular", "features", "ood-reference.npz", None, slide_threshold=2.0, slide_threshold_low=0.8)
    with pytest.raises(BundleError, match=r"\[ood\] needs manifest format 2"):
        replace(demo, format=1, networks=tuple(replace(n, heads=tuple(replace(h, temperature=None) for h in n.heads)) for n in demo.networks), ood=spec)
    with pytest.raises(BundleError, match=r"\[ood\] network 'encoder' is not a network of the bundle \(regions, molecular\)"):
        replace(demo, format=2, ood=replace(spec, network="encoder"))
    with pytest.raises(BundleError, match=r"\[ood\] file 'ood.pkl' must be a plain file name inside the bundle ending in .npz"):
        replace(spec, file="ood.pkl")
    with pytest.raises(BundleError, match=r"slide_threshold_low 3.0 must be a number from 0 up to slide_threshold 2.0"):
        replace(spec, slide_threshold_low=3.0)
    assert replace(demo, format=2, ood=spec).ood.slide_threshold == 2.0


def test_the_gate_is_two_sided():
    reference = fit_reference(np.random.default_rng(2).normal(size=(40, 4)), components=2)
    gate = OodGate("n", reference, slide_threshold=2.0, slide_threshold_low=0.5)
    assert [gate.is_out(s) for s in (0.4, 0.5, 1.0, 2.0, 2.1, None)] == [True, False, False, False, True, False]
