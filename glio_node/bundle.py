"""Model bundles: a folder with ``manifest.toml`` and one Keras weights file per network.

Format 1 is documented in docs/model-bundle.md.  The life of a bundle:

- training calls ``write_bundle`` (saves the models, hashes them, writes the manifest last);
- the worker calls ``load_bundle``, which first ``verify_bundle``s every weights file against the
  SHA-256 in the manifest, and only then lets Keras deserialise anything (``safe_mode`` on);
- ``LoadedBundle.algorithm`` names the bundle in every output and in the audit trail; its
  ``sha256`` is the SHA-256 of the manifest file's bytes, which carry the weights' hashes, so it
  fingerprints the whole bundle.

Every record here is valid once built: ``Manifest``, ``NetworkSpec`` and ``HeadSpec`` check their
fields on construction and raise ``BundleError`` naming the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from glio_node.errors import BundleError
from glio_node.results import Algorithm, CodedClass

if TYPE_CHECKING:  # keras is imported lazily: reading a manifest must not pull in TensorFlow
    import keras

FORMAT = 1
"""The manifest format this glio-node reads and writes."""
MANIFEST_NAME = "manifest.toml"
TASKS = ("segmentation", "subtype", "mgmt", "egfr")
CLASSIFIER_TASKS = ("subtype", "mgmt", "egfr")
ACTIVATIONS = ("softmax",)
NORMALIZATIONS = ("scale_0_1", "imagenet", "reinhard", "macenko")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.keras$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_CODE = re.compile(r"^[^\\]{1,16}$")  # DICOM SH: up to 16 characters, no backslash


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_text(what: str, value: object, max_len: int | None = None) -> None:
    if not isinstance(value, str) or not value.strip():
        raise BundleError(f"{what} must be a non-empty string, got {value!r}")
    if max_len is not None and len(value) > max_len:
        raise BundleError(f"{what} {value!r} is {len(value)} characters long; at most {max_len} are allowed")


def _check_class(where: str, cls: object) -> None:
    if not isinstance(cls, CodedClass):
        raise BundleError(f"{where}: classes must be CodedClass records, got {type(cls).__name__}")
    if not isinstance(cls.name, str) or not re.match(r"^[a-z][a-z0-9_]*$", cls.name):
        raise BundleError(f"{where}: class name {cls.name!r} must be a lower-case identifier such as 'cellular_tumor'")
    if not isinstance(cls.code_value, str) or not _CODE.match(cls.code_value):
        raise BundleError(
            f"{where}: class {cls.name!r} code_value {cls.code_value!r} must be 1 to 16 characters (DICOM SH)"
        )
    _check_text(f"{where}: class {cls.name!r} coding_scheme_designator", cls.coding_scheme_designator, 16)
    _check_text(f"{where}: class {cls.name!r} code_meaning", cls.code_meaning, 64)


@dataclass(frozen=True)
class HeadSpec:
    """One output of a network: a task and its classes in output order."""

    task: str  # one of TASKS; also the key of the network's output dict
    classes: tuple[CodedClass, ...]  # index i is output channel i
    activation: str = "softmax"  # one of ACTIVATIONS
    indeterminate_below: float = 0.0  # classifier heads: the slide call is indeterminate below this top probability

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BundleError(f"head task {self.task!r} is unknown; allowed tasks: {', '.join(TASKS)}")
        object.__setattr__(self, "classes", tuple(self.classes))
        where = f"head {self.task!r}"
        if len(self.classes) < 2:
            raise BundleError(f"{where} has {len(self.classes)} class(es); a head needs at least 2")
        for cls in self.classes:
            _check_class(where, cls)
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise BundleError(f"{where}: class names repeat: {names}")
        codes = [(c.coding_scheme_designator, c.code_value) for c in self.classes]
        if len(set(codes)) != len(codes):
            raise BundleError(f"{where}: two classes share a coded concept: {codes}")
        if self.activation not in ACTIVATIONS:
            raise BundleError(
                f"{where}: activation {self.activation!r} is not supported; allowed: {', '.join(ACTIVATIONS)}"
            )
        if not _is_number(self.indeterminate_below) or not 0.0 <= self.indeterminate_below < 1.0:
            raise BundleError(f"{where}: indeterminate_below {self.indeterminate_below!r} must be a number in [0, 1)")
        if self.task == "segmentation" and self.indeterminate_below != 0.0:
            raise BundleError(
                f"{where}: indeterminate_below {self.indeterminate_below} applies to classifier heads only; "
                "set it to 0.0 for segmentation"
            )
        object.__setattr__(self, "indeterminate_below", float(self.indeterminate_below))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)


@dataclass(frozen=True)
class NetworkSpec:
    """One network of a bundle: its weights file and how to feed it."""

    name: str  # e.g. "regions"; unique in the bundle
    file: str  # weights file name inside the bundle folder, e.g. "regions.keras" (no directories)
    sha256: str | None  # lower-case hex SHA-256 of the file; None only before write_bundle hashes it
    tile_size: int  # input tile edge, px
    um_per_px: float  # pixel spacing the network expects, µm/px
    overlap: int  # px shared by neighbouring tiles; 0 for classifiers
    normalization: str  # one of NORMALIZATIONS; see normalize()
    heads: tuple[HeadSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise BundleError(
                f"network name {self.name!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        where = f"network {self.name!r}"
        if not isinstance(self.file, str) or not _FILE.match(self.file):
            raise BundleError(
                f"{where}: file {self.file!r} must be a plain file name inside the bundle ending in .keras "
                "(letters, digits, '.', '_', '-'; no directories)"
            )
        if self.sha256 is not None and (not isinstance(self.sha256, str) or not _SHA256.match(self.sha256)):
            raise BundleError(f"{where}: sha256 {self.sha256!r} must be 64 lower-case hexadecimal digits")
        if not _is_int(self.tile_size) or self.tile_size < 8:
            raise BundleError(f"{where}: tile_size {self.tile_size!r} px must be an integer of at least 8 px")
        if not _is_number(self.um_per_px) or not 0.01 <= self.um_per_px <= 1000:
            raise BundleError(f"{where}: um_per_px {self.um_per_px!r} must be a number between 0.01 and 1000 µm/px")
        object.__setattr__(self, "um_per_px", float(self.um_per_px))
        if not _is_int(self.overlap) or self.overlap < 0:
            raise BundleError(f"{where}: overlap {self.overlap!r} px must be a non-negative integer")
        if self.overlap >= self.tile_size:
            raise BundleError(
                f"{where}: overlap {self.overlap} px must be smaller than the tile, {self.tile_size} px"
            )
        if self.normalization not in NORMALIZATIONS:
            raise BundleError(
                f"{where}: normalization {self.normalization!r} is unknown; allowed: {', '.join(NORMALIZATIONS)}"
            )
        object.__setattr__(self, "heads", tuple(self.heads))
        if not self.heads:
            raise BundleError(f"{where} has no heads; a network needs at least one [[networks.heads]]")
        tasks = [h.task for h in self.heads]
        if len(set(tasks)) != len(tasks):
            raise BundleError(f"{where}: head tasks repeat: {tasks}")

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(h.task for h in self.heads)

    def head(self, task: str) -> HeadSpec:
        for h in self.heads:
            if h.task == task:
                return h
        raise KeyError(task)


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest.toml, parsed and checked."""

    name: str  # bundle name, e.g. "glio-demo"
    version: str  # bundle version, e.g. "0.1.0"
    uid: str  # DICOM UID of this bundle version (e.g. "2.25.<uuid as integer>")
    intended_use: str  # shown to users; a demo bundle must say DEMO
    is_demo: bool  # True for bundles trained on synthetic data
    provenance: str  # what it was trained on, how (command) and from which commit
    created: datetime  # timezone-aware creation time
    networks: tuple[NetworkSpec, ...]
    validation: Mapping[str, float] = field(default_factory=dict)  # held-out metrics, free-form keys
    format: int = FORMAT

    def __post_init__(self) -> None:
        if not _is_int(self.format) or self.format != FORMAT:
            raise BundleError(
                f"manifest format {self.format!r} is not supported by this glio-node (it reads format {FORMAT}); "
                "upgrade glio-node or re-export the bundle"
            )
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise BundleError(
                f"bundle name {self.name!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        _check_text("bundle version", self.version, 64)
        if not isinstance(self.uid, str) or len(self.uid) > 64 or not _UID.match(self.uid):
            raise BundleError(
                f"bundle uid {self.uid!r} must be a DICOM UID: at most 64 characters, digits and dots, "
                "no leading zeros, e.g. '2.25.<uuid as integer>'"
            )
        _check_text("bundle intended_use", self.intended_use)
        if not isinstance(self.is_demo, bool):
            raise BundleError(f"bundle is_demo must be true or false, got {self.is_demo!r}")
        if self.is_demo and "demo" not in self.intended_use.lower():
            raise BundleError(
                f"bundle intended_use {self.intended_use!r} must say DEMO when is_demo is true, "
                "so that every output shows it"
            )
        _check_text("bundle provenance", self.provenance)
        if not isinstance(self.created, datetime) or self.created.utcoffset() is None:
            raise BundleError(f"bundle created {self.created!r} must be a timezone-aware time, e.g. 2026-11-23T10:00:00Z")
        object.__setattr__(self, "networks", tuple(self.networks))
        if not self.networks:
            raise BundleError("the bundle has no networks; add at least one [[networks]] table")
        for kind, values in (("name", [n.name for n in self.networks]), ("file", [n.file for n in self.networks])):
            if len(set(values)) != len(values):
                raise BundleError(f"network {kind}s repeat across networks: {values}")
        seen: dict[str, str] = {}
        for network in self.networks:
            for task in network.tasks:
                if task in seen:
                    raise BundleError(
                        f"task {task!r} is produced by two networks, {seen[task]!r} and {network.name!r}; "
                        "each task must come from exactly one network"
                    )
                seen[task] = network.name
        checked: dict[str, float] = {}
        for key, value in dict(self.validation).items():
            if not isinstance(key, str) or not _NAME.match(key):
                raise BundleError(f"validation key {key!r} must be letters, digits, '.', '_' or '-'")
            if not _is_number(value):
                raise BundleError(f"validation value {key} = {value!r} must be a finite number")
            checked[key] = float(value)
        object.__setattr__(self, "validation", MappingProxyType(checked))

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for n in self.networks for t in n.tasks)

    def network_for(self, task: str) -> NetworkSpec:
        """The network that produces ``task``; KeyError if none does."""
        for network in self.networks:
            if task in network.tasks:
                return network
        raise KeyError(task)


