"""What every object glio-node writes has in common: identity, provenance, and the source slide.

Series numbers (deterministic, one series per kind of output):

==========  ===================================================================
9001        DICOM SEG: region classes, a multi-resolution pyramid (one instance per level)
9002        Comprehensive 3D SR: TID 1500 measurement report
9010 + i    Parametric Map: heatmap of subtype class i (one series per class, see heatmap.py)
9020 + i    Parametric Map: heatmap of MGMT class i
9030 + i    Parametric Map: heatmap of EGFR class i
9040 + i    Parametric Map: heatmap of a segmentation-head class i (if a bundle ever emits one)
==========  ===================================================================

UIDs are derived, never random: ``2.25.<int>`` of a name-based (SHA-1, RFC 9562 version 5) UUID
over the source SOP Instance UIDs, the bundle's SHA-256 and the kind of object (PS3.5 B.2), so a
re-run of the same job over the same slide with the same bundle yields the same UIDs and a PACS
can de-duplicate.

Missing source attributes (third-party slides), and what the writers do about them:

- Patient/study attributes that are Type 2 in our outputs (PatientName, PatientID, PatientBirthDate,
  PatientSex, AccessionNumber, StudyID, StudyDate, StudyTime, ReferringPhysicianName): copied
  when present, written empty when absent (Type 2 may be empty, PS3.5 7.4.3).
- FrameOfReferenceUID absent (OrthancWSIDicomizer): a frame of reference is *created* for the
  outputs, derived from the source SeriesInstanceUID (the same for every bundle and re-run), with
  the slide's TotalPixelMatrixOrigin and ImageOrientationSlide when present (the default
  orientation and a zero origin otherwise). The outputs are then valid DICOM and the SR is
  fully usable, but viewers that require the overlay to share the slide's FrameOfReferenceUID
  (dicom-microscopy-viewer checks ``slide.FrameOfReferenceUID === overlay.FrameOfReferenceUID``)
  will refuse to overlay the SEG and heatmaps; a note says so. Rejecting the slide instead would
  lose the report for every Orthanc-dicomized slide; writing overlays without a frame of
  reference is refused by highdicom (and needs per-frame positions without a coordinate system).
- FrameOfReferenceUID present but TotalPixelMatrixOriginSequence or ImageOrientationSlide absent:
  ``BadInput`` (the outputs cannot be placed in the slide's frame of reference).
- Specimen module incomplete (no ContainerIdentifier, or no SpecimenDescriptionSequence item with
  SpecimenIdentifier and SpecimenUID): the Specimen module is left out of the SEG and the
  Parametric Maps (it is User-optional there: PS3.3 A.51-1, A.75-1) rather than invent a
  container identifier, and the SR names no specimen subject; a note says so.
- No PixelSpacing, no TotalPixelMatrixRows/Columns, not VL Whole Slide Microscopy, mixed
  studies/series: ``BadInput``.
"""

from __future__ import annotations

import datetime
import re
import uuid
from copy import deepcopy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, VLWholeSlideMicroscopyImageStorage

from glio_node import __version__
from glio_node.coding import LOCAL_SCHEME, LOCAL_SCHEME_NAME, LOCAL_SCHEME_VERSION
from glio_node.errors import BadInput
from glio_node.results import Algorithm, CodedClass

MANUFACTURER = "glio-node"
UID_NAMESPACE = "glio-node/writers/v1"  # changing it changes every derived UID

SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
HEATMAP_SERIES_BASE = {"subtype": 9010, "mgmt": 9020, "egfr": 9030, "segmentation": 9040}
OOD_MAP_SERIES_NUMBER = 9050  # the tile out-of-distribution score map
MAX_CLASSES_PER_HEATMAP_HEAD = 10  # series numbers base + 0..9
ATTENTION_SERIES_NUMBER = {"subtype": 9051, "mgmt": 9052, "egfr": 9053}  # one attention map per aggregator head

AI_NOTICE = "AI-generated, research use only"
DEMO_NOTICE = "DEMO (synthetic training)"

# Orientation of a created frame of reference when the source has none either: image rows along
# slide -Y, columns along -X (PS3.3 C.8.12.2.1), as label-left scanners write it.
DEFAULT_IMAGE_ORIENTATION_SLIDE = (0.0, -1.0, 0.0, -1.0, 0.0, 0.0)

