"""Test slides: our own synthetic writer, slides made by third-party converters, malformed inputs.

Helpers only (no fixtures here; tests/conftest.py wraps them).  Every slide is written once per
test session into a :class:`SlideCache` directory.

Third-party converted slides matter most: the node is judged on slides it did not write itself.
A synthetic slide is rendered level by level into a tiled pyramidal TIFF (JPEG tiles, YCbCr,
resolution tags at 0.5 µm/px) and converted by
- OrthancWSIDicomizer (Debian's orthanc-wsi 1.1), and
- wsidicomizer (PyPI; it reads a generic TIFF through tiffslide and re-encodes the tiles).
The truth of a converted slide is the layout it was rendered from, at any spacing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from glio_node.synthetic.slide import (
    ACCESSION_NUMBER,
    CONTAINER_IDENTIFIER,
    PATIENT_ID,
    PATIENT_NAME,
    SPECIMEN_IDENTIFIER,
    STUDY_ID,
    SlideLayout,
    SlideSpec,
    SyntheticSlide,
    layout_for,
    render_patch,
    write_synthetic_slide,
)

# The default small slide of the unit tests: 1024 x 768 px at 0.5 µm/px, 256-px tiles, 3 levels.
SMALL = SlideSpec(width_px=1024, height_px=768, tile_size=256, levels=3)

ORTHANC_DICOMIZER = "OrthancWSIDicomizer"


# --------------------------------------------------------------------------------------------
# dciodvfy


@dataclass(frozen=True)
class DciodvfyReport:
    path: Path
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


# dciodvfy checks NumberOfFrames of every instance against the full tile grid of its level.
# That is wrong for a TILED_SPARSE level that omits tiles (PS3.3 allows it) and for each instance
# of a concatenation (the count applies to the concatenation as a whole).  Tests may accept this
# one message for exactly those files, and must check the frame count themselves.
DCIODVFY_FRAME_COUNT_FALSE_POSITIVE = re.compile(
    r"^Error - NumberOfFrames does not match expected value for tiled total pixel matrix"
)


def dciodvfy(path: Path) -> DciodvfyReport:
    """Run dicom3tools' dciodvfy on one file; errors and warnings are its lines so prefixed."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stderr + out.stdout).splitlines()
    return DciodvfyReport(
        path=path,
        errors=tuple(line for line in lines if line.startswith("Error")),
        warnings=tuple(line for line in lines if line.startswith("Warning")),
    )


# --------------------------------------------------------------------------------------------
# Session cache


class SlideCache:
    """Writes each distinct slide (or derived folder) once under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._slides: dict[SlideSpec, SyntheticSlide] = {}
        self._folders: dict[str, Path] = {}
        self._converted: dict[tuple[str, SlideSpec], ConvertedSlide] = {}

    def slide(self, spec: SlideSpec) -> SyntheticSlide:
        """The slide for ``spec``, written on first use."""
        if spec not in self._slides:
            out = self.root / f"synthetic-{len(self._slides):03d}"
            self._slides[spec] = write_synthetic_slide(spec, out)
        return self._slides[spec]

    def folder(self, name: str, build: Callable[[Path], None]) -> Path:
        """A folder made by ``build(path)`` on first use; ``name`` is its cache key."""
        if name not in self._folders:
            path = self.root / name
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            build(path)
            self._folders[name] = path
        return self._folders[name]

    def converted(self, converter: str, spec: SlideSpec) -> ConvertedSlide:
        """``spec`` rendered into a pyramidal TIFF and converted by ``converter``
        ("orthanc" or "wsidicomizer")."""
        if converter not in ("orthanc", "wsidicomizer"):
            raise ValueError(f"converter {converter!r} is not orthanc or wsidicomizer")
        key = (converter, spec)
        if key not in self._converted:
            folder = self.folder(
                f"tiff-{abs(hash(spec)):x}", lambda p: write_pyramidal_tiff(spec, p / "slide.tiff")
            )
            tiff = folder / "slide.tiff"
            out = self.root / f"{converter}-{abs(hash(spec)):x}"
            if converter == "orthanc":
                self._converted[key] = convert_with_orthanc(tiff, spec, out)
            else:
                self._converted[key] = convert_with_wsidicomizer(tiff, spec, out)
        return self._converted[key]


# --------------------------------------------------------------------------------------------
# Third-party converters


@dataclass(frozen=True)
class ConvertedSlide:
    """A folder of .dcm files written by a third-party converter, with the truth it shows."""

    folder: Path
    files: tuple[Path, ...]
    converter: str
    spec: SlideSpec  # what was rendered into the TIFF (size, base spacing, seed)
    layout: SlideLayout = field(repr=False, compare=False)

    def truth_labels(self, um_per_px: float) -> np.ndarray:
        """uint8 region class per pixel at that spacing, 255 = glass (see glio_node.results)."""
        return self.layout.truth(um_per_px)[0]

    def truth_tissue(self, um_per_px: float) -> np.ndarray:
        return self.layout.truth(um_per_px)[1]

    def render_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The RGB pixels painted into the TIFF for a region of a level (before JPEG)."""
        return render_patch(self.spec, self.layout, level, x, y, width, height)


