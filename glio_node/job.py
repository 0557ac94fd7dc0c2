"""One analysis job, top to bottom: slide in, DICOM results (and the QuPath GeoJSON) out.

``glio-node analyze`` calls this for the files on its command line; the worker service calls it
for each series the PACS sent.  Every stage is timed; the summary carries no patient data (only
UIDs, which the audit trail needs anyway).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from glio_node.pipeline.analyze import AnalysisOptions, AnalysisStats, analyze
from glio_node.ood import OodGate
from glio_node.ports import ModelRunner, SlideReader
from glio_node.results import Algorithm, AnalysisResult

if TYPE_CHECKING:
    from glio_node.writers import WrittenObject


@dataclass(frozen=True)
class JobSummary:
    """What a job did, for the terminal, ``--json`` and the audit trail."""

    series_instance_uid: str
    bundle_name: str
    bundle_version: str
    bundle_sha256: str
    device: str
    stats: AnalysisStats
    calls: dict[str, str]  # task -> call code meaning or "indeterminate"
    probabilities: dict[str, dict[str, float]]
    tissue_area_mm2: float
    region_area_fraction: dict[str, float] | None  # None: the bundle has no segmentation network (no SEG)
    files: tuple[str, ...]  # the DICOM objects written (each is delivered)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    objects: tuple[WrittenObject, ...] = ()  # what was written, with its UIDs: nothing re-reads the files
    notes: tuple[str, ...] = ()
    geojson: str | None = None  # the QuPath GeoJSON of the same run (not a DICOM object)
    # Slide QC: {"verdict": "pass"|"warn"|"fail", "reasons": [{code, name, meaning, area_mm2,
    # severity}], "usable_tissue_mm2"}; None when QC was off.  Stored with the job (status page).
    qc: dict | None = None
    calibration: dict[str, dict] = field(default_factory=dict)  # task -> {"calibrated": bool, "temperature": T (1.0 if not)}
    # The OOD gate's verdict: {"network", "slide_score", "slide_threshold", "slide_threshold_low", "out_of_distribution"};
    # None when the bundle has no [ood] table.
    ood: dict | None = None
    # aggregator heads (two-stage tasks): task -> folds, fold_spread, max_fold_spread,
    # indeterminate_reason (None, "low_probability" or "fold_disagreement")
    aggregated: dict[str, dict] = field(default_factory=dict)

    @property
    def bundle(self) -> str:
        return f"{self.bundle_name} {self.bundle_version}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stats"]["decode_amplification"] = self.stats.decode_amplification
        d["bundle"] = self.bundle
        d["objects"] = [{**o, "path": str(o["path"])} for o in d["objects"]]
        return d


def _calls(result: AnalysisResult) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    calls = {c.task: (c.call.code_meaning if c.call else call_text_indeterminate(c)) for c in result.calls}
    probs = {c.task: {k.name: p for k, p in zip(c.classes, c.probabilities)} for c in result.calls}
    return calls, probs


def _calibration(result: AnalysisResult) -> dict[str, dict]:
    """Per call: whether its probabilities were temperature-scaled, and the temperature applied."""
    return {c.task: {"calibrated": c.calibrated, "temperature": c.temperature if c.calibrated else 1.0} for c in result.calls}
def call_text_indeterminate(call) -> str:
    """How a withheld call reads in the summary: the OOD gate's reason is said."""
    return OUT_OF_DISTRIBUTION_TEXT if call.out_of_distribution else "indeterminate"


OUT_OF_DISTRIBUTION_TEXT = "indeterminate (out of distribution)"


def _ood_summary(result: AnalysisResult) -> dict | None:
    v = result.ood
    if v is None:
        return None
    return {
        "network": v.network,
        "slide_score": v.slide_score,
        "slide_threshold": v.slide_threshold,
        "slide_threshold_low": v.slide_threshold_low,
        "out_of_distribution": v.out_of_distribution,
    }