_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloat
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_SPECIMEN_MODULE = (
    "ContainerIdentifier",
    "IssuerOfTheContainerIdentifierSequence",
    "AlternateContainerIdentifierSequence",
    "ContainerTypeCodeSequence",
    "ContainerDescription",
    "ContainerComponentSequence",
    "SpecimenDescriptionSequence",
)


@dataclass(frozen=True)
class WrittenObject:
    """One DICOM file written: where it is and the UIDs the sender and the audit trail need."""

    path: Path
    kind: str  # "seg" | "sr" | "heatmap" | "attention" (writers/attention.py)
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    series_number: int


@dataclass(frozen=True)
class WrittenObjects:
    """Everything ``write_results`` wrote, in writing order, plus notes for the audit trail."""

    objects: tuple[WrittenObject, ...]
    notes: tuple[str, ...] = field(default=())  # e.g. "created a frame of reference ..."

    def __iter__(self):
        return iter(self.objects)

    def __len__(self) -> int:
        return len(self.objects)

    def of_kind(self, kind: str) -> tuple[WrittenObject, ...]:
        return tuple(o for o in self.objects if o.kind == kind)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(o.path for o in self.objects)


@dataclass(frozen=True)
class SourceSlide:
    """The analysed source level, checked and completed once for every writer.

    ``datasets`` are metadata-only copies of the source (pixel data dropped), completed as the
    module docstring says; they are what highdicom is handed. ``datasets[0]`` is the first part
    of a concatenation (or the only instance).
    """

    datasets: tuple[Dataset, ...]
    total_pixel_matrix_rows: int
    total_pixel_matrix_columns: int
    pixel_spacing_mm: tuple[float, float]  # (row spacing, column spacing), DICOM order
    origin_mm: tuple[float, float, float]  # TotalPixelMatrixOrigin: top-left corner of pixel 1\1
    image_orientation_slide: tuple[float, ...]
    tile_size: tuple[int, int]  # (Rows, Columns) of the source frames
    slice_thickness_mm: float | None  # the source's nominal section thickness, if it has one
    has_specimen: bool
    frame_of_reference_created: bool
    notes: tuple[str, ...]

    @property
    def primary(self) -> Dataset:
        return self.datasets[0]

    @property
    def further(self) -> list[Dataset]:
        return list(self.datasets[1:])

    @property
    def uid_key(self) -> str:
        """What derived UIDs hang on: every source SOP Instance UID, sorted."""
        return "\\".join(sorted(str(ds.SOPInstanceUID) for ds in self.datasets))

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.primary.FrameOfReferenceUID)

    def plane_position(self) -> hd.PlanePositionSequence:
        """Position of an output's total pixel matrix: the slide's origin, at pixel 1\\1.

        Every output (any spacing, any pyramid level) gets the slide's own TotalPixelMatrixOrigin,
        i.e. the origin is read as the top-left *corner* of pixel 1\\1, as the dicomizers,
        highdicom's pyramid writers and dicom-microscopy-viewer (which aligns overlays by their
        pixel-matrix extent) all do. A raster at any spacing starts at that corner by the
        geometry convention of ``glio_node.results``, so no half-pixel shift is applied.
        """
        return hd.PlanePositionSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE,
            image_position=self.origin_mm,
            pixel_matrix_position=(1, 1),
        )

    def plane_orientation(self) -> hd.PlaneOrientationSequence:
        return hd.PlaneOrientationSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE,
            image_orientation=self.image_orientation_slide,
        )


