"""Real H&E from another organ must not get a confident glioblastoma answer.

CMU-1-Small-Region (real skin tissue, CC0, tests/real_tissue.py), converted by wsidicomizer,
goes through the whole job with the shipped demo bundle as it is (its out-of-distribution gate was
fitted when it was trained: reference on the training patients, range on the validation ones),
and with the same networks under a gate that ``python -m training fit-ood`` fits here, on a small
synthetic dataset of the demo config's kind (the demo config's dataset spec at 24 patients of
0.5 x 0.4 mm instead of 48 of 2 x 1.5 mm: writing the full one takes minutes, this one about 30 s;
same textures and site variety).  Every call must come back "indeterminate (out of distribution)",
coded so in the SR, while held-out synthetic slides keep their right calls.  And tissue detection must find the
real tissue: its mask is compared with one the test derives independently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from dciodvfy import assert_valid
from real_tissue import cmu_small_region_svs, convert_real_tissue
from scipy import ndimage
from sr_content import content_items

from glio_node.bundle import load_manifest, verify_bundle
from glio_node.errors import BundleError
from glio_node.job import run_job
from glio_node.pipeline.analyze import find_tissue
from glio_node.runtime.slide_reader import DicomSlide
from glio_node.synthetic.slide import SlideSpec
from glio_node.synthetic.textures import Signature
from training.__main__ import main as training_main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "glio-demo"
OUT_OF_DISTRIBUTION = "indeterminate (out of distribution)"
TISSUE_IOU = 0.8  # the detector's mask against the test's own threshold-and-morphology mask

pytestmark = pytest.mark.slow

HELD_OUT = SlideSpec(width_px=2048, height_px=1536, um_per_px=0.5, levels=3, seed=11,
                     signature=Signature(subtype=1, mgmt_methylated=True, egfr_amplified=False))


@pytest.fixture(scope="module")
def gated_demo(tmp_path_factory) -> Path:
    """The shipped demo bundle plus an OOD gate fitted by the fit-ood command on synthetic slides."""
    work = tmp_path_factory.mktemp("fit-ood")
    bundle = work / "glio-demo"
    shutil.copytree(DEMO, bundle)
    (work / "run.toml").write_text(
        f'extends = "{REPO / "training" / "configs" / "glio-demo.toml"}"\n'
        'dataset = "dataset"\nruns_dir = "runs"\nmodels_dir = "models"\n'
        "[synthetic]\npatients = 24\nwidth_px = 1024\nheight_px = 768\n"
        "[classifier]\nmax_tiles_per_slide = 32\n"
    )
    assert training_main(["fit-ood", "--bundle", str(bundle), "--config", str(work / "run.toml")]) == 0
    return bundle


@pytest.fixture(scope="module")
def cmu_files(tmp_path_factory) -> tuple[Path, ...]:
    return convert_real_tissue(cmu_small_region_svs(), tmp_path_factory.mktemp("cmu") / "dicom")


def test_fit_ood_adds_a_hashed_gate_to_an_existing_bundle_without_retraining(gated_demo):
    manifest = verify_bundle(gated_demo)
    shipped = load_manifest(DEMO)
    assert manifest.ood is not None and manifest.ood.network == "molecular" and manifest.ood.features == "features"
    assert 0 < manifest.ood.slide_threshold_low < 1 < manifest.ood.slide_threshold
    assert manifest.ood.validation_slides >= 2
    assert [n.sha256 for n in manifest.networks] == [n.sha256 for n in shipped.networks]  # weights untouched
    assert "fit-ood" in manifest.provenance and "test patients unused" in manifest.provenance

    reference = gated_demo / manifest.ood.file
    saved = reference.read_bytes()
    try:
        reference.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        with pytest.raises(BundleError, match="OOD reference file ood-reference.npz .* fails its SHA-256 check"):
            verify_bundle(gated_demo)
    finally:
        reference.write_bytes(saved)


def test_importing_a_network_beside_the_gated_one_keeps_the_gate(gated_demo, tmp_path):
    import onnx
    import onnx_graphs

    from glio_node.cli import main as glio_main

    onnx.save(onnx_graphs.graph("segmentation", 10, seed=1), tmp_path / "lab.onnx")
    (tmp_path / "LICENSE").write_text("MIT License\n")
    (tmp_path / "network.toml").write_text(
        '[network]\nname = "regions"\ntile_size = 16\num_per_px = 2.0\noverlap = 4\nnormalization = "scale_0_1"\n'
        'input = { name = "tiles", shape = ["batch", 16, 16, 3], dtype = "float32" }\n'
        '[[network.heads]]\ntask = "segmentation"\nactivation = "softmax"\n'
        'output = { name = "segmentation", shape = ["batch", 16, 16, 10], dtype = "float32" }\n'
    )
    out = tmp_path / "with-lab-regions"
    assert glio_main(["models", "import", "--onnx", str(tmp_path / "lab.onnx"), "--licence", str(tmp_path / "LICENSE"),
                      "--source", "The Lab", "--network", str(tmp_path / "network.toml"), "--into", str(gated_demo),
                      "--out", str(out)]) == 0
    assert verify_bundle(out).ood == verify_bundle(gated_demo).ood  # the molecular network and its gate are kept


@pytest.fixture(params=["shipped", "refitted"])
def bundle(request) -> Path:
    """The demo bundle as shipped (its own gate), and with the gate fit-ood refits here."""
    return DEMO if request.param == "shipped" else request.getfixturevalue("gated_demo")


def test_the_shipped_demo_bundle_carries_a_gate_fitted_when_it_was_trained():
    manifest = verify_bundle(DEMO)
    assert manifest.ood is not None and manifest.ood.network == "molecular"
    assert manifest.ood.validation_slides == manifest.validation["val_slides"]  # thresholds from validation only
    assert 0 < manifest.ood.slide_threshold_low < 1 < manifest.ood.slide_threshold


def test_real_skin_tissue_gets_every_call_indeterminate_out_of_distribution(bundle, cmu_files, tmp_path):
    levels = [f for f in cmu_files if pydicom.dcmread(f, stop_before_pixels=True).ImageType[2] == "VOLUME"]
    summary = run_job(levels, tmp_path / "out", bundle, device="cpu")

    assert summary.calls == {"subtype": OUT_OF_DISTRIBUTION, "mgmt": OUT_OF_DISTRIBUTION, "egfr": OUT_OF_DISTRIBUTION}
    assert summary.ood["out_of_distribution"], summary.ood  # measured: score 0.50, in range 0.63 to 1.97
    assert any("out of distribution" in note for note in summary.notes)

    sr = next(Path(f) for f in summary.files if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SR")
    codes = {item.ConceptCodeSequence[0].CodeValue for item in content_items(pydicom.dcmread(sr)) if "ConceptCodeSequence" in item}
    assert "GLIO-OOD" in codes
    ood_map = next(Path(f) for f in summary.files if Path(f).name.startswith("ood-"))
    pm = pydicom.dcmread(ood_map)
    assert pm.SeriesNumber == 9050 and pm.Modality == "OT"
    for path in (sr, ood_map):
        assert_valid(path)


CALLS = {
    # the slide -> its painted signature as the summary words it
    "small": {"subtype": "Classical subtype", "mgmt": "MGMT promoter unmethylated", "egfr": "EGFR not amplified"},
    "held_out": {"subtype": "Mesenchymal subtype", "mgmt": "MGMT promoter methylated", "egfr": "EGFR not amplified"},
}


@pytest.mark.parametrize("which", sorted(CALLS))
def test_held_out_synthetic_slides_keep_their_right_calls_with_the_gate_on(bundle, slide_cache, small_slide, tmp_path, which):
    slide = small_slide if which == "small" else slide_cache.slide(HELD_OUT)
    summary = run_job(list(slide.level_files), tmp_path / "out", bundle, device="cpu")

    assert not summary.ood["out_of_distribution"], summary.ood  # measured for small: 1.14, in 0.63 to 1.97
    assert summary.calls == CALLS[which]


def test_tissue_detection_finds_the_real_tissue(cmu_files):
    with DicomSlide.open([f for f in cmu_files if pydicom.dcmread(f, stop_before_pixels=True).ImageType[2] == "VOLUME"]) as slide:
        found, _ = find_tissue(slide)
    # The test's own mask, from the original SVS (not the DICOM): the level-0 grey level averaged
    # over blocks of the detector's pixel size, tissue where darker than 0.86 of white, then
    # opened and closed by 2 px and holes filled.
    rgb = tifffile.TiffFile(cmu_small_region_svs()).pages[0].asarray()
    block = round(found.mm_per_px / 0.000499)
    rows, cols = rgb.shape[0] // block, rgb.shape[1] // block
    grey = rgb[: rows * block, : cols * block].mean(axis=2).reshape(rows, block, cols, block).mean(axis=(1, 3))
    mine = grey < 0.86 * 255
    mine = ndimage.binary_fill_holes(ndimage.binary_closing(ndimage.binary_opening(mine, iterations=2), iterations=2))
    theirs = found.mask[:rows, :cols]
    iou = (mine & theirs).sum() / (mine | theirs).sum()
    assert 0.2 < mine.mean() < 0.9  # the sample is partly glass: a mask of all or nothing proves nothing
    assert iou >= TISSUE_IOU, f"tissue IoU {iou:.3f}"

