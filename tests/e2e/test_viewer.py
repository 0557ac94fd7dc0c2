"""The pathologist's view: glio-node's results over the slide in a real DICOM microscopy viewer.

A synthetic slide (known truth) is analysed by ``glio-node analyze``; slide and results go into
a real Orthanc; our one-page build of dicom-microscopy-viewer (viewer/), served by Orthanc's
ServeFolders plugin from the same origin, reads them over DICOMweb in headless Chromium with
software WebGL 2. The viewer must accept every object (a refusal fails the test with the
viewer's own message: fix the object, not the test), and what it draws must be where the truth
says: the segment colours on screen are compared with the painted regions, and the heatmap's
brightness with its own per-tile probabilities. The combined view is saved as docs/img/viewer.png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from browser import chromium
from orthanc_peer import Orthanc, free_port
from pydicom.pixels import pixel_array
from slides import ConvertedSlide
from viewer_page import (
    ViewerPage,
    served_by,
    slide_box,
    viewer_dist,
)

from glio_node.results import NOT_TISSUE
from glio_node.synthetic.slide import SlideSpec, SyntheticSlide

REPO = Path(__file__).resolve().parents[2]
DOCS_IMAGES = REPO / "docs" / "img"  # viewer*.png there are refreshed when GLIO_UPDATE_SCREENSHOTS=1

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs("orthanc", "orthanc-serve-folders", "chromium", "playwright"),
]


@dataclass
class Study:
    """A slide and glio-node's results, stored in a running Orthanc."""

    name: str  # which slide: "ours" (glio_node.synthetic) or "wsidicomizer"
    orthanc: Orthanc
    slide: SyntheticSlide | ConvertedSlide  # files, spec and the painted truth
    study_instance_uid: str
    series_instance_uid: str  # the slide's
    seg_series: str
    heatmap_series: str  # the Parametric Map of the called subtype
    heatmap_file: Path

    def query(self, **options: object) -> dict[str, object]:
        return {"study": self.study_instance_uid, "slide": self.series_instance_uid, **options}