def prepare_source(source: Sequence[Dataset]) -> SourceSlide:
    """Check the source level and return completed, metadata-only copies for the writers.

    Raises ``BadInput`` (one line: what is missing and what to do) when the source cannot carry
    outputs; see the module docstring for what is completed instead.
    """
    if len(source) == 0:
        raise BadInput("no source datasets given: pass the analysed pyramid level's instances")
    notes: list[str] = []
    for ds in source:
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            raise BadInput("a source dataset has no SOPInstanceUID/SOPClassUID: not a DICOM image")
        if ds.SOPClassUID != VLWholeSlideMicroscopyImageStorage:
            raise BadInput(
                f"source {ds.SOPInstanceUID} has SOP class {ds.SOPClassUID}, not VL Whole Slide "
                "Microscopy Image Storage: analyse a WSI series"
            )
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
            if keyword not in ds:
                raise BadInput(f"source {ds.SOPInstanceUID} lacks {keyword}: re-convert the slide")
        if "TotalPixelMatrixRows" not in ds or "TotalPixelMatrixColumns" not in ds:
            raise BadInput(
                f"source {ds.SOPInstanceUID} lacks TotalPixelMatrixRows/Columns: not a tiled "
                "WSI level; re-convert the slide with a WSI dicomizer"
            )
    first = source[0]
    for ds in source[1:]:
        same = (
            ds.StudyInstanceUID == first.StudyInstanceUID
            and ds.SeriesInstanceUID == first.SeriesInstanceUID
            and ds.TotalPixelMatrixRows == first.TotalPixelMatrixRows
            and ds.TotalPixelMatrixColumns == first.TotalPixelMatrixColumns
            and ds.get("FrameOfReferenceUID") == first.get("FrameOfReferenceUID")
        )
        if not same:
            raise BadInput(
                f"source instances {first.SOPInstanceUID} and {ds.SOPInstanceUID} are not parts "
                "of one pyramid level (study, series, size or frame of reference differ)"
            )
    ordered = sorted(source, key=lambda d: int(d.get("InConcatenationNumber", 1) or 1))
    copies = [_metadata_copy(ds) for ds in ordered]
    primary = copies[0]

    spacing = _pixel_spacing(primary)
    for keyword in _TYPE2_PATIENT_STUDY:
        for ds in copies:
            if keyword not in ds:
                setattr(ds, keyword, None)
    missing_type2 = [k for k in _TYPE2_PATIENT_STUDY if k not in ordered[0]]
    if missing_type2:
        notes.append(f"source lacks {', '.join(missing_type2)}: written empty (Type 2)")

    has_origin = "TotalPixelMatrixOriginSequence" in primary and len(
        primary.TotalPixelMatrixOriginSequence
    ) > 0
    has_orientation = "ImageOrientationSlide" in primary
    created = False
    if "FrameOfReferenceUID" in primary and primary.FrameOfReferenceUID:
        if not has_origin or not has_orientation:
            raise BadInput(
                f"source {primary.SOPInstanceUID} has a FrameOfReferenceUID but no "
                "TotalPixelMatrixOriginSequence/ImageOrientationSlide: outputs cannot be placed "
                "on the slide; re-convert the slide"
            )
    else:
        created = True
        fo_r = _uid("frame-of-reference", str(primary.SeriesInstanceUID))
        for ds in copies:
            ds.FrameOfReferenceUID = fo_r
            ds.PositionReferenceIndicator = None
            if not has_origin:
                item = Dataset()
                item.XOffsetInSlideCoordinateSystem = 0
                item.YOffsetInSlideCoordinateSystem = 0
                ds.TotalPixelMatrixOriginSequence = [item]
            if not has_orientation:
                ds.ImageOrientationSlide = list(DEFAULT_IMAGE_ORIENTATION_SLIDE)
        notes.append(
            f"source series {primary.SeriesInstanceUID} has no FrameOfReferenceUID: created "
            f"{fo_r} for the outputs; viewers that require overlays to share the slide's frame "
            "of reference (dicom-microscopy-viewer) will not overlay the SEG and heatmaps"
        )

    origin_item = primary.TotalPixelMatrixOriginSequence[0]
    origin = (
        float(origin_item.XOffsetInSlideCoordinateSystem),
        float(origin_item.YOffsetInSlideCoordinateSystem),
        float(origin_item.get("ZOffsetInSlideCoordinateSystem", 0.0) or 0.0),
    )

    has_specimen = _specimen_complete(primary)
    if not has_specimen:
        present = [k for k in _SPECIMEN_MODULE if k in primary]
        for ds in copies:
            for keyword in present:
                delattr(ds, keyword)
        notes.append(
            "source specimen module is incomplete (ContainerIdentifier or specimen identifier/UID "
            "missing): specimen/container identifiers are not carried into the outputs"
        )

    return SourceSlide(
        datasets=tuple(copies),
        total_pixel_matrix_rows=int(primary.TotalPixelMatrixRows),
        total_pixel_matrix_columns=int(primary.TotalPixelMatrixColumns),
        pixel_spacing_mm=spacing,
        origin_mm=origin,
        image_orientation_slide=tuple(float(v) for v in primary.ImageOrientationSlide),
        tile_size=(int(primary.Rows), int(primary.Columns)),
        slice_thickness_mm=_slice_thickness(primary),
        has_specimen=has_specimen,
        frame_of_reference_created=created,
        notes=tuple(notes),
    )


