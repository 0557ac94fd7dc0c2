"""Synthetic DICOM VL Whole Slide Microscopy images with a known ground truth.

A synthetic slide is a :class:`SlideLayout` (a tissue mask and a map of Ivy GAP region blobs,
both defined in micrometres on the slide) painted with :func:`glio_node.synthetic.textures.render`
and written as a complete VL Whole Slide Microscopy Image IOD: one pyramid level per instance
(or per concatenation), plus optional LABEL and OVERVIEW images in the same series.

Geometry: the total pixel matrix of every level starts at the same physical point, the top-left
corner of pixel (1, 1), and a level-``k`` pixel is ``2**k`` base pixels wide.  The truth of a pixel
is the layout at the pixel centre's physical position, so truth at any spacing is well defined and
matches the convention of :mod:`glio_node.results`.  ``TotalPixelMatrixOriginSequence`` holds that
same corner on every level (the reading both common dicomizers and highdicom's pyramid writer use),
and the per-frame ``X/YOffsetInSlideCoordinateSystem`` of TILED_SPARSE levels hold each frame's
top-left corner in that same convention.

Levels are rendered tile by tile at their own spacing, so memory stays bounded by one tile plus
the encoded frames of one instance (uncompressed frames are spooled to a temporary file).

Everything is deterministic in the spec: UIDs are derived from it (UUID v5 under 2.25), dates
are fixed, so writing the same spec twice gives the same files.
"""

from __future__ import annotations

import math
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
)

from glio_node import __version__
from glio_node.synthetic.textures import REGION_CLASSES, Signature, render

TransferSyntaxName = Literal["jpeg", "jpeg2000", "uncompressed"]
DimensionOrganization = Literal["TILED_FULL", "TILED_SPARSE"]

# Obviously synthetic identifiers: nothing here may ever be mistaken for a patient.
PATIENT_NAME = "SYNTHETIC^DEMO"
PATIENT_ID = "SYNTH-0001"
ACCESSION_NUMBER = "SYNTH0001"
STUDY_ID = "SYNTH1"
CONTAINER_IDENTIFIER = "SYNTH-SLIDE-0001"
SPECIMEN_IDENTIFIER = "SYNTH-SPECIMEN-0001"
_DATE = "20240102"
_TIME = "120000"
_MANUFACTURER = "glio-node synthetic slide writer"

# Slide coordinate system (PS3.3 C.8.12.2.1): the image's rows run along -Y of the slide and its
# columns along -X, the usual orientation of a slide scanned label-left.  The image's top-left
# corner sits at (_ORIGIN_X_MM + image height, _ORIGIN_Y_MM + image width) so that the whole
# image lies at positive slide coordinates.
IMAGE_ORIENTATION_SLIDE = (0.0, -1.0, 0.0, -1.0, 0.0, 0.0)
_ORIGIN_X_MM = 2.0
_ORIGIN_Y_MM = 20.0
_SLICE_THICKNESS_MM = 0.004  # nominal 4 µm section
_JPEG_QUALITY = 90
_JPEG2000_LOSSY_PSNR = 45.0

_TRANSFER_SYNTAXES: dict[str, UID] = {
    "jpeg": JPEGBaseline8Bit,
    "jpeg2000": JPEG2000Lossless,
    "jpeg2000-lossy": JPEG2000,
    "uncompressed": ExplicitVRLittleEndian,
}