# --- reading -----------------------------------------------------------------------------------


def _bundle_dir(path: str | os.PathLike[str]) -> Path:
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


def _manifest_from_toml(doc: Mapping[str, Any]) -> Manifest:
    _take(doc, "the manifest", ("format", "bundle", "networks"), ("validation",))
    if doc["format"] != FORMAT:  # checked first: a newer format may have a different layout
        raise BundleError(
            f"manifest format {doc['format']!r} is not supported by this glio-node (it reads format {FORMAT}); "
            "upgrade glio-node or re-export the bundle"
        )
    b = _take(
        doc["bundle"],
        "[bundle]",
        ("name", "version", "uid", "intended_use", "is_demo", "provenance", "created"),
    )
    if not isinstance(doc.get("validation", {}), Mapping):
        raise BundleError(f"[validation] must be a table of numbers, got {doc['validation']!r}")
    networks = []
    for i, n in enumerate(_list_of_tables(doc, "networks", "the manifest"), start=1):
        where = f"[[networks]] #{i}"
        _take(
            n,
            where,
            ("name", "file", "sha256", "tile_size", "um_per_px", "overlap", "normalization", "heads"),
        )
        heads = []
        for j, h in enumerate(_list_of_tables(n, "heads", where), start=1):
            hwhere = f"{where} ({n['name']!r}) [[networks.heads]] #{j}"
            _take(h, hwhere, ("task", "activation", "classes"), ("indeterminate_below",))
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
                )
            )
        networks.append(
            NetworkSpec(
                name=n["name"],
                file=n["file"],
                sha256=n["sha256"],
                tile_size=n["tile_size"],
                um_per_px=n["um_per_px"],
                overlap=n["overlap"],
                normalization=n["normalization"],
                heads=tuple(heads),
            )
        )
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
    )


