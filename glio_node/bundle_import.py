"""``glio-node models import``: a local ONNX network, its licence and its source become a bundle network.

Air-gapped by design: everything comes from files the operator names and the command line;
nothing is downloaded, no hub is asked.  The network table (a small TOML file, the
``[[networks]]`` table of a format-2 manifest without ``file``, ``sha256``, ``runtime`` and
``origin``) gives what the graph cannot say: geometry, normalisation, heads and classes, and the
signature the graph must have.  The graph is checked against it before anything is written.

Two ways out:

- a new bundle (``[bundle]`` table in the network file: name, version, intended_use, is_demo);
- ``into``: a copy of an existing bundle in which the imported network replaces every network
  that produces one of its tasks or has its name (the other networks' files are copied byte for
  byte); the ``[bundle]`` table may override the copy's name, version, intended use.  An ONNX
  encoder (``kind = "encoder"``, no heads) replaces the encoder of that name, and the aggregators
  that read it read the new one (the manifest checks ``embed_dim``; the provenance says they were
  trained on the old one's embeddings).  An OOD gate on a replaced network is dropped: its
  reference describes that network's features.

Either way the result is a new bundle version (new UID, format 2) whose provenance says what was
imported, from which file (its SHA-256), with which source; the licence text is stored as a
bundle file hashed like the weights and named with the source in every output.
"""

from __future__ import annotations

import os
import tomllib
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from glio_node import coding
from glio_node.bundle import (
    FORMAT,
    Manifest,
    NetworkSpec,
    bundle_dir,
    network_from_toml,
    sha256_file,
    verify_bundle,
    write_bundle,
)
from glio_node.errors import BundleError

_BUNDLE_KEYS = ("name", "version", "intended_use", "is_demo", "provenance")


def licence_title(text: str) -> str:
    """The first non-empty line of a licence text, at most 64 characters: how outputs name it."""
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            return line if len(line) <= 64 else line[:61].rstrip() + "..."
    raise BundleError("the licence file is empty; give the licence text the network is distributed under")


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{what} {path} does not exist") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleError(f"{what} {path} is not valid TOML ({exc})") from None


def _network_spec(table: Any, where: str, source: str, licence_name: str) -> NetworkSpec:
    if not isinstance(table, dict) or "name" not in table:
        raise BundleError(f"{where}: a [network] table with at least a name is required")
    for forbidden in ("file", "sha256", "runtime", "origin"):
        if forbidden in table:
            raise BundleError(f"{where}: {forbidden!r} is set by the import; remove it from [network]")
    heads = []
    for head in table.get("heads", []):
        if isinstance(head, dict) and "classes" not in head and head.get("task") in coding.CLASSES_BY_TASK:
            # The task's standard classes and codes (glio_node/coding.py), in their order.
            classes = [
                {"name": c.name, "code_value": c.code_value, "coding_scheme_designator": c.coding_scheme_designator,
                 "code_meaning": c.code_meaning}
                for c in coding.CLASSES_BY_TASK[head["task"]]
            ]
            head = {**head, "classes": classes}
        heads.append(head)
    name = table["name"]
    filled = {
        **table,
        **({"heads": heads} if "heads" in table or table.get("kind", "tiles") != "encoder" else {}),
        "runtime": "onnx",
        "file": f"{name}.onnx",
        "origin": {"source": source, "licence": f"{name}.LICENCE.txt", "licence_name": licence_name},
    }
    return network_from_toml(filled, where, FORMAT, hashed=False)


def _validation_without(validation: dict[str, float], replaced: list[NetworkSpec]) -> dict[str, float]:
    """Held-out figures of the networks that stay: those named after a replaced network or task go,
    whichever set they were measured on (``test_``/``val_`` keys of three-way-split bundles, and the
    unprefixed keys of older ones): the SR must never quote a replaced network's figures."""
    prefixes = tuple(f"{s}{p}_" for n in replaced for p in (n.name, *n.tasks) for s in ("", "test_", "val_"))
    return {k: v for k, v in validation.items() if not k.startswith(prefixes)}


