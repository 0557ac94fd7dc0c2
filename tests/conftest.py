"""Shared fixtures: test slides written once per session (see tests/slides.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import slides`

from slides import (  # noqa: E402
    ORTHANC_SPEC,
    SMALL,
    WSIDICOMIZER_SPEC,
    ConvertedSlide,
    MalformedInputs,
    SlideCache,
)

from glio_node.synthetic.slide import SyntheticSlide  # noqa: E402


@pytest.fixture(scope="session")
def slide_cache(tmp_path_factory: pytest.TempPathFactory) -> SlideCache:
    """Writes each distinct SlideSpec once per session: ``slide_cache.slide(spec)``."""
    return SlideCache(tmp_path_factory.mktemp("slides"))


@pytest.fixture(scope="session")
def small_slide(slide_cache: SlideCache) -> SyntheticSlide:
    """1024 x 768 px at 0.5 µm/px, JPEG, TILED_FULL, 3 levels, LABEL and OVERVIEW."""
    return slide_cache.slide(SMALL)


@pytest.fixture(scope="session")
def orthanc_slide(slide_cache: SlideCache) -> ConvertedSlide:
    """A 2048 x 2048 synthetic slide converted by OrthancWSIDicomizer (base level concatenated)."""
    return slide_cache.converted("orthanc", ORTHANC_SPEC)


@pytest.fixture(scope="session")
def wsidicomizer_slide(slide_cache: SlideCache) -> ConvertedSlide:
    """The small synthetic slide converted by wsidicomizer (re-encoded, 512-px tiles)."""
    return slide_cache.converted("wsidicomizer", WSIDICOMIZER_SPEC)


@pytest.fixture(scope="session")
def malformed_inputs(slide_cache: SlideCache) -> MalformedInputs:
    """``malformed_inputs[case]`` is a folder; cases are slides.MALFORMED_CASES."""
    return MalformedInputs(slide_cache)