def _metadata_copy(ds: Dataset) -> Dataset:
    """A deep copy without pixel data: the writers add and remove attributes on it freely."""
    copy = Dataset()
    for element in ds:
        if element.tag not in _PIXEL_DATA_TAGS:
            copy.add(element)
    copy.file_meta = getattr(ds, "file_meta", Dataset())
    return deepcopy(copy)


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    try:
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        row, col = (float(v) for v in measures.PixelSpacing)
    except (AttributeError, IndexError, KeyError, ValueError, TypeError):
        raise BadInput(
            f"source {ds.SOPInstanceUID} has no shared PixelMeasuresSequence/PixelSpacing: "
            "its physical size is unknown; re-convert the slide with its resolution"
        ) from None
    if not (row > 0 and col > 0):
        raise BadInput(f"source {ds.SOPInstanceUID} has PixelSpacing {row}\\{col} mm: not positive")
    return row, col


def _slice_thickness(ds: Dataset) -> float | None:
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    value = measures.get("SliceThickness")
    return float(value) if value not in (None, "") and float(value) > 0 else None


def _specimen_complete(ds: Dataset) -> bool:
    if not ds.get("ContainerIdentifier"):
        return False
    items = ds.get("SpecimenDescriptionSequence") or []
    return len(items) > 0 and all(
        item.get("SpecimenIdentifier") and item.get("SpecimenUID") for item in items
    )


# --- identity and provenance -------------------------------------------------------------


def derived_uid(source: SourceSlide, algorithm: Algorithm, *kind: str | int) -> UID:
    """A UID that depends only on the source instances, the bundle and what is being named."""
    return _uid(source.uid_key, algorithm.sha256, *map(str, kind))


_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, UID_NAMESPACE)


def _uid(*parts: str) -> UID:
    """``2.25.<n>`` from a version-5 UUID of ``parts`` (at most 44 characters)."""
    return UID(f"2.25.{uuid.uuid5(_UUID_NAMESPACE, chr(0).join(parts)).int}")


def software_versions(algorithm: Algorithm) -> list[str]:
    """SoftwareVersions (LO, multi-valued): glio-node's version, then the bundle's."""
    return [f"glio-node {__version__}", f"{algorithm.name} {algorithm.version}"]


def device_serial_number(algorithm: Algorithm) -> str:
    """The bundle fingerprint stands in for a serial number: it names the exact weights."""
    return f"sha256:{algorithm.sha256[:16]}"


