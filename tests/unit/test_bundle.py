"""The model bundle format: manifest checks, SHA-256 verification before loading, the shipped demo."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before keras pulls in TensorFlow

import hashlib
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from glio_node import bundle, coding
from glio_node.bundle import (
    HeadSpec,
    Manifest,
    NetworkSpec,
    load_bundle,
    load_manifest,
    normalize,
    verify_bundle,
    write_bundle,
)
from glio_node.errors import BundleError
from glio_node.results import CodedClass
from glio_node.synthetic import textures

DEMO = Path(__file__).resolve().parents[2] / "models" / "glio-demo"


@pytest.fixture(scope="module")
def demo():
    return load_bundle(DEMO)


@pytest.fixture
def demo_copy(tmp_path):
    """A private copy of the shipped bundle, safe to damage."""
    return Path(shutil.copytree(DEMO, tmp_path / "glio-demo"))


def _edit_manifest(folder: Path, old: str, new: str, count: int = 1) -> None:
    path = folder / "manifest.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, count))


# --- the shipped demo bundle -------------------------------------------------------------------------


def test_shipped_demo_bundle_verifies_and_says_it_is_a_demo():
    manifest = verify_bundle(DEMO)
    assert manifest.name == "glio-demo"
    assert manifest.is_demo
    assert "DEMO" in manifest.intended_use and "synthetic" in manifest.intended_use
    assert "synthetic" in manifest.provenance
    assert manifest.tasks == ("segmentation", "subtype", "mgmt", "egfr")
    assert manifest.created.tzinfo is not None


def test_shipped_demo_bundle_reports_good_held_out_metrics():
    """Measured by `python -m training train` on its test patients, which no choosing step saw
    (training/configs/glio-demo.toml; synthetic slides only)."""
    validation = load_manifest(DEMO).validation
    assert validation["test_regions_pixel_accuracy"] >= 0.9 and validation["test_regions_mean_dice"] >= 0.9
    for task in ("subtype", "mgmt", "egfr"):
        assert validation[f"test_{task}_tile_accuracy"] >= 0.95
        assert validation[f"test_{task}_slide_accuracy"] == 1.0


def test_shipped_demo_weights_are_small():
    assert sum(p.stat().st_size for p in DEMO.glob("*.keras")) < 2_000_000


def test_shipped_demo_classes_come_from_glio_node_coding():
    manifest = load_manifest(DEMO)
    for task, classes in coding.CLASSES_BY_TASK.items():
        assert manifest.network_for(task).head(task).classes == classes


def test_demo_outputs_have_the_manifests_shapes(demo):
    for network in demo.networks:
        spec = network.spec
        tiles = np.full((2, spec.tile_size, spec.tile_size, 3), 200, np.uint8)
        out = network.model.predict(normalize(tiles, spec.normalization), verbose=0)
        assert set(out) == set(spec.tasks)
        for head in spec.heads:
            n = len(head.classes)
            expected = (2, spec.tile_size, spec.tile_size, n) if head.task == "segmentation" else (2, n)
            assert out[head.task].shape == expected


def test_algorithm_fingerprint_is_the_manifest_hash(demo):
    algorithm = demo.algorithm
    assert algorithm.sha256 == hashlib.sha256((DEMO / "manifest.toml").read_bytes()).hexdigest()
    assert (algorithm.name, algorithm.version, algorithm.is_demo) == ("glio-demo", "0.3.0", True)
    assert algorithm.intended_use == demo.manifest.intended_use
    assert demo.network_for("mgmt").spec.name == "molecular"


# --- verification before deserialisation ------------------------------------------------------


def test_a_weights_file_with_one_byte_changed_is_refused_before_keras_reads_it(demo_copy, monkeypatch):
    path = demo_copy / "regions.keras"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    expected = load_manifest(demo_copy).network_for("segmentation").sha256
    actual = hashlib.sha256(bytes(data)).hexdigest()

    import keras

    def must_not_load(*args, **kwargs):
        raise AssertionError("keras.saving.load_model called on an unverified bundle")

    monkeypatch.setattr(keras.saving, "load_model", must_not_load)
    message = rf"regions\.keras .* fails its SHA-256 check: manifest says {expected}, file has {actual}.*re-copy the bundle or re-export it"
    with pytest.raises(BundleError, match=message):
        verify_bundle(demo_copy)
    with pytest.raises(BundleError, match=message):
        load_bundle(demo_copy)


def test_a_missing_weights_file_is_named(demo_copy):
    (demo_copy / "molecular.keras").unlink()
    with pytest.raises(BundleError, match=r"weights file molecular\.keras of network 'molecular' is missing"):
        load_manifest(demo_copy)


def test_a_folder_without_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"no manifest\.toml in .*not a model bundle folder"):
        verify_bundle(tmp_path)


# --- manifest validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("overlap = 32", "overlap = 320", r"network 'regions': overlap 320 px must be smaller than the tile, 320 px"),
        ('task = "mgmt"', 'task = "grade"', r"head task 'grade' is unknown; allowed tasks: segmentation, subtype, mgmt, egfr"),
        ('task = "mgmt"', 'task = "subtype"', r"head tasks repeat: \['subtype', 'subtype', 'egfr'\]"),
        ('normalization = "scale_0_1"', 'normalization = "zscore"', r"normalization 'zscore' is unknown; allowed: scale_0_1, imagenet"),
        ("um_per_px = 2.0", "um_per_px = 0", r"um_per_px 0 must be a number between"),
        ("tile_size = 320", 'tile_size = "320"', r"tile_size '320' px must be an integer"),
        ('file = "regions.keras"', 'file = "../regions.keras"', r"file '\.\./regions\.keras' must be a plain file name"),
        ("format = 2", "format = 3", r"manifest format 3 is not supported by this glio-node \(it reads formats 1, 2\)"),
        ('runtime = "keras"\n', "", r"\[\[networks\]\] #1 lacks required key\(s\) \['runtime'\]"),
        ("tile_size = 320", "tile_size = 320\ntilesize = 320", r"unknown key\(s\) \['tilesize'\]"),
        ('uid = "2.25.', 'uid = "2.025.', r"bundle uid '2\.025\..*' must be a DICOM UID"),
        ("is_demo = true", "is_demo = 1", r"is_demo must be true or false"),
        ('intended_use = "DEMO model', 'intended_use = "Model', r"must say DEMO when is_demo is true"),
        ('created = "', 'created = "yesterday', r"created 'yesterday.*' must be an ISO 8601 time"),
        ("indeterminate_below = 0.0", "indeterminate_below = 1.5", r"indeterminate_below 1\.5 must be a number in \[0, 1\)"),
        ('code_value = "GLIO-R02"', 'code_value = "GLIO-R01"', r"head 'segmentation': two classes share a coded concept"),
        ("[validation]\n", '[validation]\nnote = "good"\n', r"validation value note = 'good' must be a finite number"),
    ],
)
def test_manifest_errors_name_the_bad_value(demo_copy, old, new, message):
    _edit_manifest(demo_copy, old, new)
    with pytest.raises(BundleError, match=message):
        load_manifest(demo_copy)


def test_a_task_produced_by_two_networks_is_refused(demo_copy):
    _edit_manifest(demo_copy, 'task = "segmentation"', 'task = "egfr"')
    with pytest.raises(BundleError, match=r"task 'egfr' is produced by two networks, 'regions' and 'molecular'"):
        load_manifest(demo_copy)


def test_a_bundle_with_two_segmentation_networks_is_refused_when_its_manifest_is_read(demo_copy):
    """Refused by load_manifest, before any weights are read, not later by every slide's analysis."""
    path = demo_copy / "manifest.toml"
    text = path.read_text()
    regions = text[text.index("[[networks]]") : text.index("[[networks]]", text.index("[[networks]]") + 1)]
    assert 'task = "segmentation"' in regions
    second = regions.replace('name = "regions"', 'name = "regions-2"').replace('"regions.keras"', '"regions-2.keras"')
    path.write_text(text + "\n" + second)
    with pytest.raises(
        BundleError, match=r"manifest\.toml: networks 'regions', 'regions-2' each have a segmentation head; a bundle "
        r"has at most one segmentation network"
    ):
        load_manifest(demo_copy)
    # the records refuse it too: no code path builds such a bundle
    regions_spec = load_manifest(DEMO).network_for("segmentation")
    with pytest.raises(BundleError, match=r"networks 'regions', 'regions-2' each have a segmentation head"):
        replace(load_manifest(DEMO), networks=(regions_spec, replace(regions_spec, name="regions-2", file="regions-2.keras")))