def _aggregated(result: AnalysisResult) -> dict[str, dict]:
    return {
        c.task: {
            "folds": c.folds,
            "fold_spread": c.fold_spread,
            "max_fold_spread": c.max_fold_spread,
            "indeterminate_reason": c.fold_reason,
        }
        for c in result.calls
        if c.fold_spread is not None
    }


class BundleCache:
    """Bundles kept loaded between a worker's jobs.

    Loading the Keras models costs seconds per job; verifying the SHA-256 of a bundle of a few
    MB costs milliseconds.  So every job still verifies the bundle on disk, and the models are
    reloaded only when the manifest (which holds the weights' hashes) has changed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[tuple[Path, str], tuple[str, object]] = {}

    def get(self, bundle_dir: Path, device: str = "auto"):
        """The bundle loaded for ``device`` (ONNX sessions are made for a device; Keras ignores it)."""
        from glio_node.bundle import load_bundle, verify_bundle

        path = Path(bundle_dir).resolve()
        with self._lock:
            verify_bundle(path)
            fingerprint = hashlib.sha256((path / "manifest.toml").read_bytes()).hexdigest()
            cached = self._loaded.get((path, device))
            if cached is None or cached[0] != fingerprint:
                cached = (fingerprint, load_bundle(path, device))
                self._loaded[(path, device)] = cached
            return cached[1]


@dataclass(frozen=True)
class Models:
    """A bundle ready to run: how outputs name it, its networks, and the device they run on."""

    algorithm: Algorithm
    runners: tuple[ModelRunner, ...]
    device: str  # what was used: "cpu" or "gpu:N"
    batch_size: int | None = None  # tiles per model call the runners were built for (None: the job's)
    ood: OodGate | None = None  # the bundle's out-of-distribution gate, when it has one
    aggregators: tuple = ()  # ports.BagRunner heads of two-stage tasks, reading an encoder among runners


# The job's two seams (the defaults below are the real adapters; glio_node.testing has fakes):
# open the series' files as a reader (paths, allow_gaps), and load the bundle's networks
# (bundle_dir, device asked for, batch size, the worker's cache or None).
OpenSlide = Callable[[Sequence[Path], bool], SlideReader]
LoadModels = Callable[[Path, str, int, BundleCache | None], Models]


def open_dicom_slide(paths: Sequence[Path], allow_gaps: bool) -> SlideReader:
    """The real reader: check the files, then open them with wsidicom."""
    from glio_node.runtime.slide_reader import DicomSlide

    return DicomSlide.open(paths, allow_gaps=allow_gaps)


def load_bundle_models(
    bundle_dir: Path, device: str, batch_size: int, bundles: BundleCache | None, precision: str = "float32"
) -> Models:
    """The real networks: choose the device first for the runtimes the manifest names (before
    Keras makes tensors; TensorFlow is not imported for an ONNX-only bundle), then load the
    verified bundle (from the worker's cache when given) and wrap each network in the runner of
    its runtime.

    ``batch_size`` 0: chosen from the device's free memory (8 on a CPU).  ``precision``: the Keras
    networks' compute dtype, named in the outputs' algorithm parameters (ONNX graphs run in
    their own dtypes, so a bundle with ONNX networks runs at float32 only)."""
    from glio_node.bundle import load_bundle, load_manifest
    from glio_node.runtime.runners import bundle_aggregators, bundle_networks, choose_batch_size, prepare_device

    manifest = load_manifest(bundle_dir)
    used_device = prepare_device(device, manifest, precision)
    bundle = bundles.get(bundle_dir, device) if bundles is not None else load_bundle(bundle_dir, device)
    batch_size = batch_size or choose_batch_size(bundle, used_device, precision)
    algorithm = replace(bundle.algorithm, precision=precision)
    return Models(algorithm, tuple(bundle_networks(bundle, batch_size, precision)), used_device, batch_size=batch_size, ood=bundle.ood,
                  aggregators=tuple(bundle_aggregators(bundle)))


# The name before bundles could hold ONNX networks (bench/ and older callers).
load_keras_models = load_bundle_models


def run_job(
    paths: Sequence[Path],
    out_dir: Path,
    bundle_dir: Path,
    device: str = "auto",
    options: AnalysisOptions = AnalysisOptions(),
    progress: Callable[[int, int], None] | None = None,
    bundles: BundleCache | None = None,
    allow_gaps: bool = False,
    open_slide: OpenSlide = open_dicom_slide,
    load_models: LoadModels = load_bundle_models,
) -> JobSummary:
    """Analyse the slide in ``paths`` with the bundle in ``bundle_dir``; write results to ``out_dir``.

    Raises ``BadInput`` for slides that cannot be analysed, ``BundleError`` for a bundle that
    does not verify; both carry a one-line message for the operator.  A worker passes its
    ``bundles`` cache so the models load once, not per job.  ``allow_gaps``: analyse a slide
    with missing frames (the worker, once a series stayed incomplete past its wait); what is
    missing is read as glass and the outputs say the source was incomplete.
    ``open_slide`` and ``load_models`` are the seams to the slide reader and the model runtime
    (the tests run the whole job on ``glio_node.testing``'s fakes).
    """
    from glio_node.writers import result_polygons, write_results
    from glio_node.writers.geojson import PixelMatrix, geojson_file_name, write_geojson

    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    slide = open_slide(paths, allow_gaps)
    stages["open"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        models = load_models(Path(bundle_dir), device, options.batch_size, bundles)
        stages["load_models"] = time.perf_counter() - t0
        if not options.batch_size:  # 0: the loader chose it from the device
            options = replace(options, batch_size=models.batch_size or 8)

        result, stats, source_level = analyze(
            slide, models.runners, models.algorithm, options, progress, models.ood, aggregators=models.aggregators
        )
        stages.update(stats.stage_seconds)
        if slide.gaps:  # only with allow_gaps; said even when no missing frame was needed
            missing = slide.missing_frames_read
            result = replace(
                result,
                source_gaps=slide.gaps,
                notes=(
                    *result.notes,
                    f"The slide arrived incomplete ({slide.gaps[0]}); {missing} missing frame(s) "
                    "the analysis needed were read as glass and not analysed.",
                ),
            )

        t0 = time.perf_counter()
        regions = result_polygons(result)  # once, for the ANN and the GeoJSON alike
        stages["polygonise"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)
        written = write_results(list(source_level.headers), result, out_dir, regions=regions)
        header = source_level.headers[0]
        geojson = write_geojson(
            result,
            regions,
            PixelMatrix.from_header(slide.levels[0].headers[0]),
            str(header.StudyInstanceUID),
            str(header.SeriesInstanceUID),
            out_dir / geojson_file_name(str(header.SeriesInstanceUID), models.algorithm.name),
        )
        stages["write"] = time.perf_counter() - t0
    finally:
        slide.close()

    calls, probs = _calls(result)
    return JobSummary(
        series_instance_uid=str(source_level.headers[0].SeriesInstanceUID),
        bundle_name=models.algorithm.name,
        bundle_version=models.algorithm.version,
        bundle_sha256=models.algorithm.sha256,
        device=models.device,
        stats=stats,
        calls=calls,
        probabilities=probs,
        tissue_area_mm2=result.tissue_area_mm2,
        region_area_fraction=result.region_area_fraction,
        files=tuple(str(p) for p in written.paths),
        stage_seconds=stages,
        objects=written.objects,
        notes=result.notes,
        geojson=str(geojson),
        qc=result.qc.as_dict() if result.qc is not None else None,
        calibration=_calibration(result),
        ood=_ood_summary(result),
        aggregated=_aggregated(result),
    )