def write_pyramidal_tiff(spec: SlideSpec, path: Path) -> Path:
    """Render ``spec`` into a tiled pyramidal TIFF, one IFD per level (no SubIFDs).

    Tiles are JPEG (quality 95, 4:2:2); tifffile converts the RGB tiles to YCbCr and tags
    Photometric=YCbCr, which is what OrthancWSIDicomizer 1.1 requires.  X/YResolution in pixels per centimetre carry the
    spacing of each level; reduced levels are tagged NewSubfileType=1.  Rendered tile by tile.
    """
    import tifffile

    layout = layout_for(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tiff:
        for level in spec.level_geometries():
            t = level.tile_size

            def tiles(level=level, t=t):
                for tr in range(level.tile_rows):
                    for tc in range(level.tile_columns):
                        yield render_patch(spec, layout, level.index, tc * t, tr * t, t, t)

            px_per_cm = 10_000.0 / level.um_per_px
            tiff.write(
                tiles(),
                shape=(level.rows, level.columns, 3),
                dtype=np.uint8,
                tile=(t, t),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 95},
                subsampling=(2, 1),
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level.index == 0 else 1,
                metadata=None,
            )
    return path


# What a site feeds OrthancWSIDicomizer with --dataset: the fields of its --sample-dataset, with
# obviously synthetic values.  ImageType is the sample's DERIVED\PRIMARY\VOLUME\NONE on every
# level; without --dataset the converter writes no ImageType at all and wsidicom ignores the files.
_ORTHANC_DATASET = {
    "PatientID": PATIENT_ID,
    "PatientName": PATIENT_NAME,
    "PatientBirthDate": "",
    "PatientSex": "O",
    "StudyID": STUDY_ID,
    "SeriesNumber": "1",
    "ReferringPhysicianName": "",
    "AccessionNumber": ACCESSION_NUMBER,
    "Manufacturer": "glio-node tests",
    "ManufacturerModelName": "OrthancWSIDicomizer",
    "DeviceSerialNumber": "SYNTH-0",
    "SoftwareVersions": "1.1",
    "ImageType": "DERIVED\\PRIMARY\\VOLUME\\NONE",
    "FocusMethod": "AUTO",
    "ExtendedDepthOfField": "NO",
    "AcquisitionContextSequence": [],
    "ContainerIdentifier": CONTAINER_IDENTIFIER,
    "IssuerOfTheContainerIdentifierSequence": [],
    "ContainerTypeCodeSequence": [],
    "SpecimenDescriptionSequence": [
        {
            "SpecimenIdentifier": SPECIMEN_IDENTIFIER,
            "SpecimenUID": "2.25.299792458161803398874989484820458683436",
            "IssuerOfTheSpecimenIdentifierSequence": [],
            "SpecimenPreparationSequence": [],
        }
    ],
    "SpecimenLabelInImage": "NO",
    "BurnedInAnnotation": "NO",
}

# OrthancWSIDicomizer 1.1, as installed here, on our TIFF (checked with dciodvfy and pydicom):
# - ignores the TIFF resolution tags: spacing comes only from --imaged-width/--imaged-height (mm);
# - swaps them: PixelSpacing = [imaged width / rows, imaged height / columns], so only a SQUARE
#   slide gets the right, isotropic spacing.  ORTHANC_SPEC is square for that reason;
# - stores spacing as float32 noise (0.000500000024);
# - writes no FrameOfReferenceUID, no DimensionOrganizationType (wsidicom reads the levels as
#   TILED_SPARSE from the per-frame positions), no WholeSlideMicroscopyImageFrameTypeSequence
#   (a dciodvfy error) and no ImageType unless --dataset gives one (then the same on all levels);
# - splits a level into a concatenation once it exceeds --max-size MB (1 MB here, so the base
#   level of ORTHANC_SPEC is split in two), without InConcatenationTotalNumber;
# - copies the TIFF's JPEG tiles as they are (no re-encoding), and writes no LABEL/OVERVIEW;
# - per-frame X/Y offsets disagree with its own orientation; row/column positions are right.
ORTHANC_SPEC = SlideSpec(width_px=2048, height_px=2048, tile_size=256, levels=3, seed=3)


