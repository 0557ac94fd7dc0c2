"""The training dataset folder (docs/training.md) and a validator that reports every problem at once.

A dataset is a folder::

    dataset/
      labels.csv            one row per slide: slide_id, patient_id, subtype, mgmt, egfr, and
                            optionally um_per_px (a TIFF's spacing when the file has none)
      slides/<slide_id>/    a DICOM WSI series (any file names), or
      slides/<slide_id>.tif a plain (pyramidal or flat) TIFF, for research collections
      masks/<slide_id>.png  region labels over the whole slide, at any resolution with the
                            slide's aspect ratio: RGB with the Ivy GAP colours below, or a
                            single-channel integer mask (label value = index in REGION_CLASSES)
      colours.json          optional: {"class name": [r, g, b], ...} replacing the default map

Why one validator that lists everything: a data scientist preparing hundreds of slides wants one
report to fix, not a training run that dies on slide 173 after an hour of tile extraction.
Missing molecular labels are allowed (empty cell): that slide simply does not train that head.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from glio_node.coding import EGFR_CLASSES, MGMT_CLASSES, REGION_CLASSES, SUBTYPE_CLASSES
from glio_node.errors import GlioError

REGION_NAMES: tuple[str, ...] = tuple(c.name for c in REGION_CLASSES)
LABEL_VALUES: Mapping[str, tuple[str, ...]] = {
    "subtype": tuple(c.name for c in SUBTYPE_CLASSES),
    "mgmt": tuple(c.name for c in MGMT_CLASSES),
    "egfr": tuple(c.name for c in EGFR_CLASSES),
}
REQUIRED_COLUMNS = ("slide_id", "patient_id")
TIFF_SUFFIXES = (".tif", ".tiff")

# Default colour key of the Ivy GAP anatomic annotation images ("annotated" H&E of the Allen
# Institute's Ivy Glioblastoma Atlas).  Not read from the Allen Institute here (no network): it is
# the key two independent public Ivy GAP loaders agree on, one listing these RGB triples, the
# other OpenCV hue ranges that each of them falls in (docs/training.md).  "other" is glio-node's
# own class (Ivy GAP has none): mid grey.  White is unlabelled (glass or not annotated): not scored.
UNLABELLED = 255
UNLABELLED_RGB = (255, 255, 255)
IVY_GAP_COLOURS: Mapping[str, tuple[int, int, int]] = {
    "other": (128, 128, 128),
    "leading_edge": (33, 143, 165),
    "infiltrating_tumor": (209, 4, 208),
    "cellular_tumor": (5, 208, 4),
    "necrosis": (6, 5, 5),
    "pseudopalisading_cells_around_necrosis": (5, 208, 170),
    "pseudopalisading_cells_no_visible_necrosis": (5, 4, 208),
    "perinecrotic_zone": (67, 209, 248),
    "microvascular_proliferation": (255, 51, 0),
    "hyperplastic_blood_vessels": (255, 102, 0),
}
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
# Ivy GAP distributes its annotation images as JPEG: there a pixel takes the key colour nearest to
# it within this many levels per channel (the closest two key colours are 51 apart), and pixels
# near no key colour (blends along region borders) become unlabelled, up to MAX_UNMATCHED of the
# mask.  Lossless masks (PNG, TIFF) must match the key exactly.
JPEG_TOLERANCE = 24
MAX_UNMATCHED = 0.05

# A mask whose aspect ratio differs from the slide's by more than this is for another slide.
ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class SlideRecord:
    """One row of labels.csv, with where its files are.  Labels are None when not known."""

    slide_id: str
    patient_id: str
    slide_path: Path  # a DICOM folder or a TIFF file
    mask_path: Path | None
    labels: Mapping[str, str | None] = field(default_factory=dict)
    # µm/px of a TIFF's full-resolution level from labels.csv's optional um_per_px column, which
    # overrides what the file says; None: read from the file.  A value on a DICOM slide's row is a
    # validation problem: its PixelSpacing is required and checked (glio_node.runtime.slide_reader).
    um_per_px: float | None = None

    @property
    def is_dicom(self) -> bool:
        return self.slide_path.is_dir()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the dataset, phrased so the data scientist knows what to fix."""

    where: str  # "labels.csv line 4", "masks/S3.png", ...
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


