"""The pathologist's view for tests: our one-page dicom-microscopy-viewer build (viewer/).

``viewer_dist()`` builds ``viewer/dist/`` from the committed package-lock.json when it is missing
or older than the lock file, build.mjs or src/ (``npm ci && npm run build``, as ``./run test``
does; the npm registry, or npm's cache, is needed only then)
and returns it. Without npm the viewer cannot be built: ``peers.require("npm")`` (a failure under
CI, a skip elsewhere). ``served_by(dist)`` is the Orthanc configuration that serves the page from
Orthanc's own origin (no CORS); ``ViewerPage`` opens it and reads what the viewer reported.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from peers import ORTHANC_PLUGINS, require

REPO = Path(__file__).resolve().parents[1]
VIEWER = REPO / "viewer"
SERVE_FOLDERS_PLUGIN = ORTHANC_PLUGINS / "libServeFolders.so"
#: The page's background outside the slide (viewer/src/index.html).
BACKGROUND = (32, 32, 48)


def viewer_dist() -> Path:
    """``viewer/dist``, built first when it is missing or older than what it is built from."""
    dist = VIEWER / "dist"
    index = dist / "index.html"
    sources = [VIEWER / "package-lock.json", VIEWER / "build.mjs", *(VIEWER / "src").iterdir()]
    if index.is_file() and all(index.stat().st_mtime >= s.stat().st_mtime for s in sources):
        return dist
    npm = require("npm", "the viewer page (viewer/) must be built")
    for args in (["ci", "--no-audit", "--no-fund"], ["run", "build"]):
        done = subprocess.run([npm, *args], check=False, cwd=VIEWER, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"npm {' '.join(args)} in viewer/ failed:\n{done.stdout}\n{done.stderr}")
    return dist


def served_by(dist: Path) -> dict[str, Any]:
    """Orthanc configuration (``Orthanc(extra=...)``) serving ``dist`` at ``/viewer``."""
    return {"Plugins": [str(SERVE_FOLDERS_PLUGIN)], "ServeFolders": {"/viewer": str(dist.resolve())}}


@dataclass
class ViewerPage:
    """One load of the page in a Playwright ``page``: what the viewer reported, and screenshots."""

    page: Any
    state: dict[str, Any]
    page_errors: list[str]

    @classmethod
    def open(cls, browser: Any, base_url: str, timeout_s: float = 90, **query: Any) -> ViewerPage:
        page = browser.new_page(viewport={"width": 1040, "height": 640})
        page_errors: list[str] = []
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        page.goto(f"{base_url}/viewer/index.html?{urlencode({k: v for k, v in query.items() if v is not None})}")
        page.wait_for_function("window.glioViewer && window.glioViewer.ready", timeout=timeout_s * 1000)
        state = page.evaluate(
            "({errors: glioViewer.errors, segments: glioViewer.segments, mappings: glioViewer.mappings,"
            " framesLoaded: glioViewer.framesLoaded, frameErrors: glioViewer.frameErrors})"
        )
        return cls(page, state, page_errors)

    def viewport_rgb(self, *, controls: bool = False, path: Path | None = None) -> np.ndarray:
        """A screenshot of the viewport as uint8 (rows, cols, 3); the viewer's own controls
        (overview map, colour bar) hidden unless ``controls``."""
        from io import BytesIO

        from PIL import Image

        if not controls:
            self.page.add_style_tag(content=".ol-overviewmap, .ol-control, .ol-overlay-container { display: none !important; }")
            self.page.wait_for_timeout(300)
        png = self.page.locator("#viewport").screenshot(path=str(path) if path else None)
        return np.asarray(Image.open(BytesIO(png)).convert("RGB"))

    def close(self) -> None:
        self.page.close()


def slide_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the slide on screen: the rows and columns that are mostly
    not the page's background colour."""
    background = np.all(rgb == BACKGROUND, axis=-1)
    rows = np.flatnonzero(background.mean(axis=1) < 0.5)
    cols = np.flatnonzero(background.mean(axis=0) < 0.5)
    if rows.size == 0 or cols.size == 0:
        raise AssertionError("the slide is nowhere on screen: the viewport shows only its background")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1
