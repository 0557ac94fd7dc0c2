"""The report: a Comprehensive 3D SR holding a TID 1500 Measurement Report.

Structure (every group carries the bundle as TID 4019 Algorithm Identification, family
DCM 123110 "Artificial Intelligence", with the bundle's SHA-256 and intended use as parameters):

- Observation context: observer = device "glio-node" (model = bundle name); subject = the
  specimen (SpecimenUID, SpecimenIdentifier, ContainerIdentifier) when the slide has a complete
  Specimen module.
- Procedure reported: (112703, DCM, "Whole Slide Imaging").
- TID 1501 group "tissue": finding type (85756007, SCT, "Tissue"); Area (42798000, SCT) in mm2;
  source image = the analysed slide level.
- TID 1411 group per region class: finding type = the class concept, referenced segment = that
  class's segment in the full-resolution SEG instance (level 0) with the slide level as its
  source; measurements: area fraction of tissue (99GLIO AREAFRAC) in %, and Area in mm2.
- TID 1501 group per slide-level call (subtype, MGMT, EGFR): finding type = the head's concept;
  qualitative evaluation head-concept = the called class, or (82334004, SCT, "Indeterminate")
  when the top probability is below the head's threshold; measurement "Decision threshold"
  (99GLIO THRESHOLD, unit 1); source image = the slide level.
- TID 1501 group per class probability of each call: finding type = the class concept;
  measurement (122157, DCM, "Probability"), unit (1, UCUM, "no units"), with the class's heatmap
  (Parametric Map) as the measurement's source image when one was written (the slide-level value
  aggregates that tile grid).
- Aggregator heads (two-stage tasks) add to their call group: the attention Parametric Map
  (writers/attention.py) as a second source image of the group, so the map is referenced from
  the call it explains; with fold models, a measurement "Fold model spread of top-class
  probability" (99GLIO FOLDSPREAD, unit 1; max - min across folds of the probability each
  gives the ensemble's top class); when the call is indeterminate, a qualitative evaluation
  "Reason the call is indeterminate" (99GLIO INDETREASON) = 99GLIO LOWPROB or FOLDDISAGREE.
- Evidence: the slide level, every SEG level and every heatmap (highdicom files referenced ones
  under CurrentRequestedProcedureEvidenceSequence, the rest under PertinentOtherEvidence).

Local codes (coding scheme designator "99GLIO", declared in CodingSchemeIdentificationSequence):

=============  ==================================================
GLIO-SUBTYPE   Glioblastoma transcriptional subtype (head concept)
GLIO-MGMT      MGMT promoter methylation status (head concept)
GLIO-EGFR      EGFR amplification status (head concept)
GLIO-REGIONS   Glioblastoma histological region (head concept)
AREAFRAC       Area fraction of tissue
THRESHOLD      Decision threshold
=============  ==================================================

Class concepts (region classes, subtypes, MGMT/EGFR classes) come from the bundle's manifest
(``CodedClass``); docs/coding.md lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from glio_node import coding
from glio_node.results import AnalysisResult, SlideCall, Task
from glio_node.writers import common
from glio_node.writers.common import SourceSlide, WrittenObject

_L = common.LOCAL_SCHEME
HEAD_CONCEPTS: dict[Task, hd.sr.CodedConcept] = {
    "subtype": hd.sr.CodedConcept("GLIO-SUBTYPE", _L, "Glioblastoma transcriptional subtype"),
    "mgmt": hd.sr.CodedConcept("GLIO-MGMT", _L, "MGMT promoter methylation status"),
    "egfr": hd.sr.CodedConcept("GLIO-EGFR", _L, "EGFR amplification status"),
    "segmentation": hd.sr.CodedConcept("GLIO-REGIONS", _L, "Glioblastoma histological region"),
}
AREA_FRACTION = hd.sr.CodedConcept("AREAFRAC", _L, "Area fraction of tissue")
THRESHOLD = hd.sr.CodedConcept("THRESHOLD", _L, "Decision threshold")
SOURCE_COMPLETENESS = hd.sr.CodedConcept("SRCCOMPL", _L, "Source image completeness")
SOURCE_INCOMPLETE = hd.sr.CodedConcept(
    "SRCINCOMPL", _L, "Incomplete source: missing frames were not analysed"
)
INDETERMINATE = codes.SCT.Indeterminate  # (82334004, SCT, "Indeterminate")
PROBABILITY = codes.DCM.Probability  # (122157, DCM, "Probability")
PROCEDURE_REPORTED = codes.DCM.WholeSlideImaging  # (112703, DCM, "Whole Slide Imaging")
AREA = codes.SCT.Area  # (42798000, SCT, "Area")
TISSUE = codes.SCT.Tissue  # (85756007, SCT, "Tissue")
UNIT_MM2 = codes.UCUM.SquareMillimeter  # (mm2, UCUM)
UNIT_PERCENT = codes.UCUM.Percent  # (%, UCUM)
UNIT_NONE = codes.UCUM.NoUnits  # (1, UCUM, "no units")


def write_sr(
    source: SourceSlide,
    result: AnalysisResult,
    seg_levels: list[Dataset],
    heatmaps: dict[tuple[str, str], Dataset],
    out_dir: Path,
    annotations: Sequence[Dataset] = (),
    attention: dict[str, Dataset] | None = None,
) -> WrittenObject:
    """Write the measurement report; ``seg_levels[0]`` is the full-resolution SEG instance.

    ``heatmaps`` maps (task, class name) to the Parametric Map written for it (metadata is
    enough); ``attention`` maps an aggregator head's task to its attention Parametric Map;
    ``annotations`` (the ANN of the same run) are listed as evidence beside them. Raises ``ValueError`` when the result's fractions name unknown region classes.
    """
    algorithm = result.algorithm
    known = {c.name for c in result.region_classes}
    unknown = sorted(set(result.region_area_fraction) - known)
    if unknown:
        raise ValueError(f"area fractions for unknown region classes {unknown}; known: {sorted(known)}")
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"{k}={v}" for k, v in common.algorithm_parameters(algorithm).items()],
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=common.MANUFACTURER,
    )
    slide_level = hd.sr.SourceImageForMeasurementGroup.from_source_image(source.primary)

    def tracking(*kind: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(
            uid=common.derived_uid(source, algorithm, "sr", "tracking", *kind),
            identifier=" ".join(kind)[:64],
        )

    groups: list = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking("tissue"),
            finding_type=TISSUE,
            algorithm_id=algorithm_id,
            measurements=[
                hd.sr.Measurement(name=AREA, value=float(result.tissue_area_mm2), unit=UNIT_MM2)
            ],
            source_images=[slide_level],
        )
    ]
    if result.source_gaps:
        # First after the tissue area: every figure below covers only what arrived.
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking("source", "completeness"),
                finding_type=SOURCE_COMPLETENESS,
                algorithm_id=algorithm_id,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(name=SOURCE_COMPLETENESS, value=SOURCE_INCOMPLETE)
                ],
                source_images=[slide_level],
            )
        )
    seg0 = seg_levels[0]
    for index, region in enumerate(result.region_classes):
        fraction = float(result.region_area_fraction.get(region.name, 0.0))
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking("region", region.name),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg0.SOPClassUID,
                    sop_instance_uid=seg0.SOPInstanceUID,
                    segment_number=index + 1,
                    source_images=[
                        hd.sr.SourceImageForSegmentation.from_source_image(source.primary)
                    ],
                ),
                finding_type=common.coded(region),
                finding_category=TISSUE,
                algorithm_id=algorithm_id,
                measurements=[
                    hd.sr.Measurement(name=AREA_FRACTION, value=100.0 * fraction, unit=UNIT_PERCENT),
                    hd.sr.Measurement(
                        name=AREA, value=fraction * float(result.tissue_area_mm2), unit=UNIT_MM2
                    ),
                ],
            )
        )
    attention = attention or {}
    for call in result.calls:
        groups.extend(_call_groups(call, algorithm_id, slide_level, heatmaps, tracking, attention.get(call.task)))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=common.derived_uid(source, algorithm, "sr", "device"),
            name=common.MANUFACTURER,
            manufacturer_name=common.MANUFACTURER,
            model_name=algorithm.name,
            serial_number=common.device_serial_number(algorithm),
        ),
    )
    subject = None
    if source.has_specimen:
        specimen = source.primary.SpecimenDescriptionSequence[0]
        subject = hd.sr.SubjectContext(
            subject_class=codes.DCM.Specimen,
            subject_class_specific_context=hd.sr.SubjectContextSpecimen(
                uid=specimen.SpecimenUID,
                identifier=specimen.SpecimenIdentifier,
                container_identifier=source.primary.ContainerIdentifier,
            ),
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None,
            observer_device_context=observer,
            subject_context=subject,
        ),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    series_uid = common.derived_uid(source, algorithm, "sr", "series")
    sop_uid = common.derived_uid(source, algorithm, "sr", "instance")
    content_date, content_time = common.content_date_time()
    document = hd.sr.Comprehensive3DSR(
        evidence=[*source.datasets, *seg_levels, *heatmaps.values(), *attention.values(), *annotations],
        content=report,
        series_instance_uid=series_uid,
        series_number=common.SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=common.MANUFACTURER,
        is_complete=True,
        is_final=False,  # unverified AI output, never a final report
        is_verified=False,
        manufacturer_model_name=algorithm.name,
        software_versions=common.software_versions(algorithm),
        device_serial_number=common.device_serial_number(algorithm),
        series_description=common.series_description("measurement report", "SR", algorithm),
        coding_schemes=common.coding_schemes(),
        contributing_equipment=common.contributing_equipment(algorithm),
        content_date=content_date,
        content_time=content_time,
        series_date=content_date,
        series_time=content_time,
    )
    path = out_dir / f"sr-{sop_uid}.dcm"
    document.save_as(path, enforce_file_format=True)
    return WrittenObject(
        path=path,
        kind="sr",
        sop_class_uid=str(document.SOPClassUID),
        sop_instance_uid=str(sop_uid),
        series_instance_uid=str(series_uid),
        series_number=common.SR_SERIES_NUMBER,
    )


def _call_groups(call: SlideCall, algorithm_id, slide_level, heatmaps, tracking, attention_map=None) -> list:
    if len(call.probabilities) != len(call.classes):
        raise ValueError(
            f"{call.task} call has {len(call.probabilities)} probabilities for "
            f"{len(call.classes)} classes"
        )
    head = HEAD_CONCEPTS[call.task]
    value = INDETERMINATE if call.call is None else common.coded(call.call)
    evaluations = [hd.sr.QualitativeEvaluation(name=head, value=value)]
    if call.indeterminate_reason is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=common.coded(coding.INDETERMINATE_REASON),
                value=common.coded(coding.INDETERMINATE_REASONS[call.indeterminate_reason]),
            )
        )
    measurements = [hd.sr.Measurement(name=THRESHOLD, value=float(call.threshold), unit=UNIT_NONE)]
    if call.fold_spread is not None and call.folds > 1:
        measurements.append(
            hd.sr.Measurement(name=common.coded(coding.FOLD_SPREAD), value=float(call.fold_spread), unit=UNIT_NONE)
        )
    sources = [slide_level]
    if attention_map is not None:
        sources.append(hd.sr.SourceImageForMeasurementGroup.from_source_image(attention_map))
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(call.task, "call"),
            finding_type=head,
            algorithm_id=algorithm_id,
            qualitative_evaluations=evaluations,
            measurements=measurements,
            source_images=sources,
        )
    ]
    for cls, probability in zip(call.classes, call.probabilities):
        heatmap = heatmaps.get((call.task, cls.name))
        referenced = (
            [hd.sr.SourceImageForMeasurement.from_source_image(heatmap)] if heatmap else None
        )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(call.task, "probability", cls.name),
                finding_type=common.coded(cls),
                algorithm_id=algorithm_id,
                measurements=[
                    hd.sr.Measurement(
                        name=PROBABILITY,
                        value=float(probability),
                        unit=UNIT_NONE,
                        referenced_images=referenced,
                    )
                ],
                source_images=[slide_level],
            )
        )
    return groups
