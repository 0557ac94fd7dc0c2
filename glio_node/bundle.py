"""Model bundles: a folder with ``manifest.toml`` and one weights file per network.

Formats 1 and 2 are documented in docs/model-bundle.md.  Format 2 adds, per network, the
``runtime`` that runs it (``keras``: a ``.keras`` file; ``onnx``: an ``.onnx`` graph run by ONNX
Runtime), its ``kind`` (``tiles`` only, today's networks), the graph signature an ONNX network must
have, and the ``origin`` (source and licence file) of a network we did not train.  The life of a
bundle:

- training calls ``write_bundle`` (saves the models, hashes them, writes the manifest last);
- the worker calls ``load_bundle``, which first ``verify_bundle``s every weights and licence file
  against the SHA-256 in the manifest, and only then lets Keras or ONNX Runtime parse anything
  (Keras ``safe_mode`` on; an ONNX graph is data, with no Python in it);
- ``LoadedBundle.algorithm`` names the bundle in every output and in the audit trail; its
  ``sha256`` is the SHA-256 of the manifest file's bytes, which carry the weights' hashes, so it
  fingerprints the whole bundle.

Every record here is valid once built: ``Manifest``, ``NetworkSpec``, ``HeadSpec`` and
``TensorSpec`` check their fields on construction and raise ``BundleError`` naming the bad value
and what is allowed.
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
from glio_node.results import Algorithm, CodedClass, ModelOrigin

if TYPE_CHECKING:  # keras is imported lazily: reading a manifest must not pull in TensorFlow
    import keras

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
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
    attention: TensorSpec | None = None  # ONNX aggregators: the graph output carrying the attention (1, bag)
    folds: tuple[WeightsFile, ...] = ()  # aggregator with k >= 2 fold models; then file/sha256 are folds[0]'s

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
        elif self.input is not None or self.layout != "nhwc" or any(h.output is not None for h in self.heads):
            raise BundleError(
                f"{where}: input, layout and head outputs are declared for onnx networks only; a keras "
                "network's saved model carries its own signature: remove them"
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
        for what, tensor, shape in (
            ("input", self.input, (1, "bag", d)),
            ("head output", head.output, (1, n)),
            ("attention", self.attention, (1, "bag")),
        ):
            ok = isinstance(tensor, TensorSpec) and len(tensor.shape) == len(shape) and (
                tensor.shape[0] == 1 or isinstance(tensor.shape[0], str)
            ) and _same_dims(tensor.shape[1:], shape[1:])
            if not ok:
                raise BundleError(
                    f"{where}: an onnx aggregator must declare its graph {what} of shape {list(shape)} "
                    f"(the first dimension 1 or dynamic, the bag dynamic); got {tensor}"
                )
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
        return (self.input,), tuple(h.output for h in self.heads if h.output is not None)

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
        files = [f for n in self.networks for f in n.files]
        for kind, values in (("name", [n.name for n in self.networks]), ("file", files)):
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


_NETWORK_KEYS = ("name", "file", "sha256", "tile_size", "um_per_px", "overlap", "normalization", "heads")
_NETWORK_KEYS_2 = ("kind", "input", "layout", "origin")  # format 2 only, optional (runtime is required)
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
              ("indeterminate_below",) + (("output", "max_fold_spread") if fmt >= 2 else ()))
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
    )


def _manifest_from_toml(doc: Mapping[str, Any]) -> Manifest:
    _take(doc, "the manifest", ("format", "bundle", "networks"), ("validation",))
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
        checks = [("weights", w.file, w.sha256) for w in network.weights]
        if network.origin is not None:
            checks.append(("licence", network.origin.licence_file, network.origin.licence_sha256))
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
    return _verify(path)[2]


# --- loading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedNetwork:
    """A network's spec and its model: a Keras model (compile=False, ready for ``predict``) for
    runtime keras, an ``onnxruntime.InferenceSession`` for runtime onnx; for an aggregator, a
    tuple of those, one per fold (one element without folds)."""

    spec: NetworkSpec
    model: Any


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
            origins=tuple(
                ModelOrigin(n.name, n.origin.source, n.origin.licence_name, n.origin.licence_sha256 or "")
                for n in m.networks
                if n.origin is not None
            ),
        )

    def network_for(self, task: str) -> LoadedNetwork:
        """The loaded network that produces ``task``; KeyError if none does."""
        for network in self.networks:
            if task in network.spec.tasks:
                return network
        raise KeyError(task)


def _check_two_stage_model(spec: NetworkSpec, model: keras.Model) -> None:
    """A Keras encoder: (None, T, T, 3) -> (None, D); a Keras aggregator: ``embeddings`` (None,
    None, D) -> {"probabilities": (None, C), "attention": (None, None)} (runtime/mil.py's contract)."""
    where = f"network {spec.name!r} ({spec.kind})"
    inputs = [tuple(i.shape) for i in model.inputs]
    d = spec.embed_dim
    if spec.kind == "encoder":
        want_in, out = (None, spec.tile_size, spec.tile_size, 3), model.output
        if inputs != [want_in] or isinstance(out, (Mapping, list, tuple)) or tuple(out.shape) != (None, d):
            raise BundleError(
                f"{where}: the model maps {inputs} -> {getattr(out, 'shape', type(out).__name__)}; an encoder must map "
                f"{want_in} -> (None, {d}) (one embedding of embed_dim per tile); re-export the bundle"
            )
        return
    c = len(spec.heads[0].classes)
    out = model.output
    shapes = {k: tuple(v.shape) for k, v in out.items()} if isinstance(out, Mapping) else None
    if inputs != [(None, None, d)] or shapes != {"probabilities": (None, c), "attention": (None, None)}:
        raise BundleError(
            f"{where}: the model maps {inputs} -> {shapes or type(out).__name__}; an aggregator must map "
            f"[(None, None, {d})] -> {{'probabilities': (None, {c}), 'attention': (None, None)}} "
            "(glio_node/runtime/mil.py build_abmil); re-export the bundle"
        )


def _check_model(spec: NetworkSpec, model: keras.Model) -> None:
    if spec.kind != "tiles":
        _check_two_stage_model(spec, model)
        return
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


Found = tuple[str, tuple[int | str | None, ...], str]
"""A graph input or output as the runtime reports it: (name, shape, dtype); a non-int dimension is dynamic."""


def _show(tensors) -> str:
    shown = []
    for t in tensors:
        if isinstance(t, TensorSpec):
            shown.append(str(t))
        else:
            name, shape, dtype = t
            dims = ", ".join(str(d) if d is not None else "?" for d in shape)
            shown.append(f"{name} {dtype}[{dims}]")
    return "[" + ", ".join(shown) + "]"


def _found_matches(expected: TensorSpec, found: Found) -> bool:
    name, shape, dtype = found
    dims = tuple(d if _is_int(d) else "?" for d in shape)
    return (name, dtype) == (expected.name, expected.dtype) and _same_dims(dims, expected.shape)


def check_signature(spec: NetworkSpec, inputs: list[Found], outputs: list[Found]) -> None:
    """Refuse an ONNX graph whose inputs or outputs differ from the manifest's, in one line.

    Names, dtypes, ranks and fixed sizes must be equal, and dynamic where the manifest says so
    (the batch); output order does not matter, extra outputs do.  Raises BundleError naming the
    network, the expected and the found signature.
    """
    want_in, want_out = spec.signature()
    by_name = {o[0]: o for o in outputs}
    ok = (
        len(inputs) == 1
        and _found_matches(want_in[0], inputs[0])
        and len(outputs) == len(want_out)
        and all(w.name in by_name and _found_matches(w, by_name[w.name]) for w in want_out)
    )
    if not ok:
        raise BundleError(
            f"network {spec.name!r} ({spec.file}): the ONNX graph's signature does not match the manifest: "
            f"expected inputs {_show(want_in)} outputs {_show(want_out)}, found inputs {_show(inputs)} "
            f"outputs {_show(outputs)}; re-export the network with the manifest's signature or import it again"
        )


def load_bundle(path: str | os.PathLike[str], device: str = "auto") -> LoadedBundle:
    """Verify a bundle, then load its networks: Keras ones with ``keras.saving.load_model(compile=False)``,
    ONNX ones as ONNX Runtime sessions on ``device`` (auto, cpu, gpu; see runtime/onnx_runner.py).

    Hashes are checked before any weights file is parsed; Keras ``safe_mode`` stays on (no
    arbitrary code from a bundle runs).  Each Keras model's input and output shapes, and each ONNX
    graph's signature, are checked against its manifest entry.  A bundle of ONNX networks only
    never imports Keras or TensorFlow.  Raises BundleError (and BadInput for ``gpu`` without one).
    """
    directory, data, manifest = _verify(path)
    loaded = []
    for spec in manifest.networks:
        models = []
        for weights in spec.weights:
            if spec.runtime == "onnx":
                from glio_node.runtime.onnx_runner import graph_signature, open_session  # noqa: PLC0415

                session = open_session(directory / weights.file, device)
                check_signature(spec, *graph_signature(session))
                models.append(session)
                continue
            import keras  # noqa: PLC0415 - heavy import, only once a Keras network is really loaded

            if spec.kind == "aggregator":
                import glio_node.runtime.mil  # noqa: F401, PLC0415 - registers GatedAttentionPooling for safe_mode
            try:
                model = keras.saving.load_model(directory / weights.file, compile=False, safe_mode=True)
            except (ValueError, TypeError, OSError) as exc:
                raise BundleError(
                    f"weights file {weights.file} in {directory} passed its SHA-256 check but Keras cannot load it "
                    f"({exc}); the bundle was exported by an incompatible Keras: re-export it"
                ) from exc
            _check_model(spec, model)
            models.append(model)
        # an aggregator's model is the tuple of its fold models (one for a single file)
        loaded.append(LoadedNetwork(spec, tuple(models) if spec.kind == "aggregator" else models[0]))
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
    header = (
        f"# glio-node model bundle manifest, format {manifest.format} (docs/model-bundle.md).\n"
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
) -> Manifest:
    """Save ``models`` (network name -> Keras model, or the path of a weights file) as a bundle in ``out_dir``.

    ``manifest`` gives everything but the hashes (its networks' ``sha256`` and origins'
    ``licence_sha256`` may be None and are ignored): a Keras model is saved, without optimizer
    state, to its network's ``file`` with ``model.save``; a path (an ONNX graph, or a ``.keras``
    file of another bundle) is copied byte for byte after an ONNX graph's signature is checked;
    ``licences`` (network name -> licence text file) are copied to each origin's ``licence_file``;
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
    for spec in manifest.networks:
        for given in _given_weights(spec, models[spec.name]):
            if isinstance(given, (str, os.PathLike)):
                if spec.runtime == "onnx":
                    _check_onnx_file(spec, Path(given))
            elif spec.runtime == "onnx":
                raise BundleError(f"network {spec.name!r} is an onnx network: give the path of its .onnx file")
            else:
                _check_model(spec, given)
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