def convert_with_orthanc(tiff: Path, spec: SlideSpec, out_dir: Path) -> ConvertedSlide:
    """Convert ``tiff`` (rendered from ``spec``) with OrthancWSIDicomizer into ``out_dir``."""
    import json

    from peers import require

    binary = require(ORTHANC_DICOMIZER, "the slide converted by Orthanc's converter")
    if spec.width_px != spec.height_px:
        raise ValueError(
            f"OrthancWSIDicomizer 1.1 swaps imaged width and height; use a square slide, "
            f"not {spec.width_px}x{spec.height_px} px"
        )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    dataset_json = out_dir.parent / f"{out_dir.name}-dataset.json"
    dataset_json.write_text(json.dumps(_ORTHANC_DATASET, indent=1))
    cmd = [
        binary,
        "--folder", str(out_dir),
        "--dataset", str(dataset_json),
        "--imaged-width", f"{spec.width_um / 1000:.6f}",
        "--imaged-height", f"{spec.height_um / 1000:.6f}",
        "--max-size", "1",
        str(tiff),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    files = tuple(sorted(out_dir.glob("*.dcm")))
    if not files:
        raise RuntimeError(f"OrthancWSIDicomizer wrote no files:\n{run.stderr[-3000:]}")
    return ConvertedSlide(out_dir, files, "orthanc", spec, layout_for(spec))


# wsidicomizer 0.26 on our TIFF (checked with dciodvfy and pydicom):
# - opentile does not recognise a generic pyramidal TIFF, so it falls back to tiffslide, which
#   decodes and re-encodes every tile (JPEG 4:2:0, quality 90) at its default 512-px tile size:
#   a second generation of JPEG loss, and a tile grid different from the TIFF's;
# - takes the spacing from the TIFF resolution tags (0.0005 mm) and writes it exactly;
# - writes a FrameOfReferenceUID, TILED_FULL, ORIGINAL/DERIVED ImageType per level, a Pyramid UID;
# - without metadata leaves patient name/ID, study date/time, accession number and study ID
#   empty, and sets ContainerIdentifier and SpecimenIdentifier to "Unknown";
# - writes no LABEL/OVERVIEW (the TIFF has none); dciodvfy reports only DICOMDIR warnings.
WSIDICOMIZER_SPEC = SMALL


def wsidicomizer_files(source: Path, out_dir: Path) -> tuple[Path, ...]:
    """Convert ``source`` (a TIFF or an SVS) with wsidicomizer's Python API into ``out_dir``.

    wsidicomizer sets ``pydicom.config.enforce_valid_values = True`` and pydicom's future
    behaviour (``config.future_behavior()``: ``Dataset.pixel_array`` changes) when imported, for
    the whole process: every later pydicom read in the test session would then raise on values
    that glio-node must handle (and report) itself. The settings are restored after converting.
    """
    import pydicom.config

    future = pydicom.config._use_future
    saved = (
        pydicom.config.enforce_valid_values,
        pydicom.config.settings._reading_validation_mode,
        pydicom.config.settings._writing_validation_mode,
    )
    try:
        from wsidicomizer import WsiDicomizer

        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        created = WsiDicomizer.convert(source, output_path=out_dir, workers=1)
    finally:
        if pydicom.config._use_future != future:
            pydicom.config.future_behavior(future)
        (
            pydicom.config.enforce_valid_values,
            pydicom.config.settings._reading_validation_mode,
            pydicom.config.settings._writing_validation_mode,
        ) = saved
    files = tuple(sorted(Path(p) for p in created))
    if not files:
        raise RuntimeError(f"wsidicomizer wrote no files for {source}")
    return files


def convert_with_wsidicomizer(tiff: Path, spec: SlideSpec, out_dir: Path) -> ConvertedSlide:
    """Convert ``tiff`` (rendered from ``spec``) with wsidicomizer into ``out_dir``."""
    files = wsidicomizer_files(tiff, out_dir)
    return ConvertedSlide(out_dir, files, "wsidicomizer", spec, layout_for(spec))


def write_rgb_pyramid_tiff(image: np.ndarray, um_per_px: float, path: Path, levels: int = 4, tile: int = 256) -> Path:
    """An RGB uint8 image (level 0) as a tiled pyramidal TIFF like ``write_pyramidal_tiff``'s:
    JPEG tiles (quality 95), resolution tags, each further level halved (PIL's box reduce)."""
    import tifffile
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tiff:
        level = image
        for index in range(levels):
            px_per_cm = 10_000.0 / (um_per_px * 2**index)
            tiff.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 95},
                subsampling=(2, 1),
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if index == 0 else 1,
                metadata=None,
            )
            level = np.asarray(Image.fromarray(level).reduce(2))
    return path


# --------------------------------------------------------------------------------------------
# Malformed inputs: each a folder a user might hand to `glio-node analyze`.

# The slide the malformed cases are cut from (no context images: only pyramid levels).
MALFORMED_BASE = replace(SMALL, context_images=False)
MALFORMED_OTHER = replace(MALFORMED_BASE, seed=1)

