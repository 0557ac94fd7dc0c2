"""One contract per port, run over the fake and the real adapter alike (``glio_node.ports``).

``SlideReader``: the numpy ``FakeSlide`` and ``DicomSlide`` on the small synthetic DICOM slide.
``ModelRunner``: the fake segmenter and classifier and ``KerasNetwork`` on each network of
models/glio-demo.  A new adapter (an ONNX runtime, another reader) joins by adding a
parameter; if it passes here, the pipeline can use it.  The Keras cases load TensorFlow, so
they are marked slow; the fakes run in well under a second.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
import pytest

from glio_node.pipeline.analyze import AnalysisOptions, analyze
from glio_node.ports import Head, ModelRunner, SlideReader
from glio_node.results import CodedClass
from glio_node.testing import FAKE_ALGORITHM, FakeClassifier, FakeSegmenter, FakeSlide, tissue_image

DEMO = Path(__file__).resolve().parents[2] / "models" / "glio-demo"
BATCH = 3  # every runner here is built for at least this many tiles per call

# -- SlideReader ------------------------------------------------------------------------------


@pytest.fixture(params=["fake", "dicom"])
def reader(request: pytest.FixtureRequest):
    """(reader, decodes) where ``decodes()`` is the adapter's own count of frames it decoded."""
    if request.param == "fake":
        slide = FakeSlide(tissue_image()[0], 0.0005)
        yield slide, lambda: sum(slide.reads.values())
        slide.close()
    else:
        from glio_node.runtime.slide_reader import DicomSlide

        slide = DicomSlide.open(request.getfixturevalue("small_slide").files)
        yield slide, lambda: sum(slide.decodes.values())
        slide.close()


def _positions(level) -> list[tuple[int, int]]:
    return [
        (r, c)
        for r in range(math.ceil(level.rows / level.frame_rows))
        for c in range(math.ceil(level.cols / level.frame_cols))
    ]


def test_levels_are_finest_first_and_cover_the_same_slide(reader):
    slide, _ = reader
    assert isinstance(slide, SlideReader)
    levels = slide.levels
    assert len(levels) >= 2 and [lvl.index for lvl in levels] == list(range(len(levels)))
    assert all(a.um_per_px < b.um_per_px for a, b in zip(levels, levels[1:]))
    width_mm, height_mm = levels[0].cols * levels[0].mm_per_px, levels[0].rows * levels[0].mm_per_px
    for lvl in levels:
        assert lvl.frame_rows > 0 and lvl.frame_cols > 0
        assert abs(lvl.cols * lvl.mm_per_px - width_mm) <= lvl.mm_per_px
        assert abs(lvl.rows * lvl.mm_per_px - height_mm) <= lvl.mm_per_px
    assert slide.gaps == () and slide.missing_frames_read == 0  # a whole slide


def test_every_frame_reads_as_full_size_rgb_the_same_each_time(reader):
    slide, _ = reader
    for lvl in slide.levels:
        for r, c in _positions(lvl):
            frame = slide.read_frame(lvl.index, r, c)
            assert frame.dtype == np.uint8 and frame.shape == (lvl.frame_rows, lvl.frame_cols, 3), (lvl.index, r, c)
    last = slide.levels[-1]
    np.testing.assert_array_equal(slide.read_frame(last.index, 0, 0), slide.read_frame(last.index, 0, 0))


def test_read_frames_gives_read_frame_for_each_position_in_order(reader):
    slide, _ = reader
    lvl = slide.levels[1]
    positions = _positions(lvl)
    order = [*positions[::-1], positions[0]]  # reversed, and one repeated
    frames = slide.read_frames(lvl.index, order)
    assert len(frames) == len(order)
    for (r, c), frame in zip(order, frames):
        np.testing.assert_array_equal(frame, slide.read_frame(lvl.index, r, c))


def test_frames_read_from_many_threads_match_those_read_one_by_one(reader):
    slide, _ = reader
    lvl = slide.levels[0]
    positions = _positions(lvl)
    serial = [slide.read_frame(0, r, c) for r, c in positions]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda p: slide.read_frame(0, *p), positions * 2))
    for a, b in zip(serial * 2, parallel):
        np.testing.assert_array_equal(a, b)


