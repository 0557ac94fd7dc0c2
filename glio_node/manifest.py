"""The model bundle's manifest as records: what a bundle holds, each record valid once built.

``Manifest``, ``NetworkSpec``, ``HeadSpec``, ``TensorSpec``, ``NetworkOrigin`` and ``OodSpec``
check their fields on construction and raise ``BundleError`` naming the bad value and what is
allowed, so a record that exists is one the worker can run.  Formats 1 and 2 are documented in
docs/model-bundle.md; reading and writing the TOML is glio_node/manifest_toml.py, checking the
files' hashes glio_node/bundle_verify.py, loading the networks glio_node/runtime/loading.py.
Nothing here imports Keras, TensorFlow or ONNX Runtime: reading a manifest must stay cheap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from glio_node.errors import BundleError
from glio_node.results import CodedClass, ValidationEvidence

FORMAT = 2
"""The manifest format this glio-node writes."""
READABLE_FORMATS = (1, 2)
"""The manifest formats this glio-node reads (format 1: Keras networks only, no runtime key)."""
MANIFEST_NAME = "manifest.toml"
TASKS = ("segmentation", "subtype", "mgmt", "egfr")
CLASSIFIER_TASKS = ("subtype", "mgmt", "egfr")
ACTIVATIONS = ("softmax", "logits")  # what a head outputs; logits (format 2, onnx only): the runner applies softmax
RUNTIMES = ("keras", "onnx")
SUFFIXES = {"keras": ".keras", "onnx": ".onnx"}  # a weights file's name ends as its runtime says
KINDS = ("tiles", "encoder", "aggregator")
# tiles: tile in, segmentation and/or classifier heads out (the only kind of format 1);
# encoder: tile in, one embedding vector (embed_dim) out, no heads (format 2);
# aggregator: a slide's bag of its encoder's embeddings in, one slide-level head out, plus one
# attention weight per tile; may hold k fold models whose probabilities are averaged (format 2).
DTYPES = ("float32", "float16")  # of an ONNX network's input and outputs
LAYOUTS = ("nhwc", "nchw")  # of an ONNX network's tile input (and segmentation outputs)
MAX_SOURCE = 512  # characters of a network origin's source text
NORMALIZATIONS = ("scale_0_1", "imagenet", "reinhard", "macenko")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TENSOR_NAME = re.compile(r"^[^\s,=\\]{1,128}$")  # ONNX value names as exporters write them (':' and '/' too)
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


def _same_dims(shape: tuple, expected: tuple) -> bool:
    """Equal rank and fixed sizes; a name (dynamic dimension) where ``expected`` has one."""
    return len(shape) == len(expected) and all(
        isinstance(a, str) if isinstance(b, str) else a == b for a, b in zip(shape, expected)
    )


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
class TensorSpec:
    """One input or output of an ONNX graph as the manifest declares it (format 2).

    ``shape`` holds an int for a fixed dimension and a string for a dynamic one (e.g. "batch");
    the string is a label only: any symbolic or unknown dimension of the graph matches it, a
    fixed one does not.  ``str(spec)`` is how messages show it: ``tiles float32[batch, 320, 320, 3]``.
    """

    name: str  # the graph's value name, e.g. "tiles"
    shape: tuple[int | str, ...]
    dtype: str  # one of DTYPES

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TENSOR_NAME.match(self.name):
            raise BundleError(
                f"tensor name {self.name!r} must be 1 to 128 characters without spaces, ',', '=' or '\\'"
            )
        if not isinstance(self.shape, (list, tuple)) or not self.shape:
            raise BundleError(f"tensor {self.name!r}: shape {self.shape!r} must be a non-empty array")
        object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            if not ((_is_int(dim) and dim >= 1) or (isinstance(dim, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", dim))):
                raise BundleError(
                    f"tensor {self.name!r}: dimension {dim!r} of shape {list(self.shape)} must be a positive "
                    "integer or a name such as \"batch\" for a dynamic dimension"
                )
        if self.dtype not in DTYPES:
            raise BundleError(f"tensor {self.name!r}: dtype {self.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")

    def __str__(self) -> str:
        return f"{self.name} {self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class NetworkOrigin:
    """Where a network we did not train came from, and its licence (format 2 ``[networks.origin]``).

    Written by ``glio-node models import``; named in every output's algorithm identification.
    """

    source: str  # free text: who made it, where and when it was obtained, its version
    licence_file: str  # plain file name in the bundle folder holding the licence text
    licence_sha256: str | None  # SHA-256 of that file; None only before write_bundle hashes it
    licence_name: str  # short name shown in outputs, e.g. "Apache-2.0" or the licence's title line

    def __post_init__(self) -> None:
        _check_text("origin source", self.source, MAX_SOURCE)
        if "\\" in self.source:
            raise BundleError(f"origin source {self.source!r} must not contain a backslash (DICOM text)")
        if not isinstance(self.licence_file, str) or not _FILE.match(self.licence_file):
            raise BundleError(
                f"origin licence file {self.licence_file!r} must be a plain file name inside the bundle "
                "(letters, digits, '.', '_', '-'; no directories)"
            )
        if self.licence_sha256 is not None and (
            not isinstance(self.licence_sha256, str) or not _SHA256.match(self.licence_sha256)
        ):
            raise BundleError(f"origin licence_sha256 {self.licence_sha256!r} must be 64 lower-case hexadecimal digits")
        _check_text("origin licence_name", self.licence_name, 64)
        if "\\" in self.licence_name:
            raise BundleError(f"origin licence_name {self.licence_name!r} must not contain a backslash (DICOM text)")


@dataclass(frozen=True)
class HeadSpec:
    """One output of a network: a task and its classes in output order.

    ``max_fold_spread`` (aggregator heads with k >= 2 folds): the call is indeterminate when the
    folds' top-class probabilities spread (max - min) by more than this; 1.0 never.
    """

    task: str  # one of TASKS; also the key of the network's output dict
    classes: tuple[CodedClass, ...]  # index i is output channel i
    activation: str = "softmax"  # one of ACTIVATIONS
    indeterminate_below: float = 0.0  # classifier heads: the slide call is indeterminate below this top probability
    output: TensorSpec | None = None  # format 2, ONNX networks: the graph output that carries this head
    temperature: float | None = None  # format 2, classifier heads: fitted temperature; None (absent): 1.0, not calibrated
    max_fold_spread: float = 1.0  # format 2, aggregator heads: indeterminate above this fold spread

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
        if self.temperature is not None:
            if not _is_number(self.temperature) or not 0.0 < self.temperature < math.inf:
                raise BundleError(f"{where}: temperature {self.temperature!r} must be a finite number greater than 0")
            if self.task == "segmentation":
                raise BundleError(f"{where}: temperature {self.temperature} applies to classifier heads only; leave it out")
            object.__setattr__(self, "temperature", float(self.temperature))
        if not _is_number(self.max_fold_spread) or not 0.0 < self.max_fold_spread <= 1.0:
            raise BundleError(f"{where}: max_fold_spread {self.max_fold_spread!r} must be a number in (0, 1]")
        object.__setattr__(self, "max_fold_spread", float(self.max_fold_spread))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)


@dataclass(frozen=True)
class WeightsFile:
    """One weights file of a network with k fold models (format 2 ``folds = [{file, sha256}, ...]``)."""

    file: str  # plain file name in the bundle folder
    sha256: str | None  # None only before write_bundle hashes it


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
    runtime: str = "keras"  # one of RUNTIMES; format 1 networks are all keras
    kind: str = "tiles"  # one of KINDS
    input: TensorSpec | None = None  # ONNX networks: the graph's one input (required); keras: None
    layout: str = "nhwc"  # ONNX networks: channels last (nhwc) or first (nchw, PyTorch's) for tiles and label maps
    origin: NetworkOrigin | None = None  # networks we did not train: source and licence
    embed_dim: int | None = None  # encoder: D of its embeddings; aggregator: D of the bag it reads
    output: TensorSpec | None = None  # ONNX encoders: the graph output carrying the embeddings (batch, D)
    encoder: str | None = None  # aggregator: the name of the encoder network whose embeddings it reads
    attention: TensorSpec | None = None  # ONNX aggregators: the graph output carrying the attention (1, bag) or (bag,)
    folds: tuple[WeightsFile, ...] = ()  # aggregator with k >= 2 fold models; then file/sha256 are folds[0]'s
    features: TensorSpec | None = None  # ONNX tiles networks: an extra graph output (batch, D), the OOD gate's features

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise BundleError(
                f"network name {self.name!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        where = f"network {self.name!r}"
        if self.runtime not in RUNTIMES:
            raise BundleError(f"{where}: runtime {self.runtime!r} is unknown; allowed: {', '.join(RUNTIMES)}")
        suffix = SUFFIXES[self.runtime]
        if self.kind not in KINDS:
            raise BundleError(f"{where}: kind {self.kind!r} is unknown; allowed: {', '.join(KINDS)}")
        object.__setattr__(self, "folds", tuple(self.folds))
        if self.folds:
            if self.kind != "aggregator" or len(self.folds) < 2:
                raise BundleError(
                    f"{where}: folds are for aggregator networks with 2 or more fold models; "
                    f"this {self.kind} network lists {len(self.folds)}: give one file instead"
                )
            if (self.file, self.sha256) != (self.folds[0].file, self.folds[0].sha256):
                raise BundleError(f"{where}: file and sha256 of a network with folds must be its first fold's")
        for weights in self.weights:
            if not isinstance(weights.file, str) or not _FILE.match(weights.file) or not weights.file.endswith(suffix):
                raise BundleError(
                    f"{where}: file {weights.file!r} must be a plain file name inside the bundle ending in {suffix} "
                    f"for runtime {self.runtime!r} (letters, digits, '.', '_', '-'; no directories)"
                )
            if weights.sha256 is not None and (not isinstance(weights.sha256, str) or not _SHA256.match(weights.sha256)):
                raise BundleError(f"{where}: sha256 {weights.sha256!r} must be 64 lower-case hexadecimal digits")
        if self.kind != "tiles":
            if self.features is not None:
                raise BundleError(
                    f"{where}: features (an OOD feature output) is for onnx tiles networks; an {self.kind} "
                    "network's gate reads its embeddings ([ood] features = \"embeddings\"): remove it"
                )
            self._check_two_stage(where)
            return
        if self.embed_dim is not None or self.encoder is not None or self.output is not None or self.attention is not None:
            raise BundleError(
                f"{where}: embed_dim, encoder, output and attention are for encoder and aggregator networks; "
                "a tiles network has heads: remove them"
            )
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
        if self.layout not in LAYOUTS:
            raise BundleError(f"{where}: layout {self.layout!r} is unknown; allowed: {', '.join(LAYOUTS)}")
        if self.origin is not None and not isinstance(self.origin, NetworkOrigin):
            raise BundleError(f"{where}: origin must be a NetworkOrigin, got {type(self.origin).__name__}")
        if self.runtime != "onnx" and any(h.activation != "softmax" for h in self.heads):
            raise BundleError(
                f"{where}: activation 'logits' is for onnx networks (PyTorch graphs often end before the "
                "softmax); a keras network's heads must output softmax probabilities"
            )
        if self.runtime == "onnx":
            self._check_signature(where)
        elif self.input is not None or self.layout != "nhwc" or any(h.output is not None for h in self.heads) or self.features is not None:
            raise BundleError(
                f"{where}: input, layout and head outputs are declared for onnx networks only (and features); a keras "
                "network's saved model carries its own signature (its [ood] features name a layer): remove them"
            )

    def _check_geometry(self, where: str) -> None:
        if not _is_int(self.tile_size) or self.tile_size < 8:
            raise BundleError(f"{where}: tile_size {self.tile_size!r} px must be an integer of at least 8 px")
        if not _is_number(self.um_per_px) or not 0.01 <= self.um_per_px <= 1000:
            raise BundleError(f"{where}: um_per_px {self.um_per_px!r} must be a number between 0.01 and 1000 µm/px")
        object.__setattr__(self, "um_per_px", float(self.um_per_px))
        if self.normalization not in NORMALIZATIONS:
            raise BundleError(
                f"{where}: normalization {self.normalization!r} is unknown; allowed: {', '.join(NORMALIZATIONS)}"
            )
        if self.layout not in LAYOUTS:
            raise BundleError(f"{where}: layout {self.layout!r} is unknown; allowed: {', '.join(LAYOUTS)}")

    def _check_two_stage(self, where: str) -> None:
        """An encoder (tile -> embedding) or an aggregator (bag -> one slide head + attention)."""
        if not _is_int(self.embed_dim) or self.embed_dim < 1:
            raise BundleError(f"{where}: an {self.kind} network needs embed_dim, a positive integer; got {self.embed_dim!r}")
        if self.origin is not None and not isinstance(self.origin, NetworkOrigin):
            raise BundleError(f"{where}: origin must be a NetworkOrigin, got {type(self.origin).__name__}")
        object.__setattr__(self, "heads", tuple(self.heads))
        onnx = self.runtime == "onnx"
        d = self.embed_dim
        if self.kind == "encoder":
            self._check_geometry(where)
            if self.overlap != 0:
                raise BundleError(f"{where}: overlap {self.overlap!r} px must be 0 for an encoder (tiles do not overlap)")
            if self.heads or self.encoder is not None or self.attention is not None:
                raise BundleError(
                    f"{where}: an encoder has no heads, encoder or attention; its embeddings go to the "
                    "aggregator networks that name it"
                )
            t = self.tile_size
            image = ("batch", t, t, 3) if self.layout == "nhwc" else ("batch", 3, t, t)
            if not onnx:
                if self.input is not None or self.output is not None or self.layout != "nhwc":
                    raise BundleError(f"{where}: input, output and layout are declared for onnx networks only: remove them")
                return
            for what, tensor, shape in (("input", self.input, image), ("output", self.output, ("batch", d))):
                if not isinstance(tensor, TensorSpec) or not _same_dims(tensor.shape, shape):
                    raise BundleError(
                        f"{where}: an onnx encoder must declare its graph {what} of shape {list(shape)}, e.g. "
                        f"{what} = {{ name = \"{'tiles' if what == 'input' else 'embeddings'}\", shape = {list(shape)}, "
                        f"dtype = \"float32\" }}; got {tensor}"
                    )
            if self.input.name == self.output.name:
                raise BundleError(f"{where}: input and output names repeat: {self.input.name!r}")
            return
        # aggregator
        if any(v is not None for v in (self.tile_size, self.um_per_px, self.overlap, self.normalization)):
            raise BundleError(
                f"{where}: an aggregator has no tile geometry (tile_size, um_per_px, overlap, normalization): "
                "it reads its encoder's embeddings; remove them"
            )
        if not isinstance(self.encoder, str) or not _NAME.match(self.encoder):
            raise BundleError(f"{where}: an aggregator must name the encoder it reads: encoder = \"<network name>\"; got {self.encoder!r}")
        if len(self.heads) != 1 or self.heads[0].task == "segmentation":
            raise BundleError(
                f"{where}: an aggregator has exactly one slide-level head (one of {', '.join(CLASSIFIER_TASKS)}); "
                f"got {[h.task for h in self.heads]}"
            )
        head = self.heads[0]
        if head.max_fold_spread != 1.0 and not self.folds:
            raise BundleError(
                f"{where}: max_fold_spread {head.max_fold_spread} applies to heads with 2 or more folds; "
                "list the fold models in folds or remove it"
            )
        if not onnx:
            if self.input is not None or self.attention is not None or head.output is not None or self.output is not None:
                raise BundleError(f"{where}: input, output and attention are declared for onnx networks only: remove them")
            if head.activation != "softmax":
                raise BundleError(f"{where}: activation 'logits' is for onnx networks; a keras aggregator outputs softmax")
            return
        n = len(head.classes)
        if self.output is not None:
            raise BundleError(f"{where}: an aggregator's probabilities are its head's output; remove the network's output")
        # Two forms: batched, one slide per call (input [1, "bag", D] -> [1, C], [1, "bag"]: STAMP's
        # and our export), or bag-only (["bag", D] -> [C], ["bag"]: TRIDENT-style heads); the
        # input's rank says which, and the outputs must be of the same form.
        batched = not (isinstance(self.input, TensorSpec) and len(self.input.shape) == 2)
        for what, tensor, shape in (
            ("input", self.input, (1, "bag", d)),
            ("head output", head.output, (1, n)),
            ("attention", self.attention, (1, "bag")),
        ):
            if batched:
                ok = isinstance(tensor, TensorSpec) and len(tensor.shape) == len(shape) and (
                    tensor.shape[0] == 1 or isinstance(tensor.shape[0], str)
                ) and _same_dims(tensor.shape[1:], shape[1:])
                form = f"{list(shape)} (the first dimension 1 or dynamic, the bag dynamic)"
            else:
                ok = isinstance(tensor, TensorSpec) and _same_dims(tensor.shape, shape[1:])
                form = f"{list(shape[1:])} (the bag dynamic), as the input {list(self.input.shape)} has no slide dimension"
            if not ok:
                raise BundleError(f"{where}: an onnx aggregator must declare its graph {what} of shape {form}; got {tensor}")
        names = [self.input.name, head.output.name, self.attention.name]
        if len(set(names)) != len(names):
            raise BundleError(f"{where}: input and output names repeat: {names}")

    def _check_signature(self, where: str) -> None:
        """An ONNX network's declared signature must be the one its geometry and heads imply."""
        t = self.tile_size
        image = ("batch", t, t, 3) if self.layout == "nhwc" else ("batch", 3, t, t)
        if not isinstance(self.input, TensorSpec):
            raise BundleError(
                f"{where}: an onnx network must declare its graph input, e.g. "
                f"input = {{ name = \"tiles\", shape = {list(image)}, dtype = \"float32\" }}"
            )
        if not _same_dims(self.input.shape, image):
            raise BundleError(
                f"{where}: input {self.input} must have shape {list(image)} (layout {self.layout}, tile {t} px)"
            )
        names = [self.input.name]
        for head in self.heads:
            n = len(head.classes)
            if head.task == "segmentation":
                shape = ("batch", t, t, n) if self.layout == "nhwc" else ("batch", n, t, t)
            else:
                shape = ("batch", n)
            if not isinstance(head.output, TensorSpec):
                raise BundleError(
                    f"{where}: head {head.task!r} of an onnx network must name its graph output, e.g. "
                    f"output = {{ name = \"{head.task}\", shape = {list(shape)}, dtype = \"float32\" }}"
                )
            if not _same_dims(head.output.shape, shape):
                raise BundleError(
                    f"{where}: head {head.task!r} output {head.output} must have shape {list(shape)} "
                    f"({n} classes, layout {self.layout})"
                )
            names.append(head.output.name)
        if self.features is not None:
            if not isinstance(self.features, TensorSpec) or len(self.features.shape) != 2 or not _same_dims(
                self.features.shape[:1], ("batch",)
            ) or not _is_int(self.features.shape[1]):
                raise BundleError(
                    f"{where}: features {self.features} must be a graph output of shape [\"batch\", D] with D an "
                    "integer, e.g. features = { name = \"features\", shape = [\"batch\", 128], dtype = \"float32\" }"
                )
            names.append(self.features.name)
        if len(set(names)) != len(names):
            raise BundleError(f"{where}: input and output names repeat: {names}")

    def signature(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """(inputs, outputs) an ONNX network's graph must have; outputs in head order."""
        if self.input is None:
            raise ValueError(f"network {self.name!r} ({self.runtime}) declares no signature")
        if self.kind == "encoder":
            return (self.input,), (self.output,)
        if self.kind == "aggregator":
            return (self.input,), (self.heads[0].output, self.attention)
        outputs = tuple(h.output for h in self.heads if h.output is not None)
        return (self.input,), outputs + ((self.features,) if self.features is not None else ())

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(h.task for h in self.heads)

    @property
    def weights(self) -> tuple[WeightsFile, ...]:
        """Its weights files: the k folds of an aggregator that has them, else its one file."""
        return self.folds or (WeightsFile(self.file, self.sha256),)

    @property
    def files(self) -> tuple[str, ...]:
        """The bundle files this network needs: weights (every fold), then licence if any."""
        weights = tuple(w.file for w in self.weights)
        return weights if self.origin is None else (*weights, self.origin.licence_file)

    def head(self, task: str) -> HeadSpec:
        for h in self.heads:
            if h.task == task:
                return h
        raise KeyError(task)


@dataclass(frozen=True)
class OodSpec:
    """The bundle's out-of-distribution gate (format 2 ``[ood]``, glio_node/ood.py).

    ``network`` names the bundle network whose per-tile features are compared with the
    reference; ``features`` names where they come from: for a keras network the layer whose
    output is taken (e.g. ``"features"``, the classifier's global-average-pooled layer), for an
    onnx network a graph output, for an encoder its embeddings.  ``file`` (``.npz``, hashed like
    the weights) holds the reference; ``slide_threshold`` was fitted on validation slides only as
    ``margin`` x their ``quantile`` slide score.
    """

    network: str
    features: str
    file: str
    sha256: str | None  # None only before write_bundle hashes it
    slide_threshold: float
    statistic: str = "median"  # of the tile scores: the slide score (the only one today)
    quantile: float = 0.95
    margin: float = 1.5
    validation_slides: int = 0  # how many validation slides the threshold was fitted on
    slide_threshold_low: float = 0.0  # a slide scoring below this is out of distribution too (0: one-sided)

    def __post_init__(self) -> None:
        if not isinstance(self.network, str) or not _NAME.match(self.network):
            raise BundleError(f"[ood] network {self.network!r} must name a network of the bundle")
        if not isinstance(self.features, str) or not _TENSOR_NAME.match(self.features):
            raise BundleError(f"[ood] features {self.features!r} must be a layer or output name (1 to 128 characters, no spaces)")
        if not isinstance(self.file, str) or not _FILE.match(self.file) or not self.file.endswith(".npz"):
            raise BundleError(f"[ood] file {self.file!r} must be a plain file name inside the bundle ending in .npz")
        if self.sha256 is not None and (not isinstance(self.sha256, str) or not _SHA256.match(self.sha256)):
            raise BundleError(f"[ood] sha256 {self.sha256!r} must be 64 lower-case hexadecimal digits")
        if not _is_number(self.slide_threshold) or self.slide_threshold <= 0:
            raise BundleError(f"[ood] slide_threshold {self.slide_threshold!r} must be a positive number")
        if self.statistic != "median":
            raise BundleError(f"[ood] statistic {self.statistic!r} is unknown; allowed: median")
        if not _is_number(self.quantile) or not 0 < self.quantile <= 1:
            raise BundleError(f"[ood] quantile {self.quantile!r} must be a number in (0, 1]")
        if not _is_number(self.margin) or self.margin < 1:
            raise BundleError(f"[ood] margin {self.margin!r} must be a number of at least 1")
        if not _is_int(self.validation_slides) or self.validation_slides < 0:
            raise BundleError(f"[ood] validation_slides {self.validation_slides!r} must be a non-negative integer")
        if not _is_number(self.slide_threshold_low) or not 0 <= self.slide_threshold_low < self.slide_threshold:
            raise BundleError(
                f"[ood] slide_threshold_low {self.slide_threshold_low!r} must be a number from 0 up to "
                f"slide_threshold {self.slide_threshold!r}"
            )
        for key in ("slide_threshold", "quantile", "margin", "slide_threshold_low"):
            object.__setattr__(self, key, float(getattr(self, key)))


ENCODER_FEATURES = "embeddings"
"""``[ood] features`` of a gate on an encoder network: its per-tile embeddings are the features."""


def _check_ood_source(ood: OodSpec, network: NetworkSpec) -> None:
    """The [ood] features must be something the named network gives per tile: a keras layer
    (checked when the model is loaded), an onnx tiles network's declared ``features`` output, or
    an encoder's embeddings.  An aggregator sees bags, not tiles, and cannot feed a gate."""
    where = f"[ood] network {network.name!r}"
    if network.kind == "aggregator":
        raise BundleError(
            f"{where} is an aggregator, which sees the slide's bag, not tiles; name its encoder "
            f"{network.encoder!r} with features = \"{ENCODER_FEATURES}\""
        )
    if network.kind == "encoder" and ood.features != ENCODER_FEATURES:
        raise BundleError(
            f"{where} is an encoder: its features are its embeddings; write features = \"{ENCODER_FEATURES}\", "
            f"not {ood.features!r}"
        )
    if network.kind == "tiles" and network.runtime == "onnx":
        declared = network.features.name if network.features is not None else None
        if declared != ood.features:
            raise BundleError(
                f"{where} is an onnx network: [ood] features {ood.features!r} must be its declared features output "
                f"(network features = {{ name = ..., shape = [\"batch\", D], dtype = ... }}; declared: {declared!r})"
            )


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
    ood: OodSpec | None = None  # format 2: the out-of-distribution gate, glio_node/ood.py

    def __post_init__(self) -> None:
        if not _is_int(self.format) or self.format not in READABLE_FORMATS:
            raise BundleError(
                f"manifest format {self.format!r} is not supported by this glio-node (it reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}); upgrade glio-node or re-export the bundle"
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
        if self.format == 1:
            for n in self.networks:
                if (n.runtime, n.kind, n.origin) != ("keras", "tiles", None):
                    raise BundleError(
                        f"network {n.name!r}: format 1 holds keras tile networks without origin only; "
                        "write the manifest as format 2"
                    )
                if any(h.temperature is not None for h in n.heads):
                    raise BundleError(
                        f"network {n.name!r}: format 1 heads have no temperature (read as 1.0); "
                        "write the manifest as format 2"
                    )
        files = [f for n in self.networks for f in n.files]
        for kind, values in (("name", [n.name for n in self.networks]), ("file", files)):
            if len(set(values)) != len(values):
                raise BundleError(f"network {kind}s repeat across networks: {values}")
        segmenting = [n.name for n in self.networks if "segmentation" in n.tasks]
        if len(segmenting) > 1:  # the label map, the regions and the tissue every call reads come from one
            raise BundleError(
                f"networks {', '.join(map(repr, segmenting))} each have a segmentation head; a bundle has at "
                "most one segmentation network (the worker draws one label map per slide): keep one of them, "
                "or make the others classifier networks"
            )
        seen: dict[str, str] = {}
        for network in self.networks:
            for task in network.tasks:
                if task in seen:
                    raise BundleError(
                        f"task {task!r} is produced by two networks, {seen[task]!r} and {network.name!r}; "
                        "each task must come from exactly one network"
                    )
                seen[task] = network.name
        if self.ood is not None:
            if not isinstance(self.ood, OodSpec):
                raise BundleError(f"ood must be an OodSpec, got {type(self.ood).__name__}")
            if self.format < 2:
                raise BundleError("[ood] needs manifest format 2; write the manifest as format 2")
            if self.ood.network not in {n.name for n in self.networks}:
                raise BundleError(
                    f"[ood] network {self.ood.network!r} is not a network of the bundle "
                    f"({', '.join(n.name for n in self.networks)})"
                )
            if self.ood.file in files:
                raise BundleError(f"[ood] file {self.ood.file!r} is also a network's file; give it its own name")
            _check_ood_source(self.ood, next(n for n in self.networks if n.name == self.ood.network))
        encoders = {n.name: n for n in self.networks if n.kind == "encoder"}
        read = set()
        for n in self.networks:
            if n.kind != "aggregator":
                continue
            if n.encoder not in encoders:
                raise BundleError(
                    f"aggregator {n.name!r} reads encoder {n.encoder!r}, but the bundle's encoders are "
                    f"{sorted(encoders)}; name one of them or add that encoder network"
                )
            if n.embed_dim != encoders[n.encoder].embed_dim:
                raise BundleError(
                    f"aggregator {n.name!r} reads embed_dim {n.embed_dim}, but encoder {n.encoder!r} gives "
                    f"{encoders[n.encoder].embed_dim}; re-export one of them"
                )
            read.add(n.encoder)
        unread = sorted(set(encoders) - read)
        if unread:
            raise BundleError(f"encoder(s) {unread} are read by no aggregator; add an aggregator or remove them")
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



# --- how a manifest is named in outputs ----------------------------------------------------------


_EVIDENCE_METRICS = (("slide_balanced_accuracy", "slide balanced accuracy"), ("slide_accuracy", "slide accuracy"))


def test_evidence(validation: Mapping[str, float], task: str) -> ValidationEvidence | None:
    """The test-set figure of ``task`` in a manifest's [validation] table: the slide balanced
    accuracy (else the slide accuracy) with its interval and the test patients; None without one."""
    for key, words in _EVIDENCE_METRICS:
        k = f"test_{task}_{key}"
        if k in validation:
            low, high = validation.get(f"{k}_ci_low"), validation.get(f"{k}_ci_high")
            patients = validation.get("test_patients")
            return ValidationEvidence(words, validation[k], low, high, int(patients) if patients is not None else None)
    return None


def dataset_description(provenance: str) -> str:
    """What the bundle was trained on, from its provenance ("... on <data>; seed ..."), else the whole text."""
    match = re.search(r" on (.+?); seed ", provenance)
    return (match.group(1) if match else provenance)[:256]

