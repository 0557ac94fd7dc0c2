"""A real headless browser for tests: Debian's Chromium, driven by Playwright.

Playwright's Python package brings its own driver but no browser here: we point it at
``/usr/bin/chromium`` (installed by ``./run test``), so nothing is downloaded.  The flags keep
Chromium off the network (this machine has none) and, with ``webgl=True``, give it a software
WebGL 2 (SwiftShader) for dicom-microscopy-viewer.  Tests mark
``@pytest.mark.needs("chromium", "playwright")``; :func:`chromium` requires both as well.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peers import require

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

OFFLINE_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
WEBGL_FLAGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


def have_chromium() -> bool:
    """True when Chromium and Playwright are both installed (tests use the ``needs`` marker)."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).is_file()


@contextmanager
def chromium(*, webgl: bool = False) -> Iterator[Any]:
    """A launched headless Chromium (a Playwright ``Browser``), closed on exit."""
    require("chromium", "the browser tests drive Debian's Chromium")
    require("playwright")
    from playwright.sync_api import sync_playwright

    flags = OFFLINE_FLAGS + (WEBGL_FLAGS if webgl else [])
    if webgl:
        flags = [f for f in flags if f != "--disable-gpu"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        try:
            yield browser
        finally:
            browser.close()