def equipment(algorithm: Algorithm) -> dict[str, object]:
    """The General Equipment keywords every highdicom constructor here takes, the same for every
    object: glio-node as the manufacturer, the bundle as the model, both versions, the weights'
    fingerprint as the serial number (``**common.equipment(algorithm)``)."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": algorithm.name,
        "software_versions": software_versions(algorithm),
        "device_serial_number": device_serial_number(algorithm),
    }


def dated(content_date, content_time) -> dict[str, object]:
    """Content and series date/time keywords: one moment for the object and its series."""
    return {"content_date": content_date, "content_time": content_time, "series_date": content_date, "series_time": content_time}


def series_description(kind: str, short_kind: str, algorithm: Algorithm) -> str:
    """``<kind>; AI-generated, research use only``, prefixed ``DEMO (synthetic training)``.

    SeriesDescription is LO (64 characters). The notices are never cut: when ``kind`` does not
    fit beside them (demo bundles leave 6 characters), ``short_kind`` (e.g. "SEG", "SUB1") is
    used, truncated if need be. ContentDescription, segment labels and the SR carry full names.
    """
    prefix = f"{DEMO_NOTICE} " if algorithm.is_demo else ""
    suffix = f"; {AI_NOTICE}"
    room = 64 - len(prefix) - len(suffix)
    if len(kind) > room:
        kind = short_kind[:room]
    return f"{prefix}{kind}{suffix}"


def content_description(algorithm: Algorithm) -> str:
    """The intended use, as much as fits ContentDescription (LO, 64 characters).

    The full text is in AlgorithmParameters / the SR's algorithm parameters.
    """
    text = " ".join(algorithm.intended_use.split())
    if algorithm.is_demo and "DEMO" not in text:
        text = f"DEMO. {text}"
    return text if len(text) <= 64 else text[:61].rstrip() + "..."


def content_label(text: str) -> str:
    """A ContentLabel (CS, 16 characters of A-Z 0-9 _ space) from free text."""
    label = re.sub(r"[^A-Z0-9_ ]", "_", text.upper())[:16]
    return label or "GLIO"


def content_creator_name(algorithm: Algorithm) -> str:
    """The creator is software, named as ``glio-node^<bundle>`` (family^given)."""
    return f"{MANUFACTURER}^{algorithm.name}"[:64]


PROVENANCE_PURPOSE = codes.DCM.ProcessingEquipment  # (109102, DCM), CID 7005


def provenance_statement(algorithm: Algorithm) -> str:
    """What made the object, in words: the bundle's name, version and full SHA-256, the notices
    ("DEMO (synthetic training)" first for a demo bundle, "AI-generated, research use only"),
    then the intended use; at most 1024 characters (ContributionDescription is ST)."""
    demo = f"{DEMO_NOTICE}. " if algorithm.is_demo else ""
    text = (
        f"{demo}Model bundle {algorithm.name} {algorithm.version}, SHA-256 {algorithm.sha256}; "
        f"{AI_NOTICE}. Intended use: {' '.join(algorithm.intended_use.split())}"
    )
    return text if len(text) <= 1024 else text[:1021].rstrip() + "..."


def stain_statement(algorithm: Algorithm) -> str:
    """The stain normalisation each network's tiles had, method and reference, in one sentence
    ("" when the algorithm record names none)."""
    if not algorithm.normalizations:
        return ""
    return "Stain normalisation: " + "; ".join(f"{n}: {words}" for n, words in algorithm.normalizations) + "."


def contributing_equipment(algorithm: Algorithm, extra: str = "") -> list[hd.ContributingEquipment]:
    """ContributingEquipmentSequence (SOP Common, every IOD): glio-node and the bundle as
    processing equipment, with :func:`provenance_statement`.

    The one place every kind of object (SEG, Parametric Map, SR) carries the bundle's *full*
    SHA-256: DeviceSerialNumber (LO, 64 characters) holds only its start, and a Parametric Map
    has no Algorithm Identification as the SEG's segments and the SR's groups have.
    """
    return [
        hd.ContributingEquipment(
            purpose_of_reference=PROVENANCE_PURPOSE,
            **equipment(algorithm),
            contribution_description=_with_extra(provenance_statement(algorithm), extra),
        )
    ]


def _with_extra(text: str, extra: str) -> str:
    """``extra`` (e.g. the stain statement) after the provenance (whose notices come first)."""
    if not extra:
        return text
    joined = f"{text} {extra}"
    return joined if len(joined) <= 1024 else joined[:1021].rstrip() + "..."


def algorithm_parameters(algorithm: Algorithm) -> dict[str, str]:
    params = {
        "bundle_sha256": algorithm.sha256,
        "intended_use": " ".join(algorithm.intended_use.split()),
        "precision": algorithm.precision,
    }
    for origin in algorithm.origins:  # imported networks: where each came from, under which licence
        params[f"{origin.network}_source"] = _parameter_text(origin.source)
        params[f"{origin.network}_licence"] = _parameter_text(
            f"{origin.licence_name} (licence text sha256 {origin.licence_sha256})"
        )
    for network, words in algorithm.normalizations:  # stain normalisation applied, method and reference
        params[f"{network}_stain_normalization"] = _parameter_text(words)
    if algorithm.dataset:
        params["dataset"] = _parameter_text(algorithm.dataset)
    return params


def _parameter_text(text: str) -> str:
    """Free text as an AlgorithmParameters value: highdicom joins ``key=value`` pairs with ',' and
    splits them back on ',' and '=', so those two become ';' and ':'."""
    return " ".join(text.split()).replace(",", ";").replace("=", ":")


def algorithm_identification_sequence(algorithm: Algorithm) -> hd.AlgorithmIdentificationSequence:
    """AlgorithmIdentificationSequence (PS3.3 C.7.6.16.2.20.1... macro 10-19): the bundle.

    Family (DCM 123110, "Artificial Intelligence") is from CID 7162 "Algorithm Family".
    """
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        source=MANUFACTURER,
        parameters=algorithm_parameters(algorithm),
    )


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """CodingSchemeIdentificationSequence entry for the local scheme (PS3.3 C.12.1.1.4)."""
    return [
        CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME,
            name=LOCAL_SCHEME_NAME,
            version=LOCAL_SCHEME_VERSION,
            responsible_organization="glio-node project",
        )
    ]


def coded(c: CodedClass) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(
        value=c.code_value, scheme_designator=c.coding_scheme_designator, meaning=c.code_meaning
    )


def content_date_time() -> tuple[datetime.date, datetime.time]:
    now = datetime.datetime.now()
    return now.date(), now.time().replace(microsecond=0)
