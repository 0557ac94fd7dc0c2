"""Model bundles: a folder with ``manifest.toml`` and one weights file per network; the public entry.

Formats 1 and 2 are documented in docs/model-bundle.md.  The life of a bundle:

- training calls ``write_bundle`` (saves the models, hashes them, writes the manifest last);
- the worker calls ``load_bundle``, which first ``verify_bundle``s every weights, licence and OOD
  file against the SHA-256 in the manifest, and only then lets Keras or ONNX Runtime parse
  anything (Keras ``safe_mode`` on; an ONNX graph is data, with no Python in it);
- ``LoadedBundle.algorithm`` names the bundle in every output and in the audit trail; its
  ``sha256`` is the SHA-256 of the manifest file's bytes, which carry the weights' hashes, so it
  fingerprints the whole bundle.

The work is done in modules named for it, and this one gathers their public names so that a
caller needs one import:

- glio_node/manifest.py: the records (``Manifest``, ``NetworkSpec``, ``HeadSpec``, ...), each
  valid once built;
- glio_node/manifest_toml.py: ``manifest.toml`` parsed into a Manifest (``load_manifest``) and
  rendered back (``manifest_to_toml``);
- glio_node/bundle_verify.py: the SHA-256 of every file before anything parses it
  (``verify_bundle``);
- glio_node/normalization.py: a network's input normalisation (``normalize``);
- glio_node/runtime/loading.py: Keras and ONNX deserialisation (``load_bundle``); Keras is
  imported under runtime/ only, and lazily;
- glio_node/runtime/saving.py: ``write_bundle``.

Importing this module imports neither Keras, TensorFlow nor ONNX Runtime.
"""

from __future__ import annotations

from glio_node.bundle_verify import sha256_file, verify_bundle
from glio_node.errors import BundleError
from glio_node.manifest import (
    ACTIVATIONS,
    CLASSIFIER_TASKS,
    DTYPES,
    FORMAT,
    KINDS,
    LAYOUTS,
    MANIFEST_NAME,
    MAX_SOURCE,
    NORMALIZATIONS,
    READABLE_FORMATS,
    RUNTIMES,
    SUFFIXES,
    TASKS,
    HeadSpec,
    Manifest,
    NetworkOrigin,
    NetworkSpec,
    OodSpec,
    TensorSpec,
    WeightsFile,
    dataset_description,
    test_evidence,
)
from glio_node.manifest_toml import bundle_dir, load_manifest, manifest_to_toml, network_from_toml
from glio_node.normalization import IMAGENET_MEAN, IMAGENET_STD, normalization_description, normalize
from glio_node.runtime.loading import Found, LoadedBundle, LoadedNetwork, check_signature, load_bundle
from glio_node.runtime.saving import write_bundle

__all__ = [
    "ACTIVATIONS",
    "CLASSIFIER_TASKS",
    "DTYPES",
    "FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINDS",
    "LAYOUTS",
    "MANIFEST_NAME",
    "MAX_SOURCE",
    "NORMALIZATIONS",
    "READABLE_FORMATS",
    "RUNTIMES",
    "SUFFIXES",
    "TASKS",
    "BundleError",
    "Found",
    "HeadSpec",
    "LoadedBundle",
    "LoadedNetwork",
    "Manifest",
    "NetworkOrigin",
    "NetworkSpec",
    "OodSpec",
    "TensorSpec",
    "WeightsFile",
    "bundle_dir",
    "check_signature",
    "dataset_description",
    "load_bundle",
    "load_manifest",
    "manifest_to_toml",
    "network_from_toml",
    "normalization_description",
    "normalize",
    "sha256_file",
    "test_evidence",
    "verify_bundle",
    "write_bundle",
]