class DatasetError(ValueError):
    """The dataset has problems; ``problems`` lists all of them."""

    def __init__(self, root: Path, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"dataset {root} has {len(problems)} problem(s); fix them and run `python -m training validate {root}` again:\n{lines}")


def load_colour_map(root: Path) -> dict[tuple[int, int, int], int]:
    """RGB -> label value, from ``root/colours.json`` or the default Ivy GAP key."""
    path = root / "colours.json"
    names = dict(IVY_GAP_COLOURS)
    if path.exists():
        given = json.loads(path.read_text())
        unknown = sorted(set(given) - set(REGION_NAMES))
        if unknown:
            raise DatasetError(root, [Problem("colours.json", f"unknown class(es) {unknown}; allowed: {list(REGION_NAMES)}")])
        names = {k: tuple(v) for k, v in given.items()}
    colours = {tuple(int(c) for c in rgb): REGION_NAMES.index(name) for name, rgb in names.items()}
    return {UNLABELLED_RGB: UNLABELLED, **colours}


def mask_to_labels(mask: np.ndarray, colours: Mapping[tuple[int, int, int], int], tolerance: int = 0) -> np.ndarray:
    """A uint8 label map (255 = unlabelled) from an RGB colour mask or an integer mask.

    With ``tolerance`` 0 every colour must be in the key; above 0 (JPEG masks) a pixel within
    ``tolerance`` of a key colour in every channel takes it, and the rest become unlabelled as
    long as they are at most MAX_UNMATCHED of the mask.  Raises ValueError naming the first
    unknown colours or label values.
    """
    if mask.ndim == 2:
        bad_values = (mask >= len(REGION_NAMES)) & (mask != UNLABELLED)
        if bad_values.any():
            bad = sorted(int(v) for v in np.unique(mask[bad_values])[:5])
            raise ValueError(f"label values {bad} are neither region classes 0..{len(REGION_NAMES) - 1} nor 255 (unlabelled)")
        return mask.astype(np.uint8)
    if mask.ndim == 3 and mask.shape[2] in (3, 4):
        rgb = mask[..., :3].astype(np.int16)
        out = np.full(rgb.shape[:2], UNLABELLED, dtype=np.uint8)
        known = np.zeros(rgb.shape[:2], dtype=bool)
        for colour, value in colours.items():
            hit = np.abs(rgb - np.asarray(colour, np.int16)).max(axis=-1) <= tolerance
            out[hit & ~known] = value
            known |= hit
        unmatched = ~known
        if unmatched.any() and (tolerance == 0 or unmatched.mean() > MAX_UNMATCHED):
            packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2].astype(np.uint32)
            values, counts = np.unique(packed[unmatched], return_counts=True)
            common = values[np.argsort(counts)[::-1][:5]]
            named = [((int(v) >> 16) & 255, (int(v) >> 8) & 255, int(v) & 255) for v in common]
            share = f" ({unmatched.mean():.0%} of the mask, more than {MAX_UNMATCHED:.0%} allowed)" if tolerance else ""
            raise ValueError(f"colours {named} are not in the colour map (colours.json or the Ivy GAP default){share}")
        return out
    raise ValueError(f"mask of shape {mask.shape} is neither an integer mask (H, W) nor RGB (H, W, 3)")


