"""Tiles are cut by the worker's tiling, labelled from the dataset's mask, and cached so that a
second run decodes nothing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from glio_node.synthetic.slide import SlideSpec, layout_for
from training.dataset import load_dataset
from training.synthetic_dataset import write_synthetic_dataset
from training.tiles import TileSpec, load_or_extract

SPEC = TileSpec(um_per_px=2.0, tile_size=64, min_tissue=0.5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("tiles") / "dataset", patients=1)


def test_tiles_carry_the_regions_painted_under_them(dataset, tmp_path):
    record = load_dataset(dataset)[0]
    shard = load_or_extract(record, SPEC, dataset, tmp_path / "cache")
    assert shard.frames_decoded > 0
    assert len(shard.images) > 5 and shard.images.shape[1:] == (64, 64, 3)
    assert shard.labels is not None and shard.labels.shape == shard.images.shape[:3]
    # Truth at the network's spacing, from the layout the slide was painted from.
    spec = SlideSpec(width_px=1024, height_px=768, levels=2, context_images=False)
    truth = layout_for(spec).truth(2.0)[0]
    agree = total = 0
    for (r, c), labels in zip(shard.cells, shard.labels):
        t = np.full((64, 64), 255, np.uint8)
        win = truth[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64]
        t[: win.shape[0], : win.shape[1]] = win
        scored = (t != 255) & (labels != 255)
        agree += int((t[scored] == labels[scored]).sum())
        total += int(scored.sum())
    # The mask is 4x coarser (8 µm/px) than the tiles, so borders of regions may differ by a pixel.
    assert total > 0 and agree / total > 0.9


def test_a_second_run_reads_the_shard_and_a_changed_mask_is_extracted_again(dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    record = load_dataset(root)[0]
    first = load_or_extract(record, SPEC, root, tmp_path / "cache")
    again = load_or_extract(record, SPEC, root, tmp_path / "cache")
    assert again.frames_decoded == 0
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    Image.fromarray(np.zeros_like(np.asarray(Image.open(record.mask_path)))).save(record.mask_path)
    changed = load_or_extract(record, SPEC, root, tmp_path / "cache")
    assert changed.frames_decoded > 0 and set(np.unique(changed.labels)) <= {0, 255}