@dataclass(frozen=True)
class SlideSpec:
    """What synthetic slide to write; every field has a default that makes a small valid slide."""

    width_px: int = 2048  # base level TotalPixelMatrixColumns
    height_px: int = 1536  # base level TotalPixelMatrixRows
    um_per_px: float = 0.5  # base level spacing (square pixels)
    tile_size: int = 256  # frame Rows = Columns
    levels: int = 3  # pyramid levels, each 2x down from the previous; stops before a level < 1 tile
    transfer_syntax: TransferSyntaxName = "jpeg"
    jpeg2000_lossless: bool = True  # jpeg2000 only: 1.2.840.10008.1.2.4.90 (True) or .91 (False)
    dimension_organization: DimensionOrganization = "TILED_FULL"
    frames_per_file: int | None = None  # None: one instance per level; N: concatenations of <= N
    shuffle_frames: bool = False  # TILED_SPARSE only: frames stored in random order
    omit_background_frames: bool = False  # TILED_SPARSE only: pure-glass frames are not stored
    context_images: bool = True  # also write LABEL and OVERVIEW images (same series)
    signature: Signature = Signature(0, False, False)
    seed: int = 0
    region_cell_um: float = 200.0  # approximate size of a region blob
    signature_fraction: float = 1.0  # < 1: MGMT/EGFR show only in blobs covering this fraction (textures.signature_mask)

    def __post_init__(self) -> None:
        if self.width_px < 1 or self.height_px < 1:
            raise ValueError(f"slide size {self.width_px}x{self.height_px} px must be at least 1x1")
        if not self.um_per_px > 0:
            raise ValueError(f"base spacing {self.um_per_px} µm/px must be positive")
        if self.tile_size < 16 or self.tile_size % 16:
            raise ValueError(f"tile size {self.tile_size} px must be a positive multiple of 16")
        if self.levels < 1:
            raise ValueError(f"levels {self.levels} must be at least 1")
        if self.transfer_syntax not in ("jpeg", "jpeg2000", "uncompressed"):
            raise ValueError(
                f"transfer syntax {self.transfer_syntax!r} is not one of jpeg, jpeg2000, uncompressed"
            )
        if self.dimension_organization not in ("TILED_FULL", "TILED_SPARSE"):
            raise ValueError(
                f"dimension organization {self.dimension_organization!r} is not TILED_FULL or TILED_SPARSE"
            )
        if self.frames_per_file is not None and self.frames_per_file < 1:
            raise ValueError(f"frames per file {self.frames_per_file} must be at least 1 (or None)")
        if self.dimension_organization == "TILED_FULL" and (
            self.shuffle_frames or self.omit_background_frames
        ):
            raise ValueError(
                "shuffle_frames and omit_background_frames need TILED_SPARSE: a TILED_FULL level "
                "stores every tile in row-major order"
            )
        if not self.region_cell_um > 0:
            raise ValueError(f"region cell {self.region_cell_um} µm must be positive")
        if not 0.0 < self.signature_fraction <= 1.0:
            raise ValueError(f"signature fraction {self.signature_fraction} must be in (0, 1]")

    @property
    def width_um(self) -> float:
        return self.width_px * self.um_per_px

    @property
    def height_um(self) -> float:
        return self.height_px * self.um_per_px

    @property
    def transfer_syntax_uid(self) -> UID:
        if self.transfer_syntax == "jpeg2000" and not self.jpeg2000_lossless:
            return _TRANSFER_SYNTAXES["jpeg2000-lossy"]
        return _TRANSFER_SYNTAXES[self.transfer_syntax]

    def level_geometries(self) -> tuple[LevelGeometry, ...]:
        """The pyramid: level k is 2**k times coarser; stops before a level smaller than a tile."""
        out = []
        for k in range(self.levels):
            factor = 2**k
            cols = math.ceil(self.width_px / factor)
            rows = math.ceil(self.height_px / factor)
            if k > 0 and max(cols, rows) < self.tile_size:
                break
            out.append(LevelGeometry(k, cols, rows, self.um_per_px * factor, self.tile_size))
        return tuple(out)


@dataclass(frozen=True)
class LevelGeometry:
    """One pyramid level: its size in pixels, its spacing and its tile grid."""

    index: int  # 0 = base
    columns: int  # TotalPixelMatrixColumns
    rows: int  # TotalPixelMatrixRows
    um_per_px: float
    tile_size: int

    @property
    def tile_columns(self) -> int:
        return math.ceil(self.columns / self.tile_size)

    @property
    def tile_rows(self) -> int:
        return math.ceil(self.rows / self.tile_size)

    @property
    def tile_count(self) -> int:
        return self.tile_columns * self.tile_rows


def _cell_centres(count: int, start_um: float, um_per_px: float) -> np.ndarray:
    return start_um + (np.arange(count, dtype=np.float64) + 0.5) * um_per_px


def raster_shape(width_um: float, height_um: float, um_per_px: float) -> tuple[int, int]:
    """(rows, cols) of a raster covering the slide at a spacing (rounded up, see results.py)."""
    if not um_per_px > 0:
        raise ValueError(f"spacing {um_per_px} µm/px must be positive")
    # Round before ceil so 768 * 0.5 / 1.0 does not become 385 through floating-point noise.
    rows = math.ceil(round(height_um / um_per_px, 6))
    cols = math.ceil(round(width_um / um_per_px, 6))
    return max(rows, 1), max(cols, 1)


