"""A series that stayed incomplete past its wait is analysed as it arrived — and says so.

The worker runs a quiet-but-incomplete series after ``incomplete_wait_seconds`` (issue 3): the
frames that never came are read as glass, so no region is drawn there, and the SR carries a
coded "incomplete source" evaluation, so a partial answer never looks like a whole one.
``glio-node analyze`` (no ``allow_gaps``) still refuses the same files.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from dciodvfy import assert_valid

from glio_node.errors import BadInput
from glio_node.job import run_job
from glio_node.results import NOT_TISSUE
from glio_node.runtime.slide_reader import DicomSlide
from glio_node.synthetic.slide import SlideSpec, write_synthetic_slide

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "glio-demo"
pytestmark = pytest.mark.slow

# One level, 4x3 frames of 256 px in 3 concatenation parts of 4 frames: part 2 is frame row 1.
# Every network and the tissue detector read this level (downsampled), so all see the gap.
SPEC = SlideSpec(width_px=1024, height_px=768, tile_size=256, levels=1, frames_per_file=4,
                 context_images=False)


@pytest.fixture(scope="module")
def incomplete(tmp_path_factory: pytest.TempPathFactory):
    slide = write_synthetic_slide(SPEC, tmp_path_factory.mktemp("incomplete"))
    files = [f for f in slide.files if f.name != "level0-part002.dcm"]
    assert len(files) == len(slide.files) - 1
    return slide, files


def test_the_reader_refuses_gaps_unless_the_worker_allows_them(incomplete):
    _, files = incomplete
    with pytest.raises(BadInput, match="concatenation of 3 instances arrived with only 2"):
        DicomSlide.open(files)
    with DicomSlide.open(files, allow_gaps=True) as slide:
        assert slide.gaps and "concatenation of 3" in slide.gaps[0]
        assert slide.read_frame(0, 1, 2).min() == 255  # the missing part: glass
        assert slide.read_frame(0, 0, 2).min() < 200  # present frames still decode
        assert slide.read_frame(0, 2, 1).min() < 200
        assert slide.missing_reads[0] == 1


def test_an_incomplete_slide_is_analysed_where_it_arrived_and_the_sr_says_it_was_incomplete(
    incomplete, tmp_path
):
    slide, files = incomplete
    summary = run_job(files, tmp_path / "out", DEMO, device="cpu", allow_gaps=True)
    assert any("arrived incomplete" in note for note in summary.notes)

    [sr_path] = [Path(f) for f in summary.files if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SR"]
    assert_valid(sr_path)
    sr = pydicom.dcmread(sr_path)
    codes = {item.ConceptCodeSequence[0].CodeValue
             for item in _walk(sr.ContentSequence) if "ConceptCodeSequence" in item}
    assert "SRCINCOMPL" in codes

    # The same slide, whole: no such evaluation.
    whole = run_job(slide.files, tmp_path / "whole", DEMO, device="cpu")
    assert not any("arrived incomplete" in note for note in whole.notes)
    [whole_sr] = [Path(f) for f in whole.files if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SR"]
    whole_codes = {item.ConceptCodeSequence[0].CodeValue
                   for item in _walk(pydicom.dcmread(whole_sr).ContentSequence) if "ConceptCodeSequence" in item}
    assert "SRCINCOMPL" not in whole_codes


def test_no_region_is_drawn_where_frames_were_missing(incomplete):
    from glio_node.bundle import load_bundle
    from glio_node.pipeline.analyze import AnalysisOptions, analyze
    from glio_node.runtime.keras_runner import bundle_networks, select_device

    slide, files = incomplete
    select_device("cpu")
    bundle = load_bundle(DEMO)
    networks = bundle_networks(bundle, batch_size=8)
    with DicomSlide.open(files, allow_gaps=True) as reader:
        result, _, _ = analyze(reader, networks, bundle.algorithm, AnalysisOptions(batch_size=8))
    labels = result.label_map
    scale = labels.mm_per_px * 1000 / SPEC.um_per_px  # base px per label px
    band = slice(int(256 / scale) + 2, int(512 / scale) - 2)  # frame row 1, inside its edges
    truth = slide.truth_labels(labels.mm_per_px * 1000)[band]
    assert (truth != NOT_TISSUE).mean() > 0.3  # the painted slide has tissue there...
    assert (labels.array[band] == NOT_TISSUE).all()  # ...that was never seen, so never labelled
    others = labels.array[: int(256 / scale) - 2]
    assert (others != NOT_TISSUE).mean() > 0.1  # and the rows that arrived were analysed


def _walk(items):
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)