def test_records_check_themselves_on_construction():
    classes = coding.MGMT_CLASSES
    with pytest.raises(BundleError, match=r"overlap 300 px must be smaller than the tile, 256 px"):
        NetworkSpec("n", "n.keras", None, 256, 1.0, 300, "scale_0_1", (HeadSpec("mgmt", classes),))
    with pytest.raises(BundleError, match=r"head 'mgmt' has 1 class\(es\); a head needs at least 2"):
        HeadSpec("mgmt", classes[:1])
    with pytest.raises(BundleError, match=r"code_meaning .* at most 64"):
        HeadSpec("mgmt", (classes[0], CodedClass("x", "X1", "99GLIO", "x" * 65)))
    with pytest.raises(BundleError, match=r"has no heads"):
        NetworkSpec("n", "n.keras", None, 256, 1.0, 0, "scale_0_1", ())


def test_coding_follows_the_texture_class_order():
    assert tuple(c.name for c in coding.REGION_CLASSES) == textures.REGION_CLASSES
    assert tuple(c.name for c in coding.SUBTYPE_CLASSES) == textures.SUBTYPES
    assert [c.name for c in coding.MGMT_CLASSES] == ["methylated", "unmethylated"]
    assert [c.name for c in coding.EGFR_CLASSES] == ["amplified", "not_amplified"]
    necrosis = coding.REGION_CLASSES[textures.REGION_CLASSES.index("necrosis")]
    assert (necrosis.coding_scheme_designator, necrosis.code_value) == ("SCT", "6574001")