def _read_manifest(path: str | os.PathLike[str]) -> tuple[Path, bytes, Manifest]:
    directory = _bundle_dir(path)
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
        if network.sha256 is None:  # pragma: no cover - the TOML layer requires the key
            raise BundleError(f"{manifest_path}: network {network.name!r} has no sha256; re-export the bundle")
        if not (directory / network.file).is_file():
            raise BundleError(
                f"weights file {network.file} of network {network.name!r} is missing from {directory}; "
                "re-copy the bundle or re-export it"
            )
    return directory, data, manifest


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and check a bundle's manifest.

    ``path`` is the bundle folder or its manifest.toml.  Checks the schema and that every weights
    file exists, but reads no weights.  Raises BundleError naming the file and the problem.
    """
    return _read_manifest(path)[2]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lower-case hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: str | os.PathLike[str]) -> tuple[Path, bytes, Manifest]:
    directory, data, manifest = _read_manifest(path)
    for network in manifest.networks:
        actual = sha256_file(directory / network.file)
        if actual != network.sha256:
            raise BundleError(
                f"weights file {network.file} in {directory} fails its SHA-256 check: manifest says "
                f"{network.sha256}, file has {actual}; the file is corrupt or was changed: re-copy the "
                "bundle or re-export it"
            )
    return directory, data, manifest


def verify_bundle(path: str | os.PathLike[str]) -> Manifest:
    """Read the manifest and check the SHA-256 of every weights file; deserialise nothing.

    Raises BundleError naming the file, the expected and the actual hash on a mismatch.
    """
    return _verify(path)[2]


# --- loading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedNetwork:
    """A network's spec and its Keras model (compile=False, ready for ``predict``)."""

    spec: NetworkSpec
    model: keras.Model