MALFORMED_CASES: tuple[str, ...] = (
    "non_wsi",  # a small CT image: DICOM, but not VL Whole Slide Microscopy
    "mixed_series",  # the levels of two different WSI series in one folder
    "no_pixel_spacing",  # PixelSpacing removed from every level
    "missing_frames",  # TILED_FULL base level with its last frames dropped (NumberOfFrames < tiles)
    "truncated",  # base level file cut in the middle of its pixel data
    "garbage_jpeg",  # base level whose JPEG frames are random bytes (encapsulation intact)
    "empty",  # an empty folder
    "non_dicom",  # a text file named slide.dcm
)


def _copy_files(files, folder: Path) -> list[Path]:
    out = []
    for f in files:
        target = folder / f.name
        shutil.copy2(f, target)
        out.append(target)
    return out


def _base_level(files) -> Path:
    return next(f for f in files if f.name == "level0.dcm")


def _frames(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def _make_non_wsi(folder: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(prefix=None, entropy_srcs=["glio-node tests", "ct"])
    ds.StudyInstanceUID = generate_uid(prefix=None, entropy_srcs=["glio-node tests", "ct study"])
    ds.SeriesInstanceUID = generate_uid(prefix=None, entropy_srcs=["glio-node tests", "ct series"])
    ds.FrameOfReferenceUID = generate_uid(prefix=None, entropy_srcs=["glio-node tests", "ct for"])
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelSpacing = [0.5, 0.5]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelData = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 8).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(folder / "ct.dcm", enforce_file_format=True)


def _make_mixed_series(folder: Path, a: SyntheticSlide, b: SyntheticSlide) -> None:
    assert a.series_instance_uid != b.series_instance_uid
    for prefix, slide in (("a-", a), ("b-", b)):
        for f in slide.files:
            shutil.copy2(f, folder / f"{prefix}{f.name}")


def _make_no_pixel_spacing(folder: Path, slide: SyntheticSlide) -> None:
    for path in _copy_files(slide.files, folder):
        ds = pydicom.dcmread(path)
        del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        ds.save_as(path)


def _make_missing_frames(folder: Path, slide: SyntheticSlide, dropped: int = 3) -> None:
    paths = _copy_files(slide.files, folder)
    path = _base_level(paths)
    ds = pydicom.dcmread(path)
    frames = _frames(ds)[:-dropped]
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds.NumberOfFrames = len(frames)
    ds.save_as(path)


def _make_truncated(folder: Path, slide: SyntheticSlide) -> None:
    path = _base_level(_copy_files(slide.files, folder))
    data = path.read_bytes()
    # Pixel Data is the last element, so its value is the tail of the file.
    pixel_start = len(data) - len(pydicom.dcmread(path).PixelData)
    cut = pixel_start + (len(data) - pixel_start) // 2
    path.write_bytes(data[:cut])


def _make_garbage_jpeg(folder: Path, slide: SyntheticSlide) -> None:
    path = _base_level(_copy_files(slide.files, folder))
    ds = pydicom.dcmread(path)
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 256, len(f), dtype=np.uint8).tobytes() for f in _frames(ds)]
    frames = [f if len(f) % 2 == 0 else f + b"\0" for f in frames]
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds.save_as(path)


def _make_non_dicom(folder: Path) -> None:
    (folder / "slide.dcm").write_text("This is not a DICOM file; it is a text file named .dcm.\n")


class MalformedInputs:
    """Folders of malformed input, built on first use: ``malformed["truncated"]`` is a Path."""

    def __init__(self, cache: SlideCache):
        self._cache = cache

    def __getitem__(self, case: str) -> Path:
        if case not in MALFORMED_CASES:
            raise KeyError(f"malformed case {case!r} is not one of {', '.join(MALFORMED_CASES)}")
        cache = self._cache
        builders: dict[str, Callable[[Path], None]] = {
            "non_wsi": _make_non_wsi,
            "mixed_series": lambda p: _make_mixed_series(
                p, cache.slide(MALFORMED_BASE), cache.slide(MALFORMED_OTHER)
            ),
            "no_pixel_spacing": lambda p: _make_no_pixel_spacing(p, cache.slide(MALFORMED_BASE)),
            "missing_frames": lambda p: _make_missing_frames(p, cache.slide(MALFORMED_BASE)),
            "truncated": lambda p: _make_truncated(p, cache.slide(MALFORMED_BASE)),
            "garbage_jpeg": lambda p: _make_garbage_jpeg(p, cache.slide(MALFORMED_BASE)),
            "empty": lambda p: None,
            "non_dicom": _make_non_dicom,
        }
        return cache.folder(f"malformed-{case}", builders[case])


def expected_frame_count(spec: SlideSpec, level: int) -> int:
    geometry = spec.level_geometries()[level]
    return geometry.tile_count
