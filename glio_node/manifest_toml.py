"""A bundle's ``manifest.toml``: parsed into a ``Manifest`` (checking that its files exist), and rendered back.

Parsing refuses unknown and missing keys with the table they are in; the records' own checks
(glio_node/manifest.py) do the rest.  Reading opens no weights file: that is
glio_node/bundle_verify.py (hashes) and glio_node/runtime/loading.py (deserialisation).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from glio_node.errors import BundleError
from glio_node.manifest import (
    FORMAT,
    MANIFEST_NAME,
    READABLE_FORMATS,
    HeadSpec,
    Manifest,
    NetworkOrigin,
    NetworkSpec,
    OodSpec,
    TensorSpec,
    WeightsFile,
    _is_int,
)
from glio_node.results import CodedClass

# --- reading -----------------------------------------------------------------------------------


def bundle_dir(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.parent if path.name == MANIFEST_NAME else path


def _take(table: Mapping[str, Any], where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    if not isinstance(table, Mapping):
        raise BundleError(f"{where} must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - set(required) - set(optional))
    if unknown:
        raise BundleError(f"{where} has unknown key(s) {unknown}; allowed: {sorted(required + optional)}")
    missing = [k for k in required if k not in table]
    if missing:
        raise BundleError(f"{where} lacks required key(s) {missing}")
    return table


def _list_of_tables(table: Mapping[str, Any], key: str, where: str) -> list:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise BundleError(f"{where}: {key} must be an array of tables ([[{key}]]), got {type(value).__name__}")
    return value


def _parse_created(value: object) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    raise BundleError(f"[bundle] created {value!r} must be an ISO 8601 time with a zone, e.g. 2026-11-23T10:00:00Z")


_NETWORK_KEYS = ("name", "file", "sha256", "tile_size", "um_per_px", "overlap", "normalization", "heads")
_NETWORK_KEYS_2 = ("kind", "input", "layout", "origin", "features")  # format 2 only, optional (runtime is required)
_GEOMETRY_KEYS = ("tile_size", "um_per_px", "overlap", "normalization")  # an aggregator has none
_ENCODER_KEYS = ("embed_dim",)  # required of encoders; "output" optional (onnx)
_AGGREGATOR_KEYS = ("embed_dim", "encoder")  # required of aggregators; "attention", "folds" optional


def _tensor_from_toml(table: object, where: str) -> TensorSpec:
    _take(table, where, ("name", "shape", "dtype"))  # type: ignore[arg-type]
    try:
        return TensorSpec(table["name"], table["shape"], table["dtype"])  # type: ignore[index]
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from None


def network_from_toml(
    n: Mapping[str, Any], where: str, fmt: int = FORMAT, hashed: bool = True
) -> NetworkSpec:
    """One ``[[networks]]`` table -> NetworkSpec; format 1 tables know no runtime, kind, signature or origin.

    ``hashed=False`` (``glio-node models import`` reading an operator's network table) lets
    ``sha256`` and the origin's ``licence_sha256`` be absent.  Raises BundleError naming ``where``.
    """
    required = _NETWORK_KEYS if hashed else tuple(k for k in _NETWORK_KEYS if k != "sha256")
    required += ("runtime",) if fmt >= 2 else ()
    optional = (() if hashed else ("sha256",)) + (_NETWORK_KEYS_2 if fmt >= 2 else ())
    kind = n.get("kind", "tiles") if fmt >= 2 and isinstance(n, Mapping) else "tiles"
    if kind == "encoder":
        required = tuple(k for k in required if k != "heads") + _ENCODER_KEYS
        optional += ("output",)
    elif kind == "aggregator":
        required = tuple(k for k in required if k not in _GEOMETRY_KEYS) + _AGGREGATOR_KEYS
        optional += ("attention", "folds")
        if isinstance(n, Mapping) and "folds" in n:  # k fold models replace the one file
            required = tuple(k for k in required if k not in ("file", "sha256"))
            optional = tuple(k for k in optional if k != "sha256")
    _take(n, where, required, optional)
    folds = []
    for j, f in enumerate(n.get("folds", []) if isinstance(n.get("folds", []), list) else [None], start=1):
        fwhere = f"{where} ({n['name']!r}) folds #{j}"
        _take(f, fwhere, ("file", "sha256") if hashed else ("file",), () if hashed else ("sha256",))
        folds.append(WeightsFile(f["file"], f.get("sha256")))
    if "folds" in n and ("file" in n or "sha256" in n):
        raise BundleError(f"{where} ({n['name']!r}): give either file and sha256 or folds, not both")
    heads = []
    for j, h in enumerate(_list_of_tables(n, "heads", where), start=1):
        hwhere = f"{where} ({n['name']!r}) [[networks.heads]] #{j}"
        _take(h, hwhere, ("task", "activation", "classes"),
              ("indeterminate_below",) + (("output", "temperature", "max_fold_spread") if fmt >= 2 else ()))
        classes = []
        for k, c in enumerate(_list_of_tables(h, "classes", hwhere), start=1):
            _take(
                c,
                f"{hwhere} [[networks.heads.classes]] #{k}",
                ("name", "code_value", "coding_scheme_designator", "code_meaning"),
            )
            classes.append(CodedClass(c["name"], c["code_value"], c["coding_scheme_designator"], c["code_meaning"]))
        heads.append(
            HeadSpec(
                task=h["task"],
                classes=tuple(classes),
                activation=h["activation"],
                indeterminate_below=h.get("indeterminate_below", 0.0),
                output=_tensor_from_toml(h["output"], f"{hwhere} output") if "output" in h else None,
                temperature=h.get("temperature"),
                max_fold_spread=h.get("max_fold_spread", 1.0),
            )
        )
    origin = None
    if "origin" in n:
        owhere = f"{where} ({n['name']!r}) [networks.origin]"
        o = _take(n["origin"], owhere, ("source", "licence", "licence_name") + (("licence_sha256",) if hashed else ()),
                  () if hashed else ("licence_sha256",))
        try:
            origin = NetworkOrigin(o["source"], o["licence"], o.get("licence_sha256"), o["licence_name"])
        except BundleError as exc:
            raise BundleError(f"{owhere}: {exc}") from None
    first = folds[0] if folds else WeightsFile(n["file"], n.get("sha256"))
    return NetworkSpec(
        name=n["name"],
        file=first.file,
        sha256=first.sha256,
        tile_size=n.get("tile_size"),
        um_per_px=n.get("um_per_px"),
        overlap=n.get("overlap"),
        normalization=n.get("normalization"),
        heads=tuple(heads),
        runtime=n.get("runtime", "keras"),
        kind=kind,
        input=_tensor_from_toml(n["input"], f"{where} ({n['name']!r}) input") if "input" in n else None,
        layout=n.get("layout", "nhwc"),
        origin=origin,
        embed_dim=n.get("embed_dim"),
        output=_tensor_from_toml(n["output"], f"{where} ({n['name']!r}) output") if "output" in n else None,
        encoder=n.get("encoder"),
        attention=_tensor_from_toml(n["attention"], f"{where} ({n['name']!r}) attention") if "attention" in n else None,
        folds=tuple(folds),
        features=_tensor_from_toml(n["features"], f"{where} ({n['name']!r}) features") if "features" in n else None,
    )


def _manifest_from_toml(doc: Mapping[str, Any]) -> Manifest:
    _take(doc, "the manifest", ("format", "bundle", "networks"), ("validation", "ood"))
    fmt = doc["format"]
    if not _is_int(fmt) or fmt not in READABLE_FORMATS:  # checked first: a newer format may have a different layout
        raise BundleError(
            f"manifest format {fmt!r} is not supported by this glio-node (it reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}); upgrade glio-node or re-export the bundle"
        )
    b = _take(
        doc["bundle"],
        "[bundle]",
        ("name", "version", "uid", "intended_use", "is_demo", "provenance", "created"),
    )
    if not isinstance(doc.get("validation", {}), Mapping):
        raise BundleError(f"[validation] must be a table of numbers, got {doc['validation']!r}")
    networks = [
        network_from_toml(n, f"[[networks]] #{i}", fmt)
        for i, n in enumerate(_list_of_tables(doc, "networks", "the manifest"), start=1)
    ]
    return Manifest(
        name=b["name"],
        version=b["version"],
        uid=b["uid"],
        intended_use=b["intended_use"],
        is_demo=b["is_demo"],
        provenance=b["provenance"],
        created=_parse_created(b["created"]),
        networks=tuple(networks),
        validation=doc.get("validation", {}),
        format=doc["format"],
        ood=_ood_from_toml(doc["ood"]) if "ood" in doc else None,
    )


_OOD_KEYS = ("network", "features", "file", "sha256", "slide_threshold")
_OOD_OPTIONAL = ("statistic", "quantile", "margin", "validation_slides", "slide_threshold_low")


def _ood_from_toml(table: object) -> OodSpec:
    t = _take(table, "[ood]", _OOD_KEYS, _OOD_OPTIONAL)  # type: ignore[arg-type]
    return OodSpec(**{k: t[k] for k in _OOD_KEYS + _OOD_OPTIONAL if k in t})


def read_manifest(path: str | os.PathLike[str]) -> tuple[Path, bytes, Manifest]:
    directory = bundle_dir(path)
    manifest_path = directory / MANIFEST_NAME
    try:
        data = manifest_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(
            f"no {MANIFEST_NAME} in {directory}: not a model bundle folder; point at models/<name>/ "
            "or re-copy the bundle"
        ) from None
    except OSError as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc.strerror}; check the path and its permissions") from exc
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid TOML ({exc}); re-copy or re-export the bundle") from exc
    try:
        manifest = _manifest_from_toml(doc)
    except BundleError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    for network in manifest.networks:
        for weights in network.weights:
            if weights.sha256 is None:  # pragma: no cover - the TOML layer requires the key
                raise BundleError(f"{manifest_path}: network {network.name!r} has no sha256; re-export the bundle")
            if not (directory / weights.file).is_file():
                raise BundleError(
                    f"weights file {weights.file} of network {network.name!r} is missing from {directory}; "
                    "re-copy the bundle or re-export it"
                )
        if network.origin is not None and not (directory / network.origin.licence_file).is_file():
            raise BundleError(
                f"licence file {network.origin.licence_file} of network {network.name!r} is missing from "
                f"{directory}; re-copy the bundle or import the network again"
            )
    if manifest.ood is not None and not (directory / manifest.ood.file).is_file():
        raise BundleError(
            f"OOD reference file {manifest.ood.file} is missing from {directory}; re-copy the bundle or "
            "fit it again with `python -m training fit-ood`"
        )
    return directory, data, manifest


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and check a bundle's manifest.

    ``path`` is the bundle folder or its manifest.toml.  Checks the schema and that every weights
    file exists, but reads no weights.  Raises BundleError naming the file and the problem.
    """
    return read_manifest(path)[2]



# --- writing ---------------------------------------------------------------------------------------


def _class_to_toml(c: CodedClass) -> dict[str, str]:
    return {
        "name": c.name,
        "code_value": c.code_value,
        "coding_scheme_designator": c.coding_scheme_designator,
        "code_meaning": c.code_meaning,
    }


def _tensor_to_toml(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}


def _network_to_toml(n: NetworkSpec, fmt: int) -> dict[str, Any]:
    table: dict[str, Any] = {"name": n.name}
    if fmt >= 2:
        table["runtime"] = n.runtime
        table["kind"] = n.kind
    if n.folds:
        table["folds"] = [{"file": w.file, "sha256": w.sha256} for w in n.folds]
    else:
        table.update(file=n.file, sha256=n.sha256)
    if n.kind != "aggregator":
        table.update(tile_size=n.tile_size, um_per_px=n.um_per_px, overlap=n.overlap, normalization=n.normalization)
    else:
        table["encoder"] = n.encoder
    if n.embed_dim is not None:
        table["embed_dim"] = n.embed_dim
    if n.input is not None:
        if n.kind != "aggregator":
            table["layout"] = n.layout
        table["input"] = _tensor_to_toml(n.input)
    if n.output is not None:
        table["output"] = _tensor_to_toml(n.output)
    if n.attention is not None:
        table["attention"] = _tensor_to_toml(n.attention)
    if n.features is not None:
        table["features"] = _tensor_to_toml(n.features)
    if n.origin is not None:
        table["origin"] = {
            "source": n.origin.source,
            "licence": n.origin.licence_file,
            "licence_sha256": n.origin.licence_sha256,
            "licence_name": n.origin.licence_name,
        }
    heads = []
    for h in n.heads:
        head: dict[str, Any] = {"task": h.task, "activation": h.activation, "indeterminate_below": h.indeterminate_below}
        if h.temperature is not None:  # Manifest allows it in format 2 only
            head["temperature"] = h.temperature
        if h.max_fold_spread != 1.0:
            head["max_fold_spread"] = h.max_fold_spread
        if h.output is not None:
            head["output"] = _tensor_to_toml(h.output)
        head["classes"] = [_class_to_toml(c) for c in h.classes]
        heads.append(head)
    if n.kind != "encoder":
        table["heads"] = heads
    return table


def manifest_to_toml(manifest: Manifest) -> str:
    """The manifest as TOML text, in the manifest's format (1 or 2); every file must carry its sha256."""
    import tomli_w  # noqa: PLC0415 - only needed when writing bundles

    for n in manifest.networks:
        if any(w.sha256 is None for w in n.weights) or (n.origin is not None and n.origin.licence_sha256 is None):
            raise BundleError(f"network {n.name!r} has no sha256; write the bundle with write_bundle")
    created = manifest.created.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    doc: dict[str, Any] = {
        "format": manifest.format,
        "bundle": {
            "name": manifest.name,
            "version": manifest.version,
            "uid": manifest.uid,
            "intended_use": manifest.intended_use,
            "is_demo": manifest.is_demo,
            "provenance": manifest.provenance,
            "created": created,
        },
        "networks": [_network_to_toml(n, manifest.format) for n in manifest.networks],
        "validation": dict(manifest.validation),
    }
    if manifest.ood is not None:
        if manifest.ood.sha256 is None:
            raise BundleError("the [ood] reference has no sha256; write the bundle with write_bundle")
        o = manifest.ood
        doc["ood"] = {
            "network": o.network, "features": o.features, "file": o.file, "sha256": o.sha256,
            "slide_threshold": o.slide_threshold, "slide_threshold_low": o.slide_threshold_low, "statistic": o.statistic, "quantile": o.quantile,
            "margin": o.margin, "validation_slides": o.validation_slides,
        }
    header = (
        f"# glio-node model bundle manifest, format {manifest.format} (docs/model-bundle.md).\n"
        "# Written by glio_node.bundle.write_bundle: edit nothing by hand, the sha256 fields and the\n"
        "# bundle fingerprint (SHA-256 of this file) would no longer match what was validated.\n"
    )
    return header + tomli_w.dumps(doc)

