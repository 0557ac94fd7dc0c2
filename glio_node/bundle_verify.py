"""Every file a bundle names is checked against the SHA-256 in its manifest before anything parses it.

Weights (each fold too), licence and OOD reference files: a mismatch is a corrupt or changed
bundle, refused with the file, the expected and the actual hash.  The manifest's own bytes are
returned too: their SHA-256 is the bundle's fingerprint (glio_node/runtime/loading.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from glio_node.errors import BundleError
from glio_node.manifest import Manifest
from glio_node.manifest_toml import read_manifest

def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lower-case hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_verified(path: str | os.PathLike[str]) -> tuple[Path, bytes, Manifest]:
    directory, data, manifest = read_manifest(path)
    checks = []
    for network in manifest.networks:
        checks.extend(("weights", w.file, w.sha256) for w in network.weights)
        if network.origin is not None:
            checks.append(("licence", network.origin.licence_file, network.origin.licence_sha256))
    if manifest.ood is not None:
        checks.append(("OOD reference", manifest.ood.file, manifest.ood.sha256))
    for what, name, expected in checks:
        actual = sha256_file(directory / name)
        if actual != expected:
            raise BundleError(
                f"{what} file {name} in {directory} fails its SHA-256 check: manifest says "
                f"{expected}, file has {actual}; the file is corrupt or was changed: re-copy the "
                "bundle or re-export it"
            )
    return directory, data, manifest


def verify_bundle(path: str | os.PathLike[str]) -> Manifest:
    """Read the manifest and check the SHA-256 of every weights and licence file; deserialise nothing.

    Raises BundleError naming the file, the expected and the actual hash on a mismatch.
    """
    return read_verified(path)[2]