@dataclass(frozen=True)
class LoadedBundle:
    """A verified bundle with its models in memory."""

    path: Path  # the bundle folder
    manifest: Manifest
    manifest_sha256: str  # SHA-256 of manifest.toml's bytes: the bundle fingerprint
    networks: tuple[LoadedNetwork, ...]

    @property
    def algorithm(self) -> Algorithm:
        """The bundle as it is named in every output and in the audit trail."""
        m = self.manifest
        return Algorithm(
            name=m.name,
            version=m.version,
            sha256=self.manifest_sha256,
            intended_use=m.intended_use,
            is_demo=m.is_demo,
        )

    def network_for(self, task: str) -> LoadedNetwork:
        """The loaded network that produces ``task``; KeyError if none does."""
        for network in self.networks:
            if task in network.spec.tasks:
                return network
        raise KeyError(task)


def _check_model(spec: NetworkSpec, model: keras.Model) -> None:
    where = f"network {spec.name!r} ({spec.file})"
    inputs = model.inputs
    if len(inputs) != 1 or tuple(inputs[0].shape[1:]) != (spec.tile_size, spec.tile_size, 3):
        shapes = [tuple(i.shape) for i in inputs]
        raise BundleError(
            f"{where}: model input {shapes} does not match the manifest's tile, "
            f"(None, {spec.tile_size}, {spec.tile_size}, 3); re-export the bundle"
        )
    outputs = model.output
    if not isinstance(outputs, Mapping):
        raise BundleError(f"{where}: the model must output a dict keyed by task, got {type(outputs).__name__}")
    if set(outputs) != set(spec.tasks):
        raise BundleError(
            f"{where}: model outputs {sorted(outputs)} do not match the manifest's heads {sorted(spec.tasks)}"
        )
    for head in spec.heads:
        n = len(head.classes)
        expected = (spec.tile_size, spec.tile_size, n) if head.task == "segmentation" else (n,)
        actual = tuple(outputs[head.task].shape[1:])
        if actual != expected:
            raise BundleError(
                f"{where}: output {head.task!r} has shape {actual}, the manifest's head needs {expected}; "
                "re-export the bundle"
            )


def load_bundle(path: str | os.PathLike[str]) -> LoadedBundle:
    """Verify a bundle, then load its models with ``keras.saving.load_model(compile=False)``.

    Hashes are checked before any weights file is deserialised; Keras ``safe_mode`` stays on (no
    arbitrary code from a bundle runs).  Each model's input and output shapes are checked against
    its manifest entry.  Raises BundleError.
    """
    directory, data, manifest = _verify(path)
    import keras  # noqa: PLC0415 - heavy import, only once a bundle is really loaded

    loaded = []
    for spec in manifest.networks:
        try:
            model = keras.saving.load_model(directory / spec.file, compile=False, safe_mode=True)
        except (ValueError, TypeError, OSError) as exc:
            raise BundleError(
                f"weights file {spec.file} in {directory} passed its SHA-256 check but Keras cannot load it "
                f"({exc}); the bundle was exported by an incompatible Keras: re-export it"
            ) from exc
        _check_model(spec, model)
        loaded.append(LoadedNetwork(spec, model))
    return LoadedBundle(
        path=directory,
        manifest=manifest,
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        networks=tuple(loaded),
    )


