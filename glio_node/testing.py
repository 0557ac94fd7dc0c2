"""Fakes of the analysis ports (:mod:`glio_node.ports`), made of numpy arrays: for tests and demos.

They run the real pipeline, job and scheduler in milliseconds, with no Keras and no DICOM files,
and their outputs are known functions of the pixels, so a test computes what the pipeline must
produce instead of trusting it:

- :class:`FakeSlide`: a pyramid built from one RGB array by striding (level *i* is
  ``image[::d, ::d]`` for the i-th downsample ``d``), cut into frames padded with glass; it
  counts every read and carries metadata-only VL WSI headers so the real writers can derive
  outputs from it;
- :class:`FakeSegmenter`: class of a pixel = its red value cut into equal bins
  (:func:`red_bins`): a colour threshold with a receptive field of one pixel, so the tiled label
  map equals the function applied to the whole raster;
- :class:`FakeClassifier`: P(second class) = the tile's mean intensity / 255 (:func:`mean_intensity`);
- :class:`FakeEncoder`: a tile's embedding = its channel means (:func:`channel_means`), and
  :class:`FakeAggregator`: an attention-MIL head on that bag, with k fold offsets;
- :func:`fake_models` / :func:`fake_slide_opener`: the seams of :func:`glio_node.job.run_job`.

Every UID is generated from a seed (no real slide's UIDs); names are marked synthetic.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid

from glio_node.coding import MGMT_CLASSES, REGION_CLASSES
from glio_node.pipeline.levels import LevelInfo
from glio_node.ports import SlideReader
from glio_node.results import Algorithm, CodedClass

GLASS = 255

FAKE_ALGORITHM = Algorithm(
    name="glio-fake",
    version="0.0.1",
    sha256="f" * 64,
    intended_use="FAKE numpy models for tests (glio_node.testing). Research use only. Not for diagnosis.",
    is_demo=True,
)


# -- the slide ------------------------------------------------------------------------------


class FakeSlide(SlideReader):
    """A slide made of a numpy RGB image: levels by striding, frames padded with glass.

    ``image``: (rows, cols, 3) uint8 at ``mm_per_px``; ``downsamples``: one per level, finest
    first, starting at 1; ``frame``: frame rows and columns.  ``reads`` counts each
    (level, frame_row, frame_col) read; ``closed`` says whether :meth:`close` ran.  With
    ``missing`` ((level, row, col) frames), the slide behaves like an incomplete series read with
    ``allow_gaps``: those frames read as glass and ``gaps`` says so.
    """

    def __init__(
        self,
        image: np.ndarray,
        mm_per_px: float,
        *,
        downsamples: Sequence[int] = (1, 2, 4, 8),
        frame: int = 64,
        seed: str = "fake-slide",
        missing: frozenset[tuple[int, int, int]] = frozenset(),
    ):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (rows, cols, 3) uint8, got {image.shape} {image.dtype}")
        if not downsamples or downsamples[0] != 1 or list(downsamples) != sorted(set(downsamples)):
            raise ValueError(f"downsamples {tuple(downsamples)} must start at 1 and increase")
        if frame < 1:
            raise ValueError(f"frame size {frame} px must be positive")
        self.arrays = tuple(image[::d, ::d] for d in downsamples)
        uids = _Uids(seed)
        self.levels = tuple(
            LevelInfo(
                index=i,
                rows=a.shape[0],
                cols=a.shape[1],
                frame_rows=frame,
                frame_cols=frame,
                mm_per_px=mm_per_px * d,
                headers=(_level_header(uids, i, a.shape[0], a.shape[1], frame, mm_per_px * d),),
            )
            for i, (a, d) in enumerate(zip(self.arrays, downsamples))
        )
        self.missing = frozenset(missing)
        self.gaps = (f"{len(self.missing)} frame(s) missing (fake)",) if self.missing else ()
        self.reads: Counter[tuple[int, int, int]] = Counter()
        self.missing_reads = 0
        self.closed = False
        self._lock = threading.Lock()

    def frame_grid(self, level: int) -> tuple[int, int]:
        """(frame rows, frame columns) of ``level``."""
        info = self.levels[level]
        return math.ceil(info.rows / info.frame_rows), math.ceil(info.cols / info.frame_cols)

    def read_frame(self, level: int, frame_row: int, frame_col: int) -> np.ndarray:
        if self.closed:
            raise ValueError("read_frame on a closed FakeSlide")
        n_rows, n_cols = self.frame_grid(level)
        if not (0 <= frame_row < n_rows and 0 <= frame_col < n_cols):
            raise ValueError(
                f"frame (row {frame_row}, column {frame_col}) is outside level {level}'s "
                f"{n_rows} x {n_cols} frames"
            )
        info = self.levels[level]
        fh, fw = info.frame_rows, info.frame_cols
        out = np.full((fh, fw, 3), GLASS, np.uint8)
        with self._lock:
            self.reads[level, frame_row, frame_col] += 1
            if (level, frame_row, frame_col) in self.missing:
                self.missing_reads += 1
                return out
        part = self.arrays[level][frame_row * fh : (frame_row + 1) * fh, frame_col * fw : (frame_col + 1) * fw]
        out[: part.shape[0], : part.shape[1]] = part
        return out

    @property
    def missing_frames_read(self) -> int:
        return self.missing_reads

    def close(self) -> None:
        self.closed = True


def tissue_image(rows: int = 512, cols: int = 768, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A test image and its tissue truth: glass around one rectangle of stained tissue.

    The tissue (rows 43 % .. 80 %, columns 30 % .. cols - 16, edges off any power-of-two grid)
    is purple with a red channel that varies smoothly across it, so :func:`red_bins` gives
    several classes; the rest is glass.
    Returns (image, tissue) with ``tissue`` a bool (rows, cols) array.
    """
    rng = np.random.default_rng(seed)
    image = np.full((rows, cols, 3), 245, np.uint8)
    r0, r1, c0, c1 = int(rows * 0.43), int(rows * 0.8), int(cols * 0.3), cols - 16
    tissue = np.zeros((rows, cols), bool)
    tissue[r0:r1, c0:c1] = True
    yy, xx = np.mgrid[r0:r1, c0:c1]
    red = 120 + 110 * (xx - c0) / (c1 - c0) * (0.5 + 0.5 * np.sin(yy / 23.0) ** 2)
    image[r0:r1, c0:c1, 0] = np.clip(red + rng.normal(0, 3, red.shape), 0, 255).astype(np.uint8)
    image[r0:r1, c0:c1, 1] = 60
    image[r0:r1, c0:c1, 2] = 150
    return image, tissue


