"""The out-of-distribution gate: is this slide like the slides the bundle was trained on?

A model answers confidently on anything; a slide from another organ, a bad stain or a new
scanner must instead get every call "indeterminate (out of distribution)".  The bundle carries a
reference of what its training tiles look like *in a feature space of one of its networks* (any
network: a Keras classifier's global-pooled penultimate layer, an ONNX output, a MIL encoder's
embeddings), and two numbers fitted on validation patients only.

Reference (fitted on the training patients' tiles, ``fit_reference``): the mean ``mu`` of the
tile features, the top ``k`` principal directions ``V`` (k x D) with their variances ``lam``,
and the mean squared residual ``rho`` outside them.  A tile's score is the root mean of its
standardised squared coordinates, Mahalanobis in the top-k components plus the residual as one
more component::

    z = V (x - mu);  r2 = |x - mu|^2 - |z|^2
    score = sqrt((sum_i z_i^2 / lam_i + r2 / rho) / (k + 1))

so a typical training tile scores about 1, whatever D and k are.  A slide's score is the
**median** of its tiles' scores (robust to a few odd tiles: pen marks, folds).

The gate is **two-sided**.  A slide is out of distribution when its score is above the upper
threshold, ``margin`` x the ``quantile`` of the validation slides' scores, or below the lower
one, the ``1 - quantile`` quantile divided by ``margin`` (defaults 1.5 and 0.95; both fitted on
the validation slides only, the test patients never see them).  The lower side is there
because a network shown something it has never seen often does not answer with large, odd
features but with weak ones near the training mean ("feature collapse"): the real H&E sample
CMU-1 scores about 0.5 with the demo classifier, lower than any synthetic slide.  In k + 1
dimensions a typical tile lies on a shell at distance about 1, not at the centre, so a whole
slide of tiles at the centre is as atypical as one far out (the typical-set test of Nalisnick
et al., 2019, "Detecting out-of-distribution inputs to deep generative models using
typicality").  The reference is stored as a ``.npz`` of plain arrays (no pickle), hashed in the
manifest like the weights and verified before it is parsed.

Pure numpy: the pipeline scores the features a runner returns, training fits the reference.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES_KEY = "ood_features"
"""The key under which a runner returns its per-tile feature vectors (n, D) beside its heads."""
DEFAULT_COMPONENTS = 4  # more components fit the training patients' small directions: held-out slides score high
DEFAULT_QUANTILE = 0.95
DEFAULT_MARGIN = 1.5
_ARRAYS = ("mean", "components", "variances", "residual_variance")
_EPS = 1e-8


class OodReferenceError(ValueError):
    """A reference file or features that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class OodReference:
    """Training-tile feature statistics (see the module docstring); valid once built."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,), > 0
    residual_variance: float  # mean squared residual per tile, > 0

    def __post_init__(self) -> None:
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        k = self.components.shape[0] if self.components.ndim == 2 else -1
        if d < 1 or self.components.shape != (k, d) or self.variances.shape != (k,):
            raise OodReferenceError(
                f"OOD reference arrays do not fit: mean {self.mean.shape}, components {self.components.shape}, "
                f"variances {self.variances.shape}; expected (D,), (k, D), (k,): re-fit it with `python -m training fit-ood`"
            )
        arrays = (self.mean, self.components, self.variances, np.asarray(self.residual_variance))
        if not all(np.all(np.isfinite(a)) for a in arrays) or np.any(self.variances <= 0) or not self.residual_variance > 0:
            raise OodReferenceError("OOD reference holds non-finite or non-positive variances: re-fit it")

    @property
    def dimensions(self) -> int:
        return int(self.mean.shape[0])


def fit_reference(features: np.ndarray, components: int = DEFAULT_COMPONENTS) -> OodReference:
    """Fit the reference to training tile features (N, D); ``components`` is capped at min(N - 1, D - 1)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 2:
        raise OodReferenceError(f"an OOD reference needs (N >= 3 tiles, D >= 2 features), got shape {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = max(1, min(components, x.shape[0] - 1, x.shape[1] - 1))
    variances = (s[:k] ** 2) / (x.shape[0] - 1)
    floor = max(float(variances.max()) * 1e-6, _EPS)
    z = centred @ vt[:k].T
    residual = np.maximum((centred**2).sum(axis=1) - (z**2).sum(axis=1), 0.0)
    return OodReference(
        mean=mean,
        components=vt[:k].copy(),
        variances=np.maximum(variances, floor),
        residual_variance=max(float(residual.mean()), floor),
    )


def tile_scores(reference: OodReference, features: np.ndarray) -> np.ndarray:
    """(n, D) tile features -> (n,) scores, about 1 for a typical training tile."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != reference.dimensions:
        raise OodReferenceError(
            f"features of shape {x.shape} do not fit the OOD reference's {reference.dimensions} dimensions: "
            "the [ood] features layer or output differs from the one it was fitted on; re-fit it"
        )
    centred = x - reference.mean
    z = centred @ reference.components.T
    residual = np.maximum((centred**2).sum(axis=1) - (z**2).sum(axis=1), 0.0)
    k = reference.components.shape[0]
    total = (z**2 / reference.variances).sum(axis=1) + residual / reference.residual_variance
    return np.sqrt(total / (k + 1)).astype(np.float32)


def slide_score(scores: np.ndarray) -> float | None:
    """The slide's score: the median of its analysed tiles' scores (NaN = not analysed); None without tiles."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    return float(np.median(s)) if s.size else None


def fit_slide_threshold(validation_slide_scores, quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN) -> float:
    """``margin`` x the ``quantile`` of the validation slides' scores (linear interpolation)."""
    s = np.asarray([v for v in validation_slide_scores if v is not None and np.isfinite(v)], dtype=np.float64)
    if s.size == 0:
        raise OodReferenceError("no validation slide has a tile to score: the OOD threshold needs validation slides with tissue")
    if not 0 < quantile <= 1 or not margin >= 1:
        raise OodReferenceError(f"quantile {quantile} must be in (0, 1] and margin {margin} at least 1")
    return float(margin * np.quantile(s, quantile))


def fit_lower_threshold(validation_slide_scores, quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN) -> float:
    """The ``1 - quantile`` quantile of the validation slides' scores divided by ``margin``."""
    s = np.asarray([v for v in validation_slide_scores if v is not None and np.isfinite(v)], dtype=np.float64)
    if s.size == 0:
        raise OodReferenceError("no validation slide has a tile to score: the OOD threshold needs validation slides with tissue")
    return float(np.quantile(s, 1.0 - quantile) / margin)


def save_reference(reference: OodReference, path: str | os.PathLike[str]) -> None:
    """Write the reference as an uncompressed ``.npz`` of float64 arrays (no object arrays)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        mean=reference.mean,
        components=reference.components,
        variances=reference.variances,
        residual_variance=np.asarray(reference.residual_variance, dtype=np.float64),
    )
    Path(path).write_bytes(buffer.getvalue())


def load_reference(path: str | os.PathLike[str]) -> OodReference:
    """Read a reference written by ``save_reference``; ``allow_pickle=False``: a bundle's file is data.

    The caller verifies the file's SHA-256 first (``glio_node.bundle``).  Raises OodReferenceError.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _ARRAYS if k not in data.files]
            if missing:
                raise OodReferenceError(f"OOD reference {Path(path).name} lacks array(s) {missing}: re-fit it")
            arrays = {k: np.asarray(data[k], dtype=np.float64) for k in _ARRAYS}
    except (OSError, ValueError) as exc:
        if isinstance(exc, OodReferenceError):
            raise
        raise OodReferenceError(f"OOD reference {Path(path).name} is not a readable .npz ({exc}): re-fit it") from exc
    return OodReference(
        mean=arrays["mean"],
        components=arrays["components"],
        variances=arrays["variances"],
        residual_variance=float(arrays["residual_variance"]),
    )


@dataclass(frozen=True)
class OodGate:
    """A loaded gate, as the pipeline uses it: which network's features, the reference, the threshold."""

    network: str  # the bundle network whose runner returns FEATURES_KEY
    reference: OodReference
    slide_threshold: float  # a slide scoring above this is out of distribution
    slide_threshold_low: float = 0.0  # ... and one scoring below this (0: one-sided)

    def is_out(self, score: float | None) -> bool:
        """A slide without scored tiles is not called out of distribution (it has no calls anyway)."""
        return score is not None and not self.slide_threshold_low <= score <= self.slide_threshold