def normalize(tiles: np.ndarray, normalization: str) -> np.ndarray:
    """RGB uint8 tiles (..., 3) -> float32 network input, as a manifest's ``normalization`` says.

    - ``scale_0_1``: x / 255;
    - ``imagenet``: (x / 255 - mean) / std with the ImageNet RGB mean and standard deviation;
    - ``reinhard``: Reinhard stain normalisation to glio_node.pipeline.stain's reference, then x / 255;
    - ``macenko``: Macenko stain normalisation to glio_node.pipeline.stain's reference H&E stain
      vectors and concentrations, then x / 255.
    """
    if normalization in ("reinhard", "macenko"):
        from glio_node.pipeline.stain import macenko, reinhard  # noqa: PLC0415 - pipeline imports bundle

        tiles = reinhard(tiles) if normalization == "reinhard" else macenko(tiles)
    x = np.asarray(tiles, dtype=np.float32) / np.float32(255.0)
    if normalization in ("scale_0_1", "reinhard", "macenko"):
        return x
    if normalization == "imagenet":
        return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    raise ValueError(f"normalization {normalization!r} is unknown; allowed: {', '.join(NORMALIZATIONS)}")


# --- writing ---------------------------------------------------------------------------------------


def _class_to_toml(c: CodedClass) -> dict[str, str]:
    return {
        "name": c.name,
        "code_value": c.code_value,
        "coding_scheme_designator": c.coding_scheme_designator,
        "code_meaning": c.code_meaning,
    }


def manifest_to_toml(manifest: Manifest) -> str:
    """The manifest as TOML text (format 1); every network must carry its sha256."""
    import tomli_w  # noqa: PLC0415 - only needed when writing bundles

    for n in manifest.networks:
        if n.sha256 is None:
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
        "networks": [
            {
                "name": n.name,
                "file": n.file,
                "sha256": n.sha256,
                "tile_size": n.tile_size,
                "um_per_px": n.um_per_px,
                "overlap": n.overlap,
                "normalization": n.normalization,
                "heads": [
                    {
                        "task": h.task,
                        "activation": h.activation,
                        "indeterminate_below": h.indeterminate_below,
                        "classes": [_class_to_toml(c) for c in h.classes],
                    }
                    for h in n.heads
                ],
            }
            for n in manifest.networks
        ],
        "validation": dict(manifest.validation),
    }
    header = (
        f"# glio-node model bundle manifest, format {FORMAT} (docs/model-bundle.md).\n"
        "# Written by glio_node.bundle.write_bundle: edit nothing by hand, the sha256 fields and the\n"
        "# bundle fingerprint (SHA-256 of this file) would no longer match what was validated.\n"
    )
    return header + tomli_w.dumps(doc)


def _inference_copy(model: keras.Model) -> keras.Model:
    """The model without optimizer state (a trained model's .keras would carry Adam's moments, 3x).

    Rebuilt from its config: ``keras.models.clone_model`` would copy the compiled optimizer too.
    """
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def write_bundle(
    out_dir: str | os.PathLike[str],
    manifest: Manifest,
    models: Mapping[str, keras.Model],
) -> Manifest:
    """Save ``models`` (network name -> Keras model) as a bundle in ``out_dir``.

    ``manifest`` gives everything but the hashes (its networks' ``sha256`` may be None and are
    ignored): each model is saved, without optimizer state, to its network's ``file`` with
    ``model.save``, hashed, and the
    manifest is written with the hashes.  The bundle is assembled in a temporary folder beside
    ``out_dir`` and moved into place at the end, replacing any previous bundle there, so a reader
    never sees a manifest that names weights from another run.  Returns the manifest as
    ``verify_bundle`` reads it back.  Raises BundleError if models and networks do not match.
    """
    out_dir = Path(out_dir)
    names = {n.name for n in manifest.networks}
    if set(models) != names:
        raise BundleError(f"models {sorted(models)} do not match the manifest's networks {sorted(names)}")
    for spec in manifest.networks:
        _check_model(spec, models[spec.name])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is read by the service user too
    try:
        networks = []
        for spec in manifest.networks:
            target = staging / spec.file
            _inference_copy(models[spec.name]).save(target)
            networks.append(replace(spec, sha256=sha256_file(target)))
        final = replace(manifest, networks=tuple(networks))
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