# -- the models -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeHead:
    task: str
    classes: tuple[CodedClass, ...]
    indeterminate_below: float = 0.5
    temperature: float | None = None  # None: not calibrated


def red_bins(pixels: np.ndarray, n_classes: int) -> np.ndarray:
    """Class per pixel: the red channel cut into ``n_classes`` equal bins (uint8)."""
    return ((pixels[..., 0].astype(np.uint16) * n_classes) >> 8).astype(np.uint8)


def mean_intensity(tiles: np.ndarray) -> np.ndarray:
    """(n, 2) float32: P(second class) = mean of each tile's pixels / 255."""
    m = tiles.reshape(len(tiles), -1).mean(axis=1, dtype=np.float64) / 255.0
    return np.stack([1.0 - m, m], axis=1).astype(np.float32)


@dataclass
class FakeSegmenter:
    """A :class:`~glio_node.ports.ModelRunner` with one segmentation head: :func:`red_bins`."""

    name: str = "fake-regions"
    tile_size: int = 64
    um_per_px: float = 1.0
    overlap: int = 16
    classes: tuple[CodedClass, ...] = REGION_CLASSES[:4]
    batch_size: int = 8
    calls: list[int] = field(default_factory=list)  # tiles per predict call

    def __post_init__(self) -> None:
        self.heads = (FakeHead("segmentation", self.classes),)

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        _check_batch(self, tiles)
        self.calls.append(len(tiles))
        return {"segmentation": red_bins(tiles, len(self.classes))}