class SlideLayout:
    """The slide's ground truth as functions of physical position (µm from the image's top-left).

    - tissue: the union of one or two smooth irregular blobs (ellipses with a few harmonics on
      their boundary), scaled so that about half of the image is tissue;
    - regions: Voronoi cells of random seeds (nearest seed wins), each labelled with a region
      class; every class appears once there are at least as many seeds as classes.
    """

    def __init__(self, width_um: float, height_um: float, region_cell_um: float, seed: int):
        self.width_um = float(width_um)
        self.height_um = float(height_um)
        rng = np.random.default_rng([seed, 0x5_11DE])
        n_blobs = int(rng.integers(1, 3))
        self._blobs = []
        for i in range(n_blobs):
            if n_blobs == 1:
                cx, cy = rng.uniform(0.4, 0.6) * width_um, rng.uniform(0.4, 0.6) * height_um
            else:  # side by side along the longer axis
                t = (0.3 if i == 0 else 0.7) + rng.uniform(-0.05, 0.05)
                if width_um >= height_um:
                    cx, cy = t * width_um, rng.uniform(0.4, 0.6) * height_um
                else:
                    cx, cy = rng.uniform(0.4, 0.6) * width_um, t * height_um
            a = rng.uniform(0.8, 1.2) * width_um / (2.0 * n_blobs if width_um >= height_um else 2.0)
            b = rng.uniform(0.8, 1.2) * height_um / (2.0 if width_um >= height_um else 2.0 * n_blobs)
            angle = rng.uniform(-0.4, 0.4)
            harmonics = [(j, rng.uniform(0.03, 0.09), rng.uniform(0, 2 * np.pi)) for j in (2, 3, 5)]
            self._blobs.append((cx, cy, a, b, angle, harmonics))
        self._scale = 1.0
        self._scale = self._fit_scale(target=0.5)

        n_seeds = max(3, round(width_um * height_um / region_cell_um**2))
        self._seeds = np.c_[rng.uniform(0, width_um, n_seeds), rng.uniform(0, height_um, n_seeds)]
        classes = np.concatenate(
            [rng.permutation(len(REGION_CLASSES)) for _ in range(n_seeds // len(REGION_CLASSES) + 1)]
        )
        self._seed_labels = classes[:n_seeds].astype(np.uint8)

    @cached_property
    def _tree(self):
        from scipy.spatial import cKDTree

        return cKDTree(self._seeds)

    def _blob_field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Max over blobs of (boundary radius - normalised radius); tissue where > 0."""
        out = np.full(x.shape, -np.inf)
        for cx, cy, a, b, angle, harmonics in self._blobs:
            dx, dy = x - cx, y - cy
            u = (dx * np.cos(angle) + dy * np.sin(angle)) / (a * self._scale)
            v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (b * self._scale)
            theta = np.arctan2(v, u)
            boundary = 1.0 + sum(c * np.cos(j * theta + phase) for j, c, phase in harmonics)
            np.maximum(out, boundary - np.hypot(u, v), out=out)
        return out

    def _fit_scale(self, target: float) -> float:
        """Bisect the blob size so that the tissue fraction of the image is close to target."""
        ys, xs = np.meshgrid(
            _cell_centres(96, 0, self.height_um / 96), _cell_centres(128, 0, self.width_um / 128),
            indexing="ij",
        )
        lo, hi = 0.2, 2.0
        for _ in range(30):
            self._scale = (lo + hi) / 2
            fraction = float((self._blob_field(xs, ys) > 0).mean())
            if fraction < target:
                lo = self._scale
            else:
                hi = self._scale
        return (lo + hi) / 2

    def tissue_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """bool array: True where (x_um, y_um) is tissue."""
        return self._blob_field(np.asarray(x_um, float), np.asarray(y_um, float)) > 0

    def labels_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """uint8 array: the region class index at (x_um, y_um), tissue or not."""
        x = np.asarray(x_um, float)
        y = np.asarray(y_um, float)
        _, nearest = self._tree.query(np.c_[x.ravel(), y.ravel()])
        return self._seed_labels[nearest].reshape(x.shape)

    def sample(
        self, x0_um: float, y0_um: float, um_per_px: float, rows: int, cols: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(labels uint8, tissue bool) at the centres of a rows x cols pixel patch whose top-left
        corner is at (x0_um, y0_um)."""
        y, x = np.meshgrid(
            _cell_centres(rows, y0_um, um_per_px), _cell_centres(cols, x0_um, um_per_px),
            indexing="ij",
        )
        return self.labels_at(x, y), self.tissue_at(x, y)

    def truth(self, um_per_px: float, chunk_rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(labels with 255 = glass, tissue) over the whole image at a spacing, row chunk by chunk."""
        rows, cols = raster_shape(self.width_um, self.height_um, um_per_px)
        labels = np.empty((rows, cols), np.uint8)
        tissue = np.empty((rows, cols), bool)
        for r0 in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - r0)
            lab, tis = self.sample(0.0, r0 * um_per_px, um_per_px, n, cols)
            lab[~tis] = 255
            labels[r0 : r0 + n] = lab
            tissue[r0 : r0 + n] = tis
        return labels, tissue


@dataclass(frozen=True)
class SyntheticSlide:
    """The written files and the truth they were painted from."""

    files: tuple[Path, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    spec: SlideSpec
    layout: SlideLayout = field(repr=False, compare=False)

    @property
    def level_files(self) -> tuple[Path, ...]:
        """The pyramid level instances (what an analysis reads), without LABEL / OVERVIEW."""
        return tuple(p for p in self.files if p.name.startswith("level"))

    def truth_labels(self, um_per_px: float) -> np.ndarray:
        """uint8 (rows, cols) region class per pixel at that spacing, 255 = glass.

        Rows and columns cover the slide from the top-left corner of its total pixel matrix,
        rounded up (see :mod:`glio_node.results`).
        """
        return self.layout.truth(um_per_px)[0]

    def truth_tissue(self, um_per_px: float) -> np.ndarray:
        """bool (rows, cols): True where the pixel centre lies on tissue; geometry as truth_labels."""
        return self.layout.truth(um_per_px)[1]

    def render_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The RGB pixels the writer painted for a region of a level (before encoding)."""
        return render_patch(self.spec, self.layout, level, x, y, width, height)


def layout_for(spec: SlideSpec) -> SlideLayout:
    return SlideLayout(spec.width_um, spec.height_um, spec.region_cell_um, spec.seed)


def render_patch(
    spec: SlideSpec, layout: SlideLayout, level: int, x: int, y: int, width: int, height: int
) -> np.ndarray:
    """Paint a (height, width, 3) patch of a level whose top-left pixel is column x, row y."""
    um = spec.um_per_px * 2**level
    labels, tissue = layout.sample(x * um, y * um, um, height, width)
    return render(labels, x * um, y * um, um, spec.signature, tissue, spec.seed, spec.signature_fraction)


# --------------------------------------------------------------------------------------------
# DICOM writing


@dataclass(frozen=True)
class _Uids:
    study: UID
    series: UID
    frame_of_reference: UID
    dimension_organization: UID
    specimen: UID

    @classmethod
    def for_spec(cls, spec: SlideSpec) -> _Uids:
        return cls(*(_uid(spec, name) for name in cls.__dataclass_fields__))

    def instance(self, spec: SlideSpec, *names: object) -> UID:
        return _uid(spec, "instance", *names)


_UID_NAMESPACE = uuid.UUID("6f1d3c52-0d8e-4c57-9a43-2b8e6a5c1e01")  # glio-node synthetic slides


def _uid(spec: SlideSpec, *names: object) -> UID:
    """A UID under the 2.25 (UUID) root, derived from the spec: the same spec gives the same UIDs.

    (pydicom's ``generate_uid(prefix=None, ...)`` ignores its entropy sources and is random.)
    """
    key = "\x1f".join([repr(spec), *map(str, names)])
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, key).int}")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _srgb_icc_profile() -> bytes:
    """LittleCMS's built-in sRGB profile, with a fixed creation date so files are reproducible."""
    import struct

    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[24:36] = struct.pack(">6H", 2024, 1, 2, 12, 0, 0)  # ICC header dateTimeNumber
    return bytes(profile)


def _common_dataset(spec: SlideSpec, uids: _Uids) -> Dataset:
    """Patient, study, series, frame of reference, equipment, specimen, optical path: shared by
    every instance of the slide."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    # Patient
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic data: no patient"
    # General Study
    ds.StudyInstanceUID = uids.study
    ds.StudyDate = _DATE
    ds.StudyTime = _TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = STUDY_ID
    ds.AccessionNumber = ACCESSION_NUMBER
    ds.StudyDescription = "SYNTHETIC slide (glio-node test data, not a patient)"
    # General Series, Whole Slide Microscopy Series
    ds.Modality = "SM"
    ds.SeriesInstanceUID = uids.series
    ds.SeriesNumber = 1
    ds.SeriesDate = _DATE
    ds.SeriesTime = _TIME
    ds.SeriesDescription = "SYNTHETIC H&E-like slide"
    # Frame of Reference
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    # General / Enhanced General Equipment
    ds.Manufacturer = _MANUFACTURER
    ds.ManufacturerModelName = "glio_node.synthetic.slide"
    ds.DeviceSerialNumber = "SYNTH-0"
    ds.SoftwareVersions = __version__
    # Acquisition Context (type 2: empty)
    ds.AcquisitionContextSequence = DicomSequence([])
    # Specimen
    ds.ContainerIdentifier = CONTAINER_IDENTIFIER
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence([_code("433466003", "SCT", "Microscope slide")])
    specimen = Dataset()
    specimen.SpecimenIdentifier = SPECIMEN_IDENTIFIER
    specimen.IssuerOfTheSpecimenIdentifierSequence = DicomSequence([])
    specimen.SpecimenUID = uids.specimen
    specimen.SpecimenShortDescription = "Synthetic H&E-like section"
    specimen.SpecimenPreparationSequence = DicomSequence([])
    ds.SpecimenDescriptionSequence = DicomSequence([specimen])
    # Optical Path
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.OpticalPathDescription = "Brightfield, synthetic"
    path.IlluminationTypeCodeSequence = DicomSequence(
        [_code("111744", "DCM", "Brightfield illumination")]
    )
    path.IlluminationColorCodeSequence = DicomSequence([_code("414298005", "SCT", "Full Spectrum")])
    path.ICCProfile = _srgb_icc_profile()
    path.ColorSpace = "SRGB"
    ds.OpticalPathSequence = DicomSequence([path])
    ds.NumberOfOpticalPaths = 1
    return ds


def _image_dataset(
    spec: SlideSpec,
    common: Dataset,
    *,
    image_type: Sequence[str],
    columns: int,
    rows: int,
    tile_size: tuple[int, int],  # (Rows, Columns) of a frame
    um_per_px: float,
    sop_instance_uid: UID,
    instance_number: int,
    transfer_syntax: UID,
) -> Dataset:
    ds = Dataset()
    ds.update(common)
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceNumber = instance_number
    ds.ImageType = list(image_type)
    ds.ContentDate = _DATE
    ds.ContentTime = _TIME
    ds.AcquisitionDateTime = _DATE + _TIME
    ds.InstanceCreationDate = _DATE
    ds.InstanceCreationTime = _TIME
    # Whole Slide Microscopy Image
    mm = um_per_px / 1000.0
    ds.ImagedVolumeWidth = round(columns * mm, 6)
    ds.ImagedVolumeHeight = round(rows * mm, 6)
    ds.ImagedVolumeDepth = _SLICE_THICKNESS_MM * 1000.0  # µm
    ds.TotalPixelMatrixColumns = columns
    ds.TotalPixelMatrixRows = rows
    ds.TotalPixelMatrixFocalPlanes = 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = _origin_mm(spec)[0]
    origin.YOffsetInSlideCoordinateSystem = _origin_mm(spec)[1]
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    ds.ImageOrientationSlide = list(IMAGE_ORIENTATION_SLIDE)
    ds.VolumetricProperties = "VOLUME"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    # LABEL and OVERVIEW images show the slide label (PS3.3 requires YES for both).
    shows_label = image_type[2] in ("LABEL", "OVERVIEW")
    ds.SpecimenLabelInImage = "YES" if shows_label else "NO"
    ds.BurnedInAnnotation = "YES" if shows_label else "NO"
    # Image Pixel
    ds.Rows, ds.Columns = tile_size
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if transfer_syntax == JPEGBaseline8Bit:
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    elif transfer_syntax == JPEG2000Lossless:
        ds.PhotometricInterpretation = "YBR_RCT"
        ds.LossyImageCompression = "00"
    elif transfer_syntax == JPEG2000:
        ds.PhotometricInterpretation = "YBR_ICT"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_15444_1"
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.LossyImageCompression = "00"
    # Shared functional groups
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [round(mm, 9), round(mm, 9)]
    measures.SliceThickness = _SLICE_THICKNESS_MM
    shared.PixelMeasuresSequence = DicomSequence([measures])
    frame_type = Dataset()
    frame_type.FrameType = list(image_type)
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "1"
    shared.OpticalPathIdentificationSequence = DicomSequence([optical_path])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    return ds


def _origin_mm(spec: SlideSpec) -> tuple[float, float]:
    """Slide coordinates (mm) of the top-left corner of every level's total pixel matrix."""
    return (
        round(_ORIGIN_X_MM + spec.height_um / 1000.0, 6),
        round(_ORIGIN_Y_MM + spec.width_um / 1000.0, 6),
    )


def _slide_position_mm(spec: SlideSpec, column: int, row: int, um_per_px: float) -> tuple[float, float]:
    """Slide coordinates of the top-left corner of 0-based pixel (column, row) of a level."""
    x0, y0 = _origin_mm(spec)
    mm = um_per_px / 1000.0
    # ImageOrientationSlide: along a row (+column) is slide -Y, down a column (+row) is slide -X.
    return round(x0 - row * mm, 6), round(y0 - column * mm, 6)


def _encode(tile: np.ndarray, transfer_syntax: UID) -> bytes:
    if transfer_syntax == JPEGBaseline8Bit:
        return bytes(imagecodecs.jpeg8_encode(tile, level=_JPEG_QUALITY, subsampling="422"))
    if transfer_syntax == JPEG2000Lossless:
        return bytes(
            imagecodecs.jpeg2k_encode(
                tile, level=0, codecformat=imagecodecs.JPEG2K.CODEC.J2K, reversible=True, mct=True
            )
        )
    if transfer_syntax == JPEG2000:
        return bytes(
            imagecodecs.jpeg2k_encode(
                tile,
                level=_JPEG2000_LOSSY_PSNR,
                codecformat=imagecodecs.JPEG2K.CODEC.J2K,
                reversible=False,
                mct=True,
            )
        )
    return np.ascontiguousarray(tile, dtype=np.uint8).tobytes()


class _FrameSink:
    """Collects encoded frames of one instance: in memory when compressed (small), in a
    temporary file when uncompressed (a full base level would not fit in bounded memory)."""

    def __init__(self, transfer_syntax: UID, tmp_dir: Path):
        self.compressed = transfer_syntax.is_compressed
        self.frames: list[bytes] = []
        self.raw_bytes = 0
        self._file = None if self.compressed else tempfile.TemporaryFile(dir=tmp_dir)

    def add(self, frame: bytes) -> None:
        self.raw_bytes += len(frame)
        if self._file is None:
            self.frames.append(frame)
        else:
            self._file.write(frame)

    def assign(self, ds: Dataset) -> None:
        if self._file is None:
            ds.PixelData = encapsulate(self.frames, has_bot=True)
        else:
            self._file.flush()
            self._file.seek(0)
            ds.PixelData = self._file  # pydicom 3 writes a buffered value in chunks
        ds["PixelData"].VR = "OB"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _save(ds: Dataset, path: Path, transfer_syntax: UID) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")  # pydicom's root
    meta.ImplementationVersionName = f"GLIO_NODE_{__version__}"[:16]
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def _tile_order(spec: SlideSpec, level: LevelGeometry, layout: SlideLayout) -> list[tuple[int, int]]:
    """(tile_row, tile_col) of every stored frame, in storage order."""
    tiles = [(tr, tc) for tr in range(level.tile_rows) for tc in range(level.tile_columns)]
    if spec.omit_background_frames:
        kept = []
        for tr, tc in tiles:
            x, y = tc * level.tile_size, tr * level.tile_size
            w, h = min(level.tile_size, level.columns - x), min(level.tile_size, level.rows - y)
            um = level.um_per_px
            if layout.sample(x * um, y * um, um, h, w)[1].any():
                kept.append((tr, tc))
        tiles = kept
    if spec.shuffle_frames:
        rng = np.random.default_rng([spec.seed, level.index, 0x5_4FF1E])
        tiles = [tiles[i] for i in rng.permutation(len(tiles))]
    return tiles


def _chunks(items: list, size: int | None) -> Iterator[tuple[int, list]]:
    if size is None or size >= len(items):
        yield 0, items
        return
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _sparse_per_frame(
    spec: SlideSpec, level: LevelGeometry, tiles: Sequence[tuple[int, int]]
) -> DicomSequence:
    items = []
    for tr, tc in tiles:
        col, row = tc * level.tile_size, tr * level.tile_size
        x_mm, y_mm = _slide_position_mm(spec, col, row, level.um_per_px)
        position = Dataset()
        position.ColumnPositionInTotalImagePixelMatrix = col + 1
        position.RowPositionInTotalImagePixelMatrix = row + 1
        position.XOffsetInSlideCoordinateSystem = x_mm
        position.YOffsetInSlideCoordinateSystem = y_mm
        position.ZOffsetInSlideCoordinateSystem = 0.0
        content = Dataset()
        content.DimensionIndexValues = [tc + 1, tr + 1]
        item = Dataset()
        item.FrameContentSequence = DicomSequence([content])
        item.PlanePositionSlideSequence = DicomSequence([position])
        items.append(item)
    return DicomSequence(items)


def _dimension_modules(ds: Dataset, uids: _Uids) -> None:
    """Multi-frame Dimension module: tiles are indexed by column then row position."""
    org = Dataset()
    org.DimensionOrganizationUID = uids.dimension_organization
    ds.DimensionOrganizationSequence = DicomSequence([org])
    index = []
    for keyword, tag in (
        ("ColumnPositionInTotalImagePixelMatrix", 0x0048021E),
        ("RowPositionInTotalImagePixelMatrix", 0x0048021F),
    ):
        item = Dataset()
        item.DimensionOrganizationUID = uids.dimension_organization
        item.DimensionIndexPointer = tag
        item.FunctionalGroupPointer = 0x0048021A  # PlanePositionSlideSequence
        item.DimensionDescriptionLabel = keyword.replace("InTotalImagePixelMatrix", "")
        index.append(item)
    ds.DimensionIndexSequence = DicomSequence(index)


def _write_level(
    spec: SlideSpec,
    layout: SlideLayout,
    level: LevelGeometry,
    common: Dataset,
    uids: _Uids,
    out_dir: Path,
) -> list[Path]:
    ts = spec.transfer_syntax_uid
    image_type = (
        ("ORIGINAL", "PRIMARY", "VOLUME", "NONE")
        if level.index == 0
        else ("DERIVED", "PRIMARY", "VOLUME", "RESAMPLED")
    )
    sparse = spec.dimension_organization == "TILED_SPARSE"
    tiles = _tile_order(spec, level, layout)
    chunks = list(_chunks(tiles, spec.frames_per_file))
    concatenated = len(chunks) > 1
    source_uid = uids.instance(spec, "level", level.index)
    paths = []
    for number, (offset, chunk) in enumerate(chunks, start=1):
        sop_uid = uids.instance(spec, "level", level.index, number) if concatenated else source_uid
        ds = _image_dataset(
            spec,
            common,
            image_type=image_type,
            columns=level.columns,
            rows=level.rows,
            tile_size=(level.tile_size, level.tile_size),
            um_per_px=level.um_per_px,
            sop_instance_uid=sop_uid,
            instance_number=level.index + 1,
            transfer_syntax=ts,
        )
        ds.DimensionOrganizationType = spec.dimension_organization
        _dimension_modules(ds, uids)
        ds.NumberOfFrames = len(chunk)
        if sparse:
            ds.PerFrameFunctionalGroupsSequence = _sparse_per_frame(spec, level, chunk)
        if concatenated:
            ds.ConcatenationUID = uids.instance(spec, "concatenation", level.index)
            ds.SOPInstanceUIDOfConcatenationSource = source_uid
            ds.InConcatenationNumber = number
            ds.InConcatenationTotalNumber = len(chunks)
            ds.ConcatenationFrameOffsetNumber = offset
        sink = _FrameSink(ts, out_dir)
        try:
            for tr, tc in chunk:
                t = level.tile_size
                tile = render_patch(spec, layout, level.index, tc * t, tr * t, t, t)
                sink.add(_encode(tile, ts))
            if ts.is_compressed:
                raw = len(chunk) * level.tile_size**2 * 3
                ratio = raw / max(sink.raw_bytes, 1)
                if ds.LossyImageCompression == "01":
                    ds.LossyImageCompressionRatio = f"{ratio:.2f}"[:16]
            sink.assign(ds)
            name = f"level{level.index}" + (f"-part{number:03d}" if concatenated else "") + ".dcm"
            path = out_dir / name
            _save(ds, path, ts)
        finally:
            sink.close()
        paths.append(path)
    return paths


def _label_pixels(spec: SlideSpec, cols: int = 384, rows: int = 256) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (cols, rows), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle((4, 4, cols - 5, rows - 5), outline=(20, 20, 20), width=3)
    lines = ("SYNTHETIC", "NOT A PATIENT", PATIENT_ID, f"seed {spec.seed}")
    for i, text in enumerate(lines):
        draw.text((20, 20 + 40 * i), text, fill=(0, 0, 0), font_size=28)
    # A fake 2-D code block, so the label has some structure.
    rng = np.random.default_rng([spec.seed, 0x1ABE1])
    cells = rng.random((10, 10)) < 0.5
    for (r, c), on in np.ndenumerate(cells):
        if on:
            x, y = cols - 110 + 9 * c, rows - 110 + 9 * r
            draw.rectangle((x, y, x + 8, y + 8), fill=0)
    return np.asarray(img)


def _write_context_images(
    spec: SlideSpec, layout: SlideLayout, common: Dataset, uids: _Uids, out_dir: Path
) -> list[Path]:
    """A LABEL and an OVERVIEW image: single-frame, never to be analysed."""
    ts = JPEGBaseline8Bit if spec.transfer_syntax == "jpeg" else ExplicitVRLittleEndian
    paths = []
    label = _label_pixels(spec)
    # Overview: the label beside the imaged area at a coarse spacing (<= 512 px on the long
    # side), as a macro camera would see the slide.  Its spacing is that of the imaged area.
    um = max(spec.width_um, spec.height_um) / 512
    rows, cols = raster_shape(spec.width_um, spec.height_um, um)
    rows, cols = rows + rows % 2, cols + cols % 2
    labels, tissue = layout.sample(0.0, 0.0, um, rows, cols)
    area = render(labels, 0.0, 0.0, um, spec.signature, tissue, spec.seed)
    label_width = 2 * ((rows * label.shape[1] // label.shape[0]) // 2)
    from PIL import Image

    small_label = np.asarray(Image.fromarray(label).resize((label_width, rows)))
    overview = np.concatenate([small_label, area], axis=1)
    for name, pixels, pixel_um, number in (
        ("label", label, 25_000.0 / label.shape[1], 101),
        ("overview", overview, um, 102),
    ):
        h, w = pixels.shape[:2]
        ds = _image_dataset(
            spec,
            common,
            image_type=("ORIGINAL", "PRIMARY", name.upper(), "NONE"),
            columns=w,
            rows=h,
            tile_size=(h, w),
            um_per_px=pixel_um,
            sop_instance_uid=uids.instance(spec, name),
            instance_number=number,
            transfer_syntax=ts,
        )
        ds.DimensionOrganizationType = "TILED_FULL"
        _dimension_modules(ds, uids)
        ds.NumberOfFrames = 1
        if name == "label":
            ds.LabelText = "SYNTHETIC NOT A PATIENT"
            ds.BarcodeValue = PATIENT_ID
        sink = _FrameSink(ts, out_dir)
        try:
            sink.add(_encode(pixels, ts))
            if ds.LossyImageCompression == "01":
                ds.LossyImageCompressionRatio = f"{pixels.size / sink.raw_bytes:.2f}"
            sink.assign(ds)
            path = out_dir / f"{name}.dcm"
            _save(ds, path, ts)
        finally:
            sink.close()
        paths.append(path)
    return paths


def write_synthetic_slide(spec: SlideSpec, out_dir: Path) -> SyntheticSlide:
    """Render ``spec`` and write it as DICOM files into ``out_dir`` (created if missing).

    Files: ``level{k}.dcm`` (or ``level{k}-partNNN.dcm`` for concatenations), ``label.dcm`` and
    ``overview.dcm`` when ``spec.context_images``.  Existing files of the same names are
    overwritten.  Returns the file list, the UIDs and the truth.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = layout_for(spec)
    uids = _Uids.for_spec(spec)
    common = _common_dataset(spec, uids)
    files: list[Path] = []
    for level in spec.level_geometries():
        files += _write_level(spec, layout, level, common, uids, out_dir)
    if spec.context_images:
        files += _write_context_images(spec, layout, common, uids, out_dir)
    return SyntheticSlide(
        files=tuple(files),
        study_instance_uid=str(uids.study),
        series_instance_uid=str(uids.series),
        frame_of_reference_uid=str(uids.frame_of_reference),
        spec=spec,
        layout=layout,
    )
