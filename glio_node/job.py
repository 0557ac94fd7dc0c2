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
from typing import Callable, Sequence

from glio_node.pipeline.analyze import AnalysisOptions, AnalysisStats, analyze
from glio_node.results import AnalysisResult


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
    region_area_fraction: dict[str, float]
    files: tuple[str, ...]  # the DICOM objects written (each is delivered)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    geojson: str | None = None  # the QuPath GeoJSON of the same run (not a DICOM object)

    @property
    def bundle(self) -> str:
        return f"{self.bundle_name} {self.bundle_version}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stats"]["decode_amplification"] = self.stats.decode_amplification
        d["bundle"] = self.bundle
        return d


def _calls(result: AnalysisResult) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    calls = {c.task: (c.call.code_meaning if c.call else "indeterminate") for c in result.calls}
    probs = {c.task: {k.name: p for k, p in zip(c.classes, c.probabilities)} for c in result.calls}
    return calls, probs


class BundleCache:
    """Bundles kept loaded between a worker's jobs.

    Loading the Keras models costs seconds per job; verifying the SHA-256 of a bundle of a few
    MB costs milliseconds.  So every job still verifies the bundle on disk, and the models are
    reloaded only when the manifest (which holds the weights' hashes) has changed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[Path, tuple[str, object]] = {}

    def get(self, bundle_dir: Path):
        from glio_node.bundle import load_bundle, verify_bundle

        path = Path(bundle_dir).resolve()
        with self._lock:
            verify_bundle(path)
            fingerprint = hashlib.sha256((path / "manifest.toml").read_bytes()).hexdigest()
            cached = self._loaded.get(path)
            if cached is None or cached[0] != fingerprint:
                cached = (fingerprint, load_bundle(path))
                self._loaded[path] = cached
            return cached[1]


def run_job(
    paths: Sequence[Path],
    out_dir: Path,
    bundle_dir: Path,
    device: str = "auto",
    options: AnalysisOptions = AnalysisOptions(),
    progress: Callable[[int, int], None] | None = None,
    bundles: BundleCache | None = None,
    allow_gaps: bool = False,
) -> JobSummary:
    """Analyse the slide in ``paths`` with the bundle in ``bundle_dir``; write results to ``out_dir``.

    Raises ``BadInput`` for slides that cannot be analysed, ``BundleError`` for a bundle that
    does not verify; both carry a one-line message for the operator.  A worker passes its
    ``bundles`` cache so the models load once, not per job.  ``allow_gaps``: analyse a slide
    with missing frames (the worker, once a series stayed incomplete past its wait); what is
    missing is read as glass and the outputs say the source was incomplete.
    """
    from glio_node.bundle import load_bundle
    from glio_node.runtime.keras_runner import bundle_networks, select_device
    from glio_node.runtime.slide_reader import DicomSlide
    from glio_node.writers import result_polygons, write_results
    from glio_node.writers.geojson import PixelMatrix, geojson_file_name, write_geojson

    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    slide = DicomSlide.open(paths, allow_gaps=allow_gaps)
    stages["open"] = time.perf_counter() - t0
    with slide:
        t0 = time.perf_counter()
        used_device = select_device(device)  # type: ignore[arg-type]
        bundle = bundles.get(bundle_dir) if bundles is not None else load_bundle(bundle_dir)
        networks = bundle_networks(bundle, options.batch_size)
        stages["load_models"] = time.perf_counter() - t0

        result, stats, seg_level = analyze(slide, networks, bundle.algorithm, options, progress)
        stages.update(stats.stage_seconds)
        if slide.gaps:  # only with allow_gaps; said even when no missing frame was needed
            missing = sum(slide.missing_reads.values())
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
        written = write_results(list(seg_level.headers), result, out_dir, regions=regions)
        header = seg_level.headers[0]
        geojson = write_geojson(
            result,
            regions,
            PixelMatrix.from_header(slide.levels[0].headers[0]),
            str(header.StudyInstanceUID),
            str(header.SeriesInstanceUID),
            out_dir / geojson_file_name(str(header.SeriesInstanceUID), bundle.algorithm.name),
        )
        stages["write"] = time.perf_counter() - t0

    calls, probs = _calls(result)
    return JobSummary(
        series_instance_uid=str(seg_level.headers[0].SeriesInstanceUID),
        bundle_name=bundle.algorithm.name,
        bundle_version=bundle.algorithm.version,
        bundle_sha256=bundle.algorithm.sha256,
        device=used_device,
        stats=stats,
        calls=calls,
        probabilities=probs,
        tissue_area_mm2=result.tissue_area_mm2,
        region_area_fraction=result.region_area_fraction,
        files=tuple(str(p) for p in written.paths),
        stage_seconds=stages,
        notes=result.notes,
        geojson=str(geojson),
    )