@dataclass
class FakeClassifier:
    """A :class:`~glio_node.ports.ModelRunner` with one two-class head: :func:`mean_intensity`."""

    name: str = "fake-mgmt"
    tile_size: int = 32
    um_per_px: float = 2.0
    overlap: int = 0
    task: str = "mgmt"
    classes: tuple[CodedClass, ...] = MGMT_CLASSES
    indeterminate_below: float = 0.6
    batch_size: int = 8
    calls: list[int] = field(default_factory=list)
    temperature: float | None = None  # the head's calibration; None: not calibrated
    features: bool = False  # also return colour_features under FEATURES_KEY (the OOD gate's input)

    def __post_init__(self) -> None:
        if len(self.classes) != 2:
            raise ValueError(f"FakeClassifier has two classes, got {len(self.classes)}")
        self.heads = (FakeHead(self.task, self.classes, self.indeterminate_below, self.temperature),)

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        _check_batch(self, tiles)
        self.calls.append(len(tiles))
        out = {self.task: mean_intensity(tiles)}
        if self.features:
            from glio_node.ood import FEATURES_KEY

            out[FEATURES_KEY] = colour_features(tiles)
        return out


def colour_features(tiles: np.ndarray) -> np.ndarray:
    """(n, 6) float32 per-tile features: mean and standard deviation of R, G, B / 255."""
    x = tiles.reshape(len(tiles), -1, 3).astype(np.float64) / 255.0
    return np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=1).astype(np.float32)


