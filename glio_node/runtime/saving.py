"""``write_bundle``: models saved (or graphs copied), hashed, and the manifest written last.

Used by training and ``glio-node models import``.  A Keras model is saved without its optimizer
state; an ONNX graph's signature is checked before it is copied.  The bundle is assembled beside
its target and moved into place, so no reader sees a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glio_node.bundle_verify import sha256_file, verify_bundle
from glio_node.errors import BundleError
from glio_node.manifest import MANIFEST_NAME, Manifest, NetworkSpec, WeightsFile
from glio_node.manifest_toml import manifest_to_toml
from glio_node.runtime.loading import check_model, check_signature

if TYPE_CHECKING:
    import keras

def _inference_copy(model: keras.Model) -> keras.Model:
    """The model without optimizer state (a trained model's .keras would carry Adam's moments, 3x).

    Rebuilt from its config: ``keras.models.clone_model`` would copy the compiled optimizer too.
    """
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def _given_weights(spec: NetworkSpec, given: Any) -> list:
    """What write_bundle was given for ``spec``, one entry per weights file (a list for k folds)."""
    many = isinstance(given, (list, tuple))
    if bool(spec.folds) != many or (many and len(given) != len(spec.folds)):
        raise BundleError(
            f"network {spec.name!r} has {len(spec.weights)} weights file(s) {[w.file for w in spec.weights]}: "
            "give one model or path per file (a list for fold models)"
        )
    return list(given) if many else [given]


def _check_onnx_file(spec: NetworkSpec, path: Path) -> None:
    from glio_node.runtime.onnx_runner import graph_signature, open_session  # noqa: PLC0415

    check_signature(spec, *graph_signature(open_session(path, "cpu")))


def write_bundle(
    out_dir: str | os.PathLike[str],
    manifest: Manifest,
    models: Mapping[str, keras.Model | str | os.PathLike[str]],
    licences: Mapping[str, str | os.PathLike[str]] | None = None,
    ood_reference: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Save ``models`` (network name -> Keras model, or the path of a weights file) as a bundle in ``out_dir``.

    ``manifest`` gives everything but the hashes (its networks' ``sha256`` and origins'
    ``licence_sha256`` may be None and are ignored): a Keras model is saved, without optimizer
    state, to its network's ``file`` with ``model.save``; a path (an ONNX graph, or a ``.keras``
    file of another bundle) is copied byte for byte after an ONNX graph's signature is checked;
    ``licences`` (network name -> licence text file) are copied to each origin's ``licence_file``;
    ``ood_reference`` (a ``.npz`` of glio_node.ood.save_reference) is copied to ``manifest.ood.file``;
    everything is hashed, and the manifest is written with the hashes.  The bundle is assembled
    in a temporary folder beside ``out_dir`` and moved into place at the end, replacing any
    previous bundle there, so a reader never sees a manifest that names weights from another run.
    Returns the manifest as ``verify_bundle`` reads it back.  Raises BundleError if models,
    licences and networks do not match.
    """
    out_dir = Path(out_dir)
    licences = dict(licences or {})
    names = {n.name for n in manifest.networks}
    if set(models) != names:
        raise BundleError(f"models {sorted(models)} do not match the manifest's networks {sorted(names)}")
    with_origin = {n.name for n in manifest.networks if n.origin is not None}
    if set(licences) != with_origin:
        raise BundleError(
            f"licence files given for {sorted(licences)}, but the networks with an origin are {sorted(with_origin)}"
        )
    if (ood_reference is None) != (manifest.ood is None):
        raise BundleError("give an ood_reference file exactly when the manifest has an [ood] table")
    for spec in manifest.networks:
        for given in _given_weights(spec, models[spec.name]):
            if isinstance(given, (str, os.PathLike)):
                if spec.runtime == "onnx":
                    _check_onnx_file(spec, Path(given))
            elif spec.runtime == "onnx":
                raise BundleError(f"network {spec.name!r} is an onnx network: give the path of its .onnx file")
            else:
                check_model(spec, given)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is read by the service user too
    try:
        networks = []
        for spec in manifest.networks:
            hashed = []
            for weights, given in zip(spec.weights, _given_weights(spec, models[spec.name])):
                target = staging / weights.file
                if isinstance(given, (str, os.PathLike)):
                    shutil.copyfile(given, target)
                else:
                    _inference_copy(given).save(target)
                hashed.append(WeightsFile(weights.file, sha256_file(target)))
            spec = replace(spec, file=hashed[0].file, sha256=hashed[0].sha256, folds=tuple(hashed) if spec.folds else ())
            if spec.origin is not None:
                licence = staging / spec.origin.licence_file
                shutil.copyfile(licences[spec.name], licence)
                spec = replace(spec, origin=replace(spec.origin, licence_sha256=sha256_file(licence)))
            networks.append(spec)
        final = replace(manifest, networks=tuple(networks))
        if manifest.ood is not None:
            shutil.copyfile(ood_reference, staging / manifest.ood.file)  # type: ignore[arg-type]
            final = replace(final, ood=replace(manifest.ood, sha256=sha256_file(staging / manifest.ood.file)))
        (staging / MANIFEST_NAME).write_text(manifest_to_toml(final), encoding="utf-8")
        verify_bundle(staging)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return verify_bundle(out_dir)
