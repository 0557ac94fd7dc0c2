"""A verified bundle's networks deserialised: Keras models and ONNX Runtime sessions, checked against the manifest.

``load_bundle`` first verifies every file's SHA-256 (glio_node/bundle_verify.py), and only then
lets Keras (``safe_mode`` on) or ONNX Runtime (a graph is data, with no Python in it) parse
anything.  Each model's inputs and outputs are checked against its manifest entry.  Keras and
ONNX Runtime are imported only here, lazily, once a network of theirs is really loaded: a
bundle of ONNX networks only never imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glio_node.bundle_verify import read_verified
from glio_node.errors import BundleError
from glio_node.manifest import Manifest, NetworkSpec, TensorSpec, _is_int, _same_dims, dataset_description, test_evidence
from glio_node.normalization import normalization_description
from glio_node.ood import OodGate, OodReferenceError, load_reference
from glio_node.results import Algorithm, ModelOrigin

if TYPE_CHECKING:  # keras is imported lazily: reading a manifest must not pull in TensorFlow
    import keras

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
    ood: OodGate | None = None  # the out-of-distribution gate, when the manifest has [ood]

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
            normalizations=tuple(  # an aggregator reads embeddings, not tiles: it has no normalization
                (n.name, normalization_description(n.normalization)) for n in m.networks if n.normalization is not None
            ),
            test_evidence=tuple(
                (task, e) for task in m.tasks if (e := test_evidence(m.validation, task)) is not None
            ),
            dataset=dataset_description(m.provenance),
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


def check_model(spec: NetworkSpec, model: keras.Model) -> None:
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
    directory, data, manifest = read_verified(path)
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
            check_model(spec, model)
            models.append(model)
        # an aggregator's model is the tuple of its fold models (one for a single file)
        loaded.append(LoadedNetwork(spec, tuple(models) if spec.kind == "aggregator" else models[0]))
    return LoadedBundle(
        path=directory,
        manifest=manifest,
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        networks=tuple(loaded),
        ood=_load_gate(directory, manifest),
    )


def _load_gate(directory: Path, manifest: Manifest) -> OodGate | None:
    """The [ood] reference (already hash-verified by ``_verify``) as the pipeline's gate."""
    if manifest.ood is None:
        return None
    try:
        reference = load_reference(directory / manifest.ood.file)
    except OodReferenceError as exc:
        raise BundleError(f"{directory}: {exc}") from None
    return OodGate(manifest.ood.network, reference, manifest.ood.slide_threshold, manifest.ood.slide_threshold_low)