def channel_means(tiles: np.ndarray, embed_dim: int) -> np.ndarray:
    """(n, embed_dim) float32: component j = the tile's mean of channel j % 3 / 255, times 1 + j // 3."""
    means = tiles.reshape(len(tiles), -1, 3).mean(axis=1, dtype=np.float64) / 255.0
    j = np.arange(embed_dim)
    return (means[:, j % 3] * (1 + j // 3)).astype(np.float32)


@dataclass
class FakeEncoder:
    """A :class:`~glio_node.ports.TileEncoder`: embeddings = :func:`channel_means`.

    ``batches`` holds a weak reference to every tile batch it was given, so a test can prove the
    pipeline kept no tile image once the slide is analysed.
    """

    name: str = "fake-encoder"
    tile_size: int = 32
    um_per_px: float = 2.0
    overlap: int = 0
    embed_dim: int = 6
    batch_size: int = 8
    heads: tuple = ()
    calls: list[int] = field(default_factory=list)
    batches: list = field(default_factory=list)  # weakref.ref to each tile batch

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        import weakref  # noqa: PLC0415

        _check_batch(self, tiles)
        self.calls.append(len(tiles))
        self.batches.append(weakref.ref(tiles))
        return {"embeddings": channel_means(tiles, self.embed_dim)}


@dataclass
class FakeAggregator:
    """A :class:`~glio_node.ports.BagRunner` with two classes and one fold per ``offsets`` entry.

    Attention = the bag's first embedding component, normalised to sum 1; fold k's P(second
    class) = clip(attention-weighted mean of that component + offsets[k], 0, 1).  ``bags`` keeps
    every bag it was given (the test's evidence of what the pipeline buffered).
    """

    name: str = "fake-mgmt-abmil"
    task: str = "mgmt"
    classes: tuple[CodedClass, ...] = MGMT_CLASSES
    encoder: str = "fake-encoder"
    indeterminate_below: float = 0.0
    max_fold_spread: float = 1.0
    offsets: tuple[float, ...] = (0.0,)
    bags: list = field(default_factory=list)

    def predict_bag(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.bags.append(np.array(embeddings))
        x = np.asarray(embeddings[:, 0], np.float64) + 1e-6
        attention = x / x.sum()
        p = float((attention * x).sum())
        probs = np.array([[1 - q, q] for q in np.clip([p + o for o in self.offsets], 0.0, 1.0)], np.float32)
        return probs, np.repeat(attention[None].astype(np.float32), len(self.offsets), axis=0)


def _check_batch(runner: FakeSegmenter | FakeClassifier | FakeEncoder, tiles: np.ndarray) -> None:
    t = runner.tile_size
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1:] != (t, t, 3):
        raise ValueError(f"{runner.name}: tiles must be (n, {t}, {t}, 3) uint8, got {tiles.shape} {tiles.dtype}")
    if not 1 <= len(tiles) <= runner.batch_size:
        raise ValueError(f"{runner.name}: {len(tiles)} tiles, the batch size is {runner.batch_size}")


# -- the job's seams ------------------------------------------------------------------------


def fake_slide_opener(slide: FakeSlide, opened: list | None = None):
    """An ``open_slide`` for :func:`glio_node.job.run_job` that returns ``slide`` for any paths;
    each call's (paths, allow_gaps) is appended to ``opened`` when given."""

    def open_slide(paths: Sequence[Path], allow_gaps: bool) -> FakeSlide:
        if opened is not None:
            opened.append((list(paths), allow_gaps))
        return slide

    return open_slide


def fake_models(*runners, algorithm: Algorithm = FAKE_ALGORITHM, device: str = "cpu", ood=None, aggregators=()):
    """A ``load_models`` for :func:`glio_node.job.run_job` that hands out ``runners`` (default:
    a :class:`FakeSegmenter` and a :class:`FakeClassifier`) with ``algorithm`` (and the OOD gate
    ``ood``, and the ``aggregators`` reading an encoder among ``runners``)."""
    from glio_node.job import Models

    chosen = tuple(runners) or (FakeSegmenter(), FakeClassifier())

    def load_models(bundle_dir: Path, asked_device: str, batch_size: int, bundles: object) -> Models:
        for r in chosen:
            if getattr(r, "batch_size", batch_size) < batch_size:
                raise ValueError(f"{r.name}: batch size {r.batch_size} < the job's {batch_size}")
        return Models(algorithm, chosen, device, ood=ood, aggregators=tuple(aggregators))

    return load_models


# -- metadata-only DICOM headers --------------------------------------------------------------


@dataclass(frozen=True)
class _Uids:
    seed: str

    def __call__(self, *names: object) -> str:
        return generate_uid(entropy_srcs=["glio_node.testing", self.seed, *map(str, names)])


def _level_header(uids: _Uids, level: int, rows: int, cols: int, frame: int, mm_per_px: float) -> Dataset:
    """A metadata-only VL WSI level (no pixel data: the writers never read it)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = uids("level", level)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids("study"), uids("series")
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids("frame-of-reference"), "SLIDE_CORNER"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SM", 1, level + 1
    ds.PatientName, ds.PatientID = "SYNTHETIC^FAKE", "FAKE-0001"
    ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20000101", "000000", "", "FAKE"
    ds.Manufacturer = "glio_node.testing"
    flavour = ["ORIGINAL" if level == 0 else "DERIVED", "PRIMARY", "VOLUME", "NONE" if level == 0 else "RESAMPLED"]
    ds.ImageType = flavour
    ds.Rows = ds.Columns = frame
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = rows, cols
    ds.NumberOfFrames = math.ceil(rows / frame) * math.ceil(cols / frame)
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    ds.TotalPixelMatrixOriginSequence = [origin]
    ds.ImageOrientationSlide = [0.0, -1.0, 0.0, -1.0, 0.0, 0.0]
    shared, measures, frame_type, path = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [mm_per_px, mm_per_px], 0.004
    frame_type.FrameType = flavour
    path.OpticalPathIdentifier = "1"
    shared.PixelMeasuresSequence = [measures]
    shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
    shared.OpticalPathIdentificationSequence = [path]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.ContainerIdentifier = "FAKE-SLIDE"
    ds.IssuerOfTheContainerIdentifierSequence = []
    container_type = Dataset()
    container_type.CodeValue, container_type.CodingSchemeDesignator = "433466003", "SCT"
    container_type.CodeMeaning = "Microscope slide"
    ds.ContainerTypeCodeSequence = [container_type]
    specimen = Dataset()
    specimen.SpecimenIdentifier, specimen.SpecimenUID = "FAKE-SPECIMEN", uids("specimen")
    specimen.IssuerOfTheSpecimenIdentifierSequence, specimen.SpecimenPreparationSequence = [], []
    ds.SpecimenDescriptionSequence = [specimen]
    return ds