def test_the_pipeline_reads_each_frame_once_and_the_reader_decodes_no_more(reader):
    slide, decodes = reader
    before = decodes()
    result, stats, seg_level = analyze(slide, [FakeSegmenter(), FakeClassifier()], FAKE_ALGORITHM, AnalysisOptions())

    assert stats.frames_decoded == stats.frames_needed > 0
    tissue_level = slide.levels[stats.tissue_level]
    assert decodes() - before == len(_positions(tissue_level)) + stats.frames_decoded
    assert result.label_map.array.shape == (seg_level.rows, seg_level.cols)
    assert seg_level.headers  # what the writers derive the outputs from


# -- ModelRunner ------------------------------------------------------------------------------


@functools.cache
def _keras(task: str) -> ModelRunner:
    """The demo bundle's network for ``task``, loaded once per session."""
    from glio_node.bundle import load_bundle
    from glio_node.runtime.keras_runner import KerasNetwork, select_device

    select_device("cpu")
    return KerasNetwork(load_bundle(DEMO).network_for(task), batch_size=BATCH)


@pytest.fixture(
    params=[
        pytest.param(FakeSegmenter, id="fake-segmenter"),
        pytest.param(FakeClassifier, id="fake-classifier"),
        pytest.param(functools.partial(_keras, "segmentation"), id="keras-regions", marks=pytest.mark.slow),
        pytest.param(functools.partial(_keras, "subtype"), id="keras-molecular", marks=pytest.mark.slow),
    ]
)
def runner(request: pytest.FixtureRequest) -> ModelRunner:
    return request.param()


def _tiles(runner: ModelRunner, n: int, seed: int = 0) -> np.ndarray:
    """n tiles cut from the fake slide's tissue at the runner's tile size (resampled by striding)."""
    image, tissue = tissue_image(1024, 1536, seed=seed)
    t = runner.tile_size
    rows, cols = np.nonzero(tissue)
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(n):
        y = int(rng.integers(rows.min(), rows.max() - t)) if rows.max() - rows.min() > t else 0
        x = int(rng.integers(cols.min(), cols.max() - t)) if cols.max() - cols.min() > t else 0
        tile = np.full((t, t, 3), 255, np.uint8)
        crop = image[y : y + t, x : x + t]
        tile[: crop.shape[0], : crop.shape[1]] = crop
        tiles.append(tile)
    return np.stack(tiles)


def test_a_runner_states_its_geometry_and_heads(runner: ModelRunner):
    assert isinstance(runner, ModelRunner)
    assert isinstance(runner.name, str) and runner.name
    assert isinstance(runner.tile_size, int) and runner.tile_size > 0
    assert runner.um_per_px > 0
    assert 0 <= runner.overlap < runner.tile_size and runner.overlap % 2 == 0
    tasks = [h.task for h in runner.heads]
    assert tasks and len(set(tasks)) == len(tasks)
    for head in runner.heads:
        assert isinstance(head, Head)
        assert head.classes and all(isinstance(c, CodedClass) for c in head.classes)
        assert 0.0 <= head.indeterminate_below <= 1.0


def test_predict_gives_one_array_per_head_of_the_documented_shape(runner: ModelRunner):
    t = runner.tile_size
    for n in (1, BATCH):
        tiles = _tiles(runner, n)
        copy = tiles.copy()
        outputs = runner.predict(tiles)
        np.testing.assert_array_equal(tiles, copy)  # the input is not changed
        assert set(outputs) == {h.task for h in runner.heads}
        for head in runner.heads:
            value = np.asarray(outputs[head.task])
            k = len(head.classes)
            if head.task == "segmentation":
                assert value.shape == (n, t, t) and value.dtype == np.uint8
                assert value.max() < k
            else:
                assert value.shape == (n, k) and value.dtype == np.float32
                assert ((value >= 0) & (value <= 1)).all()
                np.testing.assert_allclose(value.sum(axis=1), 1.0, atol=1e-4)


def test_a_tiles_output_does_not_depend_on_its_batch(runner: ModelRunner):
    tiles = _tiles(runner, BATCH, seed=1)
    together = runner.predict(tiles)
    again = runner.predict(tiles)
    for i in range(BATCH):
        alone = runner.predict(tiles[i : i + 1])
        for task, value in together.items():
            np.testing.assert_array_equal(value, again[task])  # deterministic
            if task == "segmentation":
                assert (alone[task][0] == value[i]).mean() > 0.999
            else:
                np.testing.assert_allclose(alone[task][0], value[i], atol=1e-4)
