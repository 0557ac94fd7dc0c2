"""A format-1 bundle made from the shipped demo bundle, for the tests that prove format 1 still reads.

The shipped demo is format 2 since 0.3.0 (temperatures, an [ood] gate). Format 1 is what bundles
written before bundle format 2 look like: Keras networks only, no ``runtime``/``kind`` keys, no
temperatures, no [ood] table. Its weights are the demo's own, so the copy analyses slides too.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path


def format_1_text(text: str) -> str:
    """The shipped manifest's TOML text as format 1 (the same networks, heads and figures)."""
    text = text.replace("format = 2", "format = 1", 1)
    text = re.sub(r'^(runtime|kind) = "[a-z]+"\n', "", text, flags=re.M)
    text = re.sub(r"^temperature = [0-9.eE+-]+\n", "", text, flags=re.M)
    return re.sub(r"\n\[ood\]\n(?:[a-z_0-9]+ = .*\n)*", "\n", text)


def format_1_copy(shipped: Path, folder: Path) -> Path:
    """A copy of the bundle ``shipped`` with its manifest rewritten as format 1 (no gate file)."""
    out = Path(shutil.copytree(shipped, folder, ignore=shutil.ignore_patterns("ood-reference.npz")))
    manifest = out / "manifest.toml"
    manifest.write_text(format_1_text(manifest.read_text()))
    return out
