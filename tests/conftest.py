"""Shared fixtures: test slides written once per session (see tests/slides.py), PostgreSQL, and
the ``needs`` marker: ``@pytest.mark.needs("orthanc", "storescu")`` requires those peers
(tests/peers.py) before the test's fixtures are set up, failing under CI, skipping elsewhere."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import slides`

import peers  # noqa: E402
from peers import pytest_configure, pytest_runtest_setup  # noqa: E402, F401  (the needs marker)
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


PG_ADMIN_URL = os.environ.get(
    "GLIO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database of the test module's own (``glio_test_<random>``), dropped after.

    The multi-node path runs on a real PostgreSQL (``./run test`` starts it): its absence is
    ``peers.absent`` (a failure under CI, a skip elsewhere).
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = make_url(PG_ADMIN_URL)
    try:
        socket.create_connection((admin_url.host or "127.0.0.1", admin_url.port or 5432), 1).close()
    except OSError:
        peers.absent(f"no PostgreSQL listens at {admin_url.render_as_string()} (./run test starts one)")
    name = f"glio_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