def _store(orthanc: Orthanc, path: Path) -> None:
    request = urllib.request.Request(f"{orthanc.url}/instances", data=path.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["Status"] in ("Success", "AlreadyStored")


def _analyse(slide_folder: Path, out: Path) -> list[Path]:
    """``glio-node analyze`` with the demo bundle: the files it wrote."""
    done = subprocess.run(
        [sys.executable, "-m", "glio_node.cli", "analyze", str(slide_folder), "--out", str(out),
         "--models", str(REPO / "models" / "glio-demo"), "--device", "cpu", "--json"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return [Path(f) for f in json.loads(done.stdout)["files"]]


@pytest.fixture(scope="module", params=["ours", "wsidicomizer"])
def study(request, tmp_path_factory) -> Iterator[Study]:
    """Slides that carry the FrameOfReferenceUID overlays must share: our writer's, and the same
    painting converted by wsidicomizer (OrthancWSIDicomizer writes none; see docs/viewer.md)."""
    dist = viewer_dist()
    slide = request.getfixturevalue({"ours": "small_slide", "wsidicomizer": "wsidicomizer_slide"}[request.param])
    head = pydicom.dcmread(slide.files[0], stop_before_pixels=True)
    files = _analyse(slide.files[0].parent, tmp_path_factory.mktemp("viewer-results"))
    orthanc = Orthanc(tmp_path_factory.mktemp("viewer-orthanc"), free_port(), free_port(), extra=served_by(dist)).start()
    try:
        for path in [*slide.files, *files]:
            _store(orthanc, path)
        heads = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
        [seg_series] = {ds.SeriesInstanceUID for ds in heads.values() if ds.Modality == "SEG"}
        subtype_maps = [f for f in files if f.name.startswith("heatmap-subtype-")]
        # pixel_array(path), not Dataset.pixel_array: that fails once wsidicomizer is imported
        # (it turns on pydicom's future API for the whole session)
        called = max(subtype_maps, key=lambda f: float(pixel_array(f).mean()))
        yield Study(request.param, orthanc, slide, head.StudyInstanceUID, head.SeriesInstanceUID, seg_series,
                    heads[called].SeriesInstanceUID, called)
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium(webgl=True) as b:
        yield b


@dataclass
class Display:
    """Where and how the viewer shows the slide alone: the test compares overlays with this."""

    box: tuple[int, int, int, int]  # (top, left, bottom, right) of the slide in the viewport
    turn: str  # a DISPLAY_TURNS key
    spec: SlideSpec  # the slide's size and spacing

    def raster(self, array: np.ndarray) -> np.ndarray:
        """A raster of the slide (row 0 = top of the total pixel matrix) as the viewer shows it."""
        return DISPLAY_TURNS[self.turn](array)

    @property
    def px_per_um(self) -> float:
        return (self.box[3] - self.box[1]) / (self.spec.width_px * self.spec.um_per_px)

    def on_screen(self, y_um: float, x_um: float) -> tuple[float, float] | None:
        """Screen (y, x) of a point given in µm from the total pixel matrix's top-left corner;
        None when it is off the slide."""
        height, width = self.spec.height_px * self.spec.um_per_px, self.spec.width_px * self.spec.um_per_px
        if not (0 <= y_um < height and 0 <= x_um < width):
            return None
        if self.turn in ("turned 180°", "flipped top-bottom"):
            y_um = height - y_um
        if self.turn in ("turned 180°", "flipped left-right"):
            x_um = width - x_um
        return self.box[0] + y_um * self.px_per_um, self.box[1] + x_um * self.px_per_um


@pytest.fixture(scope="module")
def display(browser, study) -> Display:
    """The slide alone in the viewer, and which turn of the painted truth its tissue matches.

    The viewer lays the slide out in the slide coordinate system (our slides have
    ImageOrientationSlide 0\\-1\\0\\-1\\0\\0), so the screen need not show the total pixel
    matrix as stored; the overlays must follow the slide whichever way it is shown.
    """
    view = _open(browser, study)
    try:
        rgb = view.viewport_rgb()
    finally:
        view.close()
    box = slide_box(rgb)
    spec = study.slide.spec
    assert (box[3] - box[1]) / (box[2] - box[0]) == pytest.approx(spec.width_px / spec.height_px, rel=0.03)
    truth = study.slide.truth_tissue(4.0)
    shown = _tissue_on_screen(_resample(rgb, box, truth.shape))
    overlap = {name: float((turn(truth) & shown).sum() / (turn(truth) | shown).sum()) for name, turn in DISPLAY_TURNS.items()}
    best = max(overlap, key=overlap.get)
    assert overlap[best] > 0.8, f"the slide's tissue on screen matches no turn of the painted truth: {overlap}"
    return Display(box, best, spec)


def _open(browser, study: Study, **options: object) -> ViewerPage:
    view = ViewerPage.open(browser, study.orthanc.url, **study.query(**options))
    assert view.state["errors"] == [], f"the viewer refused or failed: {view.state['errors']}"
    assert view.page_errors == [], f"the page threw: {view.page_errors}"
    assert view.state["framesLoaded"] > 0 and view.state["frameErrors"] == 0
    return view


def _keep_for_docs(screenshot: Path) -> None:
    """Copy a screenshot into docs/img/ when GLIO_UPDATE_SCREENSHOTS=1 (a test run does not
    write into the checkout otherwise)."""
    if os.environ.get("GLIO_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, DOCS_IMAGES / screenshot.name)


def _resample(rgb: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """The on-screen slide (``box`` of ``rgb``) sampled at the centres of a ``shape`` raster."""
    top, left, bottom, right = box
    rows = top + ((np.arange(shape[0]) + 0.5) * (bottom - top) / shape[0]).astype(int)
    cols = left + ((np.arange(shape[1]) + 0.5) * (right - left) / shape[1]).astype(int)
    return rgb[np.ix_(rows, cols)]


#: How a viewer may turn a slide on screen (it follows ImageOrientationSlide): raster -> screen.
DISPLAY_TURNS = {
    "as stored": lambda a: a,
    "turned 180°": lambda a: a[::-1, ::-1],
    "flipped left-right": lambda a: a[:, ::-1],
    "flipped top-bottom": lambda a: a[::-1, :],
}


def _tissue_on_screen(rgb: np.ndarray) -> np.ndarray:
    """Stained tissue (coloured) vs glass (near grey) in a screenshot of the slide alone."""
    channels = rgb.astype(int)
    return channels.max(axis=-1) - channels.min(axis=-1) > 25


def _classify(rgb: np.ndarray, segments: list[dict]) -> np.ndarray:
    """Per pixel: the class index (segment number - 1) whose colour it shows, else NOT_TISSUE."""
    colours = np.array([s["colour"] for s in segments], dtype=float)
    distance = np.linalg.norm(rgb[..., None, :].astype(float) - colours, axis=-1)
    nearest = distance.argmin(axis=-1)
    classes = np.array([s["number"] - 1 for s in segments])[nearest]
    return np.where(distance.min(axis=-1) < 30, classes, NOT_TISSUE).astype(np.uint8)


def test_the_viewer_draws_each_region_where_the_slide_was_painted(browser, study, display, tmp_path):
    view = _open(browser, study, seg=study.seg_series, seg_opacity=1)
    try:
        assert sorted(s["number"] for s in view.state["segments"]) == list(range(1, 11))
        assert len({tuple(s["colour"]) for s in view.state["segments"]}) == 10
        rgb = view.viewport_rgb(path=tmp_path / "viewer-regions.png")
    finally:
        view.close()
    if study.name == "ours":
        _keep_for_docs(tmp_path / "viewer-regions.png")
    assert slide_box(rgb) == display.box

    # µm/px: coarser than the screen, finer than the regions; turned as the slide is shown
    truth = display.raster(study.slide.truth_labels(4.0))
    shown = _classify(_resample(rgb, display.box, truth.shape), view.state["segments"])
    tissue = truth != NOT_TISSUE
    assert tissue.mean() > 0.2
    agreement = float((shown[tissue] == truth[tissue]).mean())
    glass_clear = float((shown[~tissue] == NOT_TISSUE).mean())
    assert agreement >= 0.75, f"only {agreement:.0%} of the tissue shows its painted region's colour"
    assert glass_clear >= 0.8, f"only {glass_clear:.0%} of the glass is free of segment colours"
    # The same comparison with the truth moved by a quarter of the slide, or not turned as the
    # slide is, fails: the check sees placement.
    for wrong in (np.roll(truth, truth.shape[1] // 4, axis=1), truth[::-1, :], truth[:, ::-1]):
        inside = wrong != NOT_TISSUE
        assert float((shown[inside] == wrong[inside]).mean()) < agreement - 0.2


def test_the_heatmap_is_bright_over_the_tiles_with_high_probability(browser, study, display, tmp_path):
    view = _open(browser, study, heatmap=study.heatmap_series, heatmap_opacity=1)
    try:
        assert len(view.state["mappings"]) == 1
        assert "probability" in view.state["mappings"][0]["description"].lower()
        rgb = view.viewport_rgb(path=tmp_path / "viewer-heatmap.png")
    finally:
        view.close()
    if study.name == "ours":
        _keep_for_docs(tmp_path / "viewer-heatmap.png")
    ds = pydicom.dcmread(study.heatmap_file)
    grid = pixel_array(study.heatmap_file).reshape(-1, ds.Rows, ds.Columns)[0][: ds.TotalPixelMatrixRows, : ds.TotalPixelMatrixColumns]
    probability = grid / 65535.0
    cell_um = float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]) * 1000
    luminance = rgb.astype(float).mean(axis=-1)
    half = cell_um * display.px_per_um / 4
    bright, dark = [], []
    for (r, c), p in np.ndenumerate(probability):
        # the middle half of the cell on screen, when the cell's centre lies on the slide
        centre = display.on_screen((r + 0.5) * cell_um, (c + 0.5) * cell_um)
        if centre is None:
            continue
        y, x = centre
        patch = luminance[int(y - half): int(y + half), int(x - half): int(x + half)]
        (bright if p > 0.8 else dark if p < 0.2 else []).append(float(patch.mean()))
    assert len(bright) >= 3 and len(dark) >= 3, "the slide needs tiles of high and of low probability"
    assert min(bright) > max(dark) + 40, f"high-probability tiles {bright} are not brighter than low ones {dark}"


def test_the_pathologist_sees_regions_and_heatmap_together(browser, study, tmp_path):
    """The page as a pathologist opens it (docs/img/viewer.png): regions and heatmap together."""
    view = _open(browser, study, seg=study.seg_series, heatmap=study.heatmap_series)
    try:
        assert len(view.state["segments"]) == 10 and len(view.state["mappings"]) == 1
        view.page.screenshot(path=str(tmp_path / "viewer.png"))
        with_overlays = view.viewport_rgb()
    finally:
        view.close()
    if study.name == "ours":
        _keep_for_docs(tmp_path / "viewer.png")
    slide_only = _open(browser, study)
    try:
        plain = slide_only.viewport_rgb()
    finally:
        slide_only.close()
    box = slide_box(with_overlays)
    assert box == slide_box(plain)
    top, left, bottom, right = box
    changed = np.abs(with_overlays.astype(int) - plain.astype(int)).sum(axis=-1) > 30
    assert changed[top:bottom, left:right].mean() > 0.5, "the overlays change little of the slide"


def test_on_an_orthanc_dicomizer_slide_the_viewer_refuses_the_overlays_and_says_why(
    browser, orthanc_slide, tmp_path
):
    """OrthancWSIDicomizer writes no FrameOfReferenceUID; our outputs then carry a derived one
    (README), and the viewer, which overlays only within one frame of reference, refuses them
    with its own message. The slide itself still shows. This pins the documented behaviour: if
    it changes, docs/viewer.md and the README must change with it."""
    files = _analyse(orthanc_slide.folder, tmp_path / "results")
    head = pydicom.dcmread(orthanc_slide.files[0], stop_before_pixels=True)
    assert "FrameOfReferenceUID" not in head
    [seg] = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files if f.name.startswith("seg")}
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(), extra=served_by(viewer_dist())).start()
    try:
        for path in [*orthanc_slide.files, *files]:
            _store(orthanc, path)
        view = ViewerPage.open(browser, orthanc.url, study=head.StudyInstanceUID, slide=head.SeriesInstanceUID, seg=seg)
        view.close()
    finally:
        orthanc.stop()
    assert view.state["errors"] == [
        "Segmentation instances must have the same Frame of Reference UID as the corresponding source images."
    ]
    assert view.state["segments"] == [] and view.page_errors == []
    assert view.state["framesLoaded"] > 0 and view.state["frameErrors"] == 0


@pytest.fixture(scope="module")
def attention_map(study, tmp_path_factory) -> tuple[str, Path]:
    """The same slide analysed by a two-stage bundle (tests/two_stage.py: a tiny Keras encoder
    and ABMIL heads), its results stored in the study's Orthanc: (EGFR attention series, file)."""
    import two_stage

    bundle = tmp_path_factory.mktemp("viewer-mil") / "two-stage"
    two_stage.write_two_stage_bundle(bundle)
    out = tmp_path_factory.mktemp("viewer-mil-results")
    done = subprocess.run(
        [sys.executable, "-m", "glio_node.cli", "analyze", str(study.slide.files[0].parent), "--out", str(out),
         "--models", str(bundle), "--device", "cpu", "--json"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    files = [Path(f) for f in json.loads(done.stdout)["files"]]
    for path in files:
        _store(study.orthanc, path)
    [egfr] = [f for f in files if f.name.startswith("attention-egfr-")]
    return str(pydicom.dcmread(egfr, stop_before_pixels=True).SeriesInstanceUID), egfr


def test_the_attention_map_of_an_abmil_head_is_listed_and_shown_over_its_tiles(browser, study, display, attention_map, tmp_path):
    """An aggregator head's attention map is a Parametric Map like the heatmaps: the page's
    heatmap path lists it by its explanation and draws it bright over the attended tiles and
    dark over the glass the encoder never saw."""
    series_uid, path = attention_map
    view = _open(browser, study, heatmap=series_uid, heatmap_opacity=1)
    try:
        assert len(view.state["mappings"]) == 1
        assert "attention" in view.state["mappings"][0]["description"].lower()
        rgb = view.viewport_rgb(path=tmp_path / "viewer-attention.png")
    finally:
        view.close()
    ds = pydicom.dcmread(path)
    grid = pixel_array(path).reshape(-1, ds.Rows, ds.Columns)[0][: ds.TotalPixelMatrixRows, : ds.TotalPixelMatrixColumns]
    relative = grid / 65535.0  # 1 = the slide's most attended tile, 0 = not in the bag
    cell_um = float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]) * 1000
    luminance = rgb.astype(float).mean(axis=-1)
    half = cell_um * display.px_per_um / 4
    bright, dark = [], []
    for (r, c), a in np.ndenumerate(relative):
        centre = display.on_screen((r + 0.5) * cell_um, (c + 0.5) * cell_um)
        if centre is None:
            continue
        y, x = centre
        patch = luminance[int(y - half): int(y + half), int(x - half): int(x + half)]
        (bright if a > 0.8 else dark if a == 0 else []).append(float(patch.mean()))
    assert len(bright) >= 3 and len(dark) >= 3, "the slide needs attended tiles and glass"
    assert min(bright) > max(dark) + 40, f"attended tiles {bright} are not brighter than glass {dark}"
