"""Attention-MIL training (issue 13 item 7): a slide label carried by a few blobs of tissue, every
slide embedded once by a frozen encoder and cached, ABMIL heads trained on the cached bags.

The expensive part of MIL training is decoding and encoding the slides, so a second run must do
neither: the cache is keyed by the encoder file's SHA-256 and the slide's identity and tile
geometry.  These tests count what the second run decodes and encodes: nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glio_node.synthetic.slide import SlideSpec, layout_for, render_patch
from glio_node.synthetic.textures import Signature, signature_mask
from training import mil
from training.mil import Encoder, MilConfig, embed_slides, sample_bags
from training.mil_bundle import write_mil_bundle
from training.mil_run import SplitConfig, build_encoder, train_mil
from training.synthetic_dataset import SyntheticParameters, write_synthetic_dataset
from training.tiles import TileSpec
from training.dataset import load_dataset

SPEC = TileSpec(1.0, 32)
SMALL = MilConfig(bag_size=16, bags_per_slide=2, epochs=3, patience=2, hidden=16, attention_dim=8)


@pytest.fixture(scope="module")
def minority_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("minority")
    params = SyntheticParameters(patients=12, seed=3, width_px=512, height_px=384, levels=1, minority_fraction=0.15)
    return write_synthetic_dataset(root / "dataset", params=params, workers=1)


@pytest.fixture(scope="module")
def encoder_dir(minority_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder")
    build_encoder(minority_dataset, out, "egfr", SPEC, SplitConfig(), epochs=1)
    return out


def test_the_signature_shows_in_blobs_covering_the_asked_fraction_and_nowhere_else():
    y, x = np.mgrid[0:2000, 0:2000].astype(np.float32)
    mask = signature_mask(x, y, 0.15, 48.0, seed=5)
    assert 0.10 < mask.mean() < 0.20
    assert signature_mask(x, y, 1.0, 48.0, seed=5).all()
    with pytest.raises(ValueError, match="signature fraction 0 must be in"):
        signature_mask(x, y, 0, 48.0, seed=5)
    # An EGFR-amplified and a not-amplified slide differ only inside the EGFR blobs.
    base = SlideSpec(width_px=512, height_px=512, levels=1, context_images=False, seed=11, signature_fraction=0.15)
    amplified = SlideSpec(**{**base.__dict__, "signature": Signature(0, False, True)})
    layout = layout_for(base)
    a = render_patch(amplified, layout, 0, 0, 0, 512, 512).astype(int)
    b = render_patch(base, layout, 0, 0, 0, 512, 512).astype(int)
    differs = np.abs(a - b).sum(axis=-1) > 0
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float32)
    blobs = signature_mask((xx + 0.5) * 0.5, (yy + 0.5) * 0.5, 0.15, 48.0, seed=11 + 1)
    assert differs.any() and not (differs & ~blobs).any()


def test_bags_are_sampled_to_a_fixed_size_repeating_tiles_only_for_small_slides():
    rng = np.random.default_rng(0)
    big, small = np.arange(100, dtype=np.float16).reshape(50, 2), np.arange(6, dtype=np.float16).reshape(3, 2)
    x, owner = sample_bags([big, small], bag_size=8, per_slide=3, rng=rng)
    assert x.shape == (6, 8, 2) and x.dtype == np.float32 and owner.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(len({tuple(r) for r in bag}) == 8 for bag in x[:3])  # distinct tiles from the big slide


def test_a_second_run_decodes_and_encodes_nothing_and_another_encoder_re_encodes(minority_dataset, encoder_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = train_mil(minority_dataset, encoder_dir / "encoder.keras", ("egfr",), tmp_path / "run1", SPEC, cache, config=SMALL)
    x = first["extraction"]
    assert x["slides_encoded"] == 12 and x["slides_cached"] == 0
    assert x["frames_decoded"] > 0 and x["encoder_calls"] > 0

    opened = []
    real_extract = mil.extract_slide
    monkeypatch.setattr(mil, "extract_slide", lambda *a: opened.append(a[0].slide_id) or real_extract(*a))
    second = train_mil(minority_dataset, encoder_dir / "encoder.keras", ("egfr",), tmp_path / "run2", SPEC, cache, config=SMALL)
    assert second["extraction"] == {"slides_cached": 12, "slides_encoded": 0, "frames_decoded": 0, "encoder_calls": 0,
                                    "tiles": x["tiles"]}
    assert opened == []  # no slide even opened
    assert json.loads((tmp_path / "run2" / "metrics.json").read_text())["extraction"]["encoder_calls"] == 0

    # Another encoder file (other weights, so another SHA-256): new cache entries, every slide encoded again.
    records = load_dataset(minority_dataset)
    other = tmp_path / "other.keras"
    other.write_bytes((encoder_dir / "encoder.keras").read_bytes())
    import keras

    model = keras.saving.load_model(other, safe_mode=True, compile=False)
    model.set_weights([w * 0.5 for w in model.get_weights()])
    model.save(other)
    _, stats = embed_slides(records, SPEC, Encoder(other), minority_dataset, cache)
    assert stats.slides_encoded == 12 and stats.encoder_calls > 0
    assert sorted(opened) == sorted(r.slide_id for r in records)


def test_mil_training_writes_heads_attention_over_each_test_slides_tiles_and_test_scores_with_intervals_and_a_bundle_that_verifies(
    minority_dataset, encoder_dir, tmp_path
):
    m = train_mil(minority_dataset, encoder_dir / "encoder.keras", ("egfr",), tmp_path / "run", SPEC, tmp_path / "cache", config=SMALL)
    t = m["tasks"]["egfr"]
    assert 1 <= t["best_epoch"] <= SMALL.epochs and [h["epoch"] for h in t["history"]][0] == 1
    lo, hi = t["test"]["roc_auc_ci"]
    assert 0 <= lo <= t["test"]["roc_auc"] <= hi <= 1
    assert t["test"]["patients"] == len(m["test_slides"])
    for slide in m["test_slides"]:
        with np.load(tmp_path / "run" / "attention" / f"{slide}-egfr.npz") as z:
            assert z["attention"].shape == (len(z["cells"]),)
            assert z["attention"].sum() == pytest.approx(1.0, abs=1e-4)
    import keras

    baseline = json.loads((encoder_dir / "baseline.json").read_text())
    head = keras.saving.load_model(tmp_path / "run" / "egfr.keras", safe_mode=True)
    assert head.input_shape[-1] == baseline["embed_dim"]
    assert baseline["test_slides"] == m["test_slides"]  # the same test patients as the baseline

    # The bundle: the encoder byte for byte (the SHA-256 the cache was keyed by), the ABMIL head as
    # an aggregator reading it, the demo bundle's segmentation network; `glio-node models verify` loads it.
    bundle = tmp_path / "minority-mil"
    licence = tmp_path / "LICENCE.txt"
    licence.write_text("Apache License 2.0\n\nthe text the encoder came with\n")
    with pytest.raises(ValueError, match="give both --licence and --source"):
        write_mil_bundle(bundle, tmp_path / "run", m, name="minority-mil", licence=licence)
    manifest = write_mil_bundle(bundle, tmp_path / "run", m, name="minority-mil", segmentation_from=Path("models/glio-demo"),
                                licence=licence, source="a site's own encoder, copied from a USB stick")
    encoder = next(n for n in manifest.networks if n.kind == "encoder")
    assert (encoder.origin.source, encoder.origin.licence_name) == ("a site's own encoder, copied from a USB stick", "Apache License 2.0")
    assert (bundle / encoder.origin.licence_file).read_text() == licence.read_text()
    kinds = {n.name: (n.kind, n.runtime) for n in manifest.networks}
    assert kinds == {"encoder": ("encoder", "keras"), "egfr-abmil": ("aggregator", "keras"), "regions": ("tiles", "keras")}
    assert manifest.network_for("egfr").encoder == "encoder" and manifest.network_for("egfr").embed_dim == baseline["embed_dim"]
    assert encoder.sha256 == m["encoder"]["sha256"]
    assert manifest.is_demo and manifest.validation["test_egfr_slide_roc_auc_ci_high"] == hi
    done = subprocess.run([sys.executable, "-m", "glio_node.cli", "models", "verify", str(bundle)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok          minority-mil 0.1.0" in done.stdout
    assert re.search(r"network +egfr-abmil: .*egfr-abmil\.keras, tasks egfr", done.stdout), done.stdout
    assert "regions     regions (a SEG of its 10 classes is written)" in done.stdout


def test_an_encoder_that_is_neither_keras_nor_onnx_is_refused(tmp_path):
    bad = tmp_path / "encoder.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"must end in \.keras or \.onnx"):
        Encoder(bad)
    with pytest.raises(FileNotFoundError, match="build one with `python -m training encoder`"):
        Encoder(tmp_path / "missing.onnx")