def test_normalize():
    tiles = np.array([[[[0, 255, 51]]]], np.uint8)
    np.testing.assert_allclose(normalize(tiles, "scale_0_1"), [[[[0.0, 1.0, 0.2]]]], rtol=1e-6)
    np.testing.assert_allclose(normalize(tiles, "imagenet")[0, 0, 0, 0], -0.485 / 0.229, rtol=1e-6)
    with pytest.raises(ValueError, match="normalization 'x' is unknown"):
        normalize(tiles, "x")


# --- writing ----------------------------------------------------------------------------------------------


def _tiny_manifest() -> Manifest:
    return Manifest(
        name="tiny",
        version="1.2.3",
        uid="2.25.1234",
        intended_use="DEMO test bundle. Research use only.",
        is_demo=True,
        provenance="made by test_bundle.py from untrained networks",
        created=datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc),
        networks=(
            NetworkSpec("seg", "seg.keras", None, 32, 2.0, 8, "scale_0_1", (HeadSpec("segmentation", coding.REGION_CLASSES),)),
            NetworkSpec(
                "cls",
                "cls.keras",
                None,
                32,
                0.5,
                0,
                "imagenet",
                (HeadSpec("subtype", coding.SUBTYPE_CLASSES, indeterminate_below=0.4), HeadSpec("egfr", coding.EGFR_CLASSES)),
            ),
        ),
        validation={"accuracy": 0.5, "patches": 10},
    )


def _tiny_models():
    from glio_node.runtime.networks import build_classifier, build_unet

    return {
        "seg": build_unet(32, 10, depth=2, base_filters=2),
        "cls": build_classifier(32, {"subtype": 4, "egfr": 2}, base_filters=2, blocks=1),
    }


def test_write_bundle_round_trips_and_replaces_a_previous_bundle(tmp_path):
    out = tmp_path / "models" / "tiny"
    manifest = _tiny_manifest()
    models = _tiny_models()
    written = write_bundle(out, manifest, models)
    assert written == replace(manifest, networks=written.networks)
    assert all(n.sha256 == bundle.sha256_file(out / n.file) for n in written.networks)
    assert sorted(p.name for p in out.iterdir()) == ["cls.keras", "manifest.toml", "seg.keras"]
    loaded = load_bundle(out)
    assert loaded.manifest == written
    assert loaded.network_for("egfr").spec.head("subtype").indeterminate_below == 0.4
    x = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(
        loaded.network_for("subtype").model.predict(x, verbose=0)["subtype"],
        models["cls"].predict(x, verbose=0)["subtype"],
        rtol=1e-5,
    )
    (out / "stale.keras").write_bytes(b"left over")
    write_bundle(out, replace(manifest, version="1.2.4"), models)
    assert load_manifest(out).version == "1.2.4"
    assert not (out / "stale.keras").exists()
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == ["tiny"]  # no staging left behind


def test_write_bundle_refuses_models_that_do_not_match(tmp_path):
    models = _tiny_models()
    with pytest.raises(BundleError, match=r"models \['seg'\] do not match the manifest's networks \['cls', 'seg'\]"):
        write_bundle(tmp_path / "b", _tiny_manifest(), {"seg": models["seg"]})
    from glio_node.runtime.networks import build_classifier

    models["cls"] = build_classifier(32, {"subtype": 3, "egfr": 2}, base_filters=2, blocks=1)
    with pytest.raises(BundleError, match=r"output 'subtype' has shape \(3,\), the manifest's head needs \(4,\)"):
        write_bundle(tmp_path / "b", _tiny_manifest(), models)
    assert not (tmp_path / "b").exists()