def import_onnx(
    onnx_file: str | os.PathLike[str],
    licence_file: str | os.PathLike[str],
    source: str,
    network_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    into: str | os.PathLike[str] | None = None,
    licence_name: str | None = None,
) -> tuple[Manifest, list[str]]:
    """Write a bundle in ``out_dir`` with the ONNX network ``onnx_file``; see the module docstring.

    Returns the written manifest and the names of the networks of ``into`` that were replaced.
    Raises BundleError naming what is wrong (missing file, bad table, signature mismatch).
    """
    onnx_file, licence_file, network_file = Path(onnx_file), Path(licence_file), Path(network_file)
    for what, path in (("ONNX file", onnx_file), ("licence file", licence_file)):
        if not path.is_file():
            raise BundleError(f"{what} {path} does not exist")
    try:
        text = licence_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"licence file {licence_file} is not UTF-8 text; give the licence as a text file") from None
    name_of_licence = licence_name or licence_title(text)
    doc = _read_toml(network_file, "network file")
    unknown = sorted(set(doc) - {"bundle", "network"})
    if unknown:
        raise BundleError(f"network file {network_file} has unknown table(s) {unknown}; allowed: bundle, network")
    bundle_table = doc.get("bundle", {})
    if not isinstance(bundle_table, dict) or set(bundle_table) - set(_BUNDLE_KEYS):
        raise BundleError(f"network file {network_file}: [bundle] may hold only {', '.join(_BUNDLE_KEYS)}")
    try:
        spec = _network_spec(doc.get("network"), f"{network_file} [network]", source, name_of_licence)
    except BundleError as exc:
        raise BundleError(str(exc)) from None
    digest = sha256_file(onnx_file)
    how = (
        f"Network {spec.name!r} imported by `glio-node models import` from {onnx_file.name} "
        f"(SHA-256 {digest}); source: {' '.join(source.split())}; licence: {name_of_licence}."
    )
    now = datetime.now(UTC).replace(microsecond=0)
    models: dict[str, Any] = {spec.name: onnx_file}
    licences: dict[str, Any] = {spec.name: licence_file}
    replaced: list[NetworkSpec] = []
    reference = None  # the base bundle's OOD reference, carried over when its network is kept
    if into is None:
        missing = [k for k in ("name", "version", "intended_use", "is_demo") if k not in bundle_table]
        if missing:
            raise BundleError(
                f"network file {network_file}: a new bundle needs [bundle] {', '.join(missing)} "
                "(or pass --into BUNDLE to add the network to a copy of a bundle)"
            )
        provenance = " ".join(p for p in (bundle_table.get("provenance", ""), how) if p)
        manifest = Manifest(
            name=bundle_table["name"], version=bundle_table["version"], uid=f"2.25.{uuid.uuid4().int}",
            intended_use=bundle_table["intended_use"], is_demo=bundle_table["is_demo"],
            provenance=provenance, created=now, networks=(spec,), format=FORMAT,
        )
    else:
        base_dir = bundle_dir(into)
        base = verify_bundle(base_dir)
        kept = []
        for n in base.networks:
            if set(n.tasks) & set(spec.tasks) or n.name == spec.name:  # an encoder has no task: its name
                replaced.append(n)
                continue
            kept.append(n)
            models[n.name] = [base_dir / w.file for w in n.folds] if n.folds else base_dir / n.file
            if n.origin is not None:
                licences[n.name] = base_dir / n.origin.licence_file
        if replaced:
            how += f" It replaces network(s) {', '.join(repr(n.name) for n in replaced)} of {base.name} {base.version}."
        readers = [n.name for n in kept if n.kind == "aggregator" and n.encoder in {r.name for r in replaced}]
        if readers:
            # The heads were trained on the replaced encoder's embeddings; only the same encoder
            # in another runtime (e.g. export-onnx's) keeps them meaningful.
            how += (f" Aggregator(s) {', '.join(map(repr, readers))} were trained on the replaced encoder's embeddings "
                    "and read the imported one's: valid only if it is the same encoder (e.g. exported to ONNX).")
        ood = base.ood
        if ood is not None and ood.network in {n.name for n in replaced}:
            ood = None  # the gate's reference describes the replaced network's features
            how += f" Its out-of-distribution gate (network {base.ood.network!r}) was dropped with that network."
        overrides = {k: v for k, v in bundle_table.items() if k != "provenance"}
        manifest = replace(
            base, format=FORMAT, uid=f"2.25.{uuid.uuid4().int}", created=now,
            provenance=" ".join(p for p in (base.provenance, bundle_table.get("provenance", ""), how) if p),
            networks=(*kept, spec), validation=_validation_without(dict(base.validation), replaced), ood=ood,
            **overrides,
        )
        if ood is not None:
            reference = base_dir / ood.file
    written = write_bundle(out_dir, manifest, models, licences, ood_reference=reference)
    return written, [n.name for n in replaced]