def read_mask(path: Path, colours: Mapping[tuple[int, int, int], int]) -> np.ndarray:
    """The label map stored at ``path`` (PNG, TIFF or JPEG; JPEG matched within JPEG_TOLERANCE)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P":
            im = im.convert("RGB")
        arr = np.asarray(im)
    lossy = Path(path).suffix.lower() in (".jpg", ".jpeg")
    return mask_to_labels(arr, colours, JPEG_TOLERANCE if lossy else 0)


def slide_size(path: Path, um_per_px: float | None = None) -> tuple[int, int]:
    """(rows, cols) of the slide's full-resolution image; raises on an unreadable slide.

    A TIFF is opened as tile extraction opens it (training.tiff_slide), so a TIFF that is
    readable here is readable there; it raises UnknownSpacingError when neither the file nor
    ``um_per_px`` gives its spacing.
    """
    if path.is_dir():
        from glio_node.runtime.slide_reader import DicomSlide

        with DicomSlide.open([path]) as slide:
            base = slide.levels[0]
            return base.rows, base.cols
    from training.tiff_slide import TiffSlide

    with TiffSlide.open(path, um_per_px) as slide:
        base = slide.levels[0]
        return base.rows, base.cols


def _find_slide(root: Path, slide_id: str) -> Path | None:
    folder = root / "slides" / slide_id
    if folder.is_dir():
        return folder
    for suffix in TIFF_SUFFIXES:
        if (root / "slides" / f"{slide_id}{suffix}").is_file():
            return root / "slides" / f"{slide_id}{suffix}"
    return None


def _find_mask(root: Path, slide_id: str) -> Path | None:
    for suffix in MASK_SUFFIXES:
        if (root / "masks" / f"{slide_id}{suffix}").is_file():
            return root / "masks" / f"{slide_id}{suffix}"
    return None


def _read_um_per_px(value: str | None, where: str, problems: list[Problem]) -> float | None:
    """The optional um_per_px cell: empty is None, anything but a positive number is a problem."""
    text = (value or "").strip()
    if not text:
        return None
    try:
        um = float(text)
    except ValueError:
        um = math.nan
    if not (math.isfinite(um) and um > 0):
        problems.append(Problem(where, f"um_per_px {text!r} must be a positive number of micrometres per pixel (or empty to read it from the slide)"))
        return None
    return um


def read_labels(root: Path, problems: list[Problem]) -> list[SlideRecord]:
    """Rows of labels.csv as records; problems are appended to ``problems``, never raised."""
    path = root / "labels.csv"
    if not path.is_file():
        problems.append(Problem("labels.csv", "missing; it must list slide_id, patient_id and the labels (see docs/training.md)"))
        return []
    records: list[SlideRecord] = []
    seen: dict[str, int] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for col in REQUIRED_COLUMNS:
            if col not in columns:
                problems.append(Problem("labels.csv", f"column {col!r} is missing; columns are {columns}"))
        if any(col not in columns for col in REQUIRED_COLUMNS):
            return []
        for line, row in enumerate(reader, start=2):
            where = f"labels.csv line {line}"
            slide_id = (row.get("slide_id") or "").strip()
            patient_id = (row.get("patient_id") or "").strip()
            if not slide_id or not patient_id:
                problems.append(Problem(where, "slide_id and patient_id must not be empty"))
                continue
            if "/" in slide_id or slide_id.startswith("."):
                problems.append(Problem(where, f"slide_id {slide_id!r} must be a plain file name"))
                continue
            if slide_id in seen:
                problems.append(Problem(where, f"slide_id {slide_id!r} is already on line {seen[slide_id]}"))
                continue
            seen[slide_id] = line
            labels: dict[str, str | None] = {}
            for task, allowed in LABEL_VALUES.items():
                value = (row.get(task) or "").strip().lower() or None
                if value is not None and value not in allowed:
                    problems.append(Problem(where, f"{task} {value!r} is not one of {list(allowed)} (leave empty if unknown)"))
                    value = None
                labels[task] = value
            um_per_px = _read_um_per_px(row.get("um_per_px"), where, problems)
            slide_path = _find_slide(root, slide_id)
            if slide_path is None:
                problems.append(Problem(where, f"no slide slides/{slide_id}/ (DICOM) or slides/{slide_id}.tif"))
                continue
            if um_per_px is not None and slide_path.is_dir():
                problems.append(Problem(where, "um_per_px is for TIFF slides only: a DICOM slide's spacing is its PixelSpacing; leave the cell empty"))
                um_per_px = None
            records.append(SlideRecord(slide_id, patient_id, slide_path, _find_mask(root, slide_id), labels, um_per_px))
    return records


def validate_dataset(root: Path, check_images: bool = True) -> tuple[list[SlideRecord], list[Problem]]:
    """Every record of the dataset at ``root`` and every problem found in it.

    With ``check_images`` each slide is opened and each mask decoded: masks must use known colours
    or label values and have the slide's aspect ratio, and a TIFF slide must have a spacing (in
    the file or in the um_per_px column).
    """
    from training.tiff_slide import UnknownSpacingError

    root = Path(root)
    problems: list[Problem] = []
    if not root.is_dir():
        return [], [Problem(str(root), "is not a folder")]
    try:
        colours = load_colour_map(root)
    except DatasetError as exc:
        problems.extend(exc.problems)
        colours = {UNLABELLED_RGB: UNLABELLED, **{rgb: REGION_NAMES.index(n) for n, rgb in IVY_GAP_COLOURS.items()}}
    except (ValueError, TypeError) as exc:
        problems.append(Problem("colours.json", f"unreadable ({exc}); it must map class names to [r, g, b]"))
        colours = {UNLABELLED_RGB: UNLABELLED, **{rgb: REGION_NAMES.index(n) for n, rgb in IVY_GAP_COLOURS.items()}}
    records = read_labels(root, problems)
    listed = {r.slide_id for r in records}
    slides_dir = root / "slides"
    if slides_dir.is_dir():
        for entry in sorted(slides_dir.iterdir()):
            stem = entry.name if entry.is_dir() else entry.stem
            if stem not in listed and not any(p.what.startswith(f"slide_id {stem!r}") for p in problems):
                problems.append(Problem(f"slides/{entry.name}", "is not listed in labels.csv"))
    if check_images:
        for rec in records:
            where = str(rec.slide_path.relative_to(root))
            try:
                rows, cols = slide_size(rec.slide_path, rec.um_per_px)
            except UnknownSpacingError as exc:
                problems.append(Problem(where, exc.detail))
                rows, cols = slide_size(rec.slide_path, 1.0)  # the size is known; go on to check the mask
            except (GlioError, OSError, ValueError, tifffile.TiffFileError) as exc:
                problems.append(Problem(where, f"cannot be read as a slide ({type(exc).__name__}: {exc})"))
                continue
            if rec.mask_path is None:
                continue
            where = str(rec.mask_path.relative_to(root))
            try:
                labels = read_mask(rec.mask_path, colours)
            except (ValueError, OSError) as exc:
                problems.append(Problem(where, str(exc)))
                continue
            slide_aspect, mask_aspect = cols / rows, labels.shape[1] / labels.shape[0]
            if abs(mask_aspect / slide_aspect - 1) > ASPECT_TOLERANCE:
                problems.append(Problem(where, f"is {labels.shape[1]}x{labels.shape[0]} px (aspect {mask_aspect:.3f}) but the slide is {cols}x{rows} px (aspect {slide_aspect:.3f}); is it the mask of another slide?"))
    if records and not any(r.mask_path for r in records) and not any(any(r.labels.values()) for r in records):
        problems.append(Problem("dataset", "no slide has a mask or a label: there is nothing to train"))
    return records, problems


def load_dataset(root: Path, check_images: bool = True) -> list[SlideRecord]:
    """The records of a valid dataset; raises DatasetError listing every problem otherwise."""
    records, problems = validate_dataset(Path(root), check_images)
    if problems:
        raise DatasetError(Path(root), problems)
    return records
