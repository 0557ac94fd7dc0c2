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
  None when the bundle has no segmentation network (no SEG is written): the report is then the
  tissue, QC, OOD and call groups, still a TID 1500 Measurement Report.
- TID 1501 group "slide QC" (when QC ran): finding type (GLIO-QC, 99GLIO, "Slide quality
  control"); qualitative evaluations: GLIO-QC = the verdict (GLIO-QC-PASS / -WARN / -FAIL), and
  one GLIO-QC-REASON per finding (the artefact or slide-wide problem); measurement Area (mm2) of
  the usable tissue (tissue minus artefacts).  Then one TID 1501 group per finding: finding type
  = its concept (GLIO-QC-BLUR, -PEN, -DARK, -BUBBLE, -LOWTISS, -EXTENT), measurement Area in mm2.
- TID 1501 group per slide-level call (subtype, MGMT, EGFR): finding type = the head's concept;
  qualitative evaluation head-concept = the called class, or (82334004, SCT, "Indeterminate")
  when the top probability is below the head's threshold or the slide failed QC (then a second
  evaluation GLIO-INDREASON = GLIO-QC-FAIL says so); qualitative evaluation "Probability
  calibration" (99GLIO CALIB) = CALTS (temperature scaling fitted on validation slides) or CALNONE
  (not calibrated); measurements "Decision threshold" (99GLIO THRESHOLD, unit 1) and
  "Calibration temperature" (99GLIO CALTEMP, unit 1; 1.0 when not calibrated); source image =
  the slide level.
- TID 1501 group per class probability of each call: finding type = the class concept;
  measurement (122157, DCM, "Probability"), unit (1, UCUM, "no units"), with the class's heatmap
  (Parametric Map) as the measurement's source image when one was written (the slide-level value
  aggregates that tile grid).
- Aggregator heads (two-stage tasks) add to their call group: the attention Parametric Map
  (writers/attention.py) as a second source image of the group, so the map is referenced from
  the call it explains; with fold models, a measurement "Fold model spread of top-class
  probability" (99GLIO FOLDSPREAD, unit 1; max - min across folds of the probability each
  gives the ensemble's top class); when the call is indeterminate, a qualitative evaluation
  "Reason the call is indeterminate" (99GLIO GLIO-INDREASON) = 99GLIO LOWPROB or FOLDDISAGREE.
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
GLIO-QC...     slide QC: verdict, reasons, indeterminate reason (glio_node.coding QC_*)
CALIB          Probability calibration (question)
CALTS          Temperature scaling fitted on validation slides (answer)
CALNONE        Not calibrated (answer)
CALTEMP        Calibration temperature
GLIO-OOD       Indeterminate (out of distribution): a call withheld by the OOD gate
OODCHECK       Out-of-distribution check (finding and evaluation)
GLIO-INDIST    Within the training distribution
OODSCORE       Out-of-distribution score (median tile score; ~1 typical of training)
OODTHRESH      Out-of-distribution upper threshold (fitted on validation slides)
OODTHRLOW      Out-of-distribution lower threshold (fitted on validation slides)
TESTMETRIC     Test-set metric (its name in the call's algorithm parameters)
TESTCILOW      Test-set metric 95% CI lower limit
TESTCIHIGH     Test-set metric 95% CI upper limit
TESTPATIENTS   Test-set patients
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
from glio_node.coding import INDETERMINATE_REASON, QC_CONCEPT, QC_REASON, QC_VERDICTS
from glio_node.results import AnalysisResult, QcReport, SlideCall, Task, ValidationEvidence
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
CALIBRATION = hd.sr.CodedConcept("CALIB", _L, "Probability calibration")
CALIBRATED = hd.sr.CodedConcept("CALTS", _L, "Temperature scaling fitted on validation slides")
NOT_CALIBRATED = hd.sr.CodedConcept("CALNONE", _L, "Not calibrated")
TEMPERATURE = hd.sr.CodedConcept("CALTEMP", _L, "Calibration temperature")
SOURCE_COMPLETENESS = hd.sr.CodedConcept("SRCCOMPL", _L, "Source image completeness")
SOURCE_INCOMPLETE = hd.sr.CodedConcept(
    "SRCINCOMPL", _L, "Incomplete source: missing frames were not analysed"
)
OUT_OF_DISTRIBUTION = hd.sr.CodedConcept("GLIO-OOD", _L, "Indeterminate (out of distribution)")
OOD_CHECK = hd.sr.CodedConcept("OODCHECK", _L, "Out-of-distribution check")
IN_DISTRIBUTION = hd.sr.CodedConcept("GLIO-INDIST", _L, "Within the training distribution")
OOD_SCORE = hd.sr.CodedConcept("OODSCORE", _L, "Out-of-distribution score")
OOD_THRESHOLD = hd.sr.CodedConcept("OODTHRESH", _L, "Out-of-distribution upper threshold")
OOD_THRESHOLD_LOW = hd.sr.CodedConcept("OODTHRLOW", _L, "Out-of-distribution lower threshold")
TEST_METRIC = hd.sr.CodedConcept("TESTMETRIC", _L, "Test-set metric")
TEST_CI_LOW = hd.sr.CodedConcept("TESTCILOW", _L, "Test-set metric 95% CI lower limit")
TEST_CI_HIGH = hd.sr.CodedConcept("TESTCIHIGH", _L, "Test-set metric 95% CI upper limit")
TEST_PATIENTS = hd.sr.CodedConcept("TESTPATIENTS", _L, "Test-set patients")
NO_TEST_FIGURE = "no test-set figure"
INDETERMINATE = codes.SCT.Indeterminate  # (82334004, SCT, "Indeterminate")
PROBABILITY = codes.DCM.Probability  # (122157, DCM, "Probability")
PROCEDURE_REPORTED = codes.DCM.WholeSlideImaging  # (112703, DCM, "Whole Slide Imaging")
AREA = codes.SCT.Area  # (42798000, SCT, "Area")
TISSUE = codes.SCT.Tissue  # (85756007, SCT, "Tissue")
UNIT_MM2 = codes.UCUM.SquareMillimeter  # (mm2, UCUM)
UNIT_PERCENT = codes.UCUM.Percent  # (%, UCUM)
UNIT_NONE = codes.UCUM.NoUnits  # (1, UCUM, "no units")
UNIT_PATIENTS = hd.sr.CodedConcept("{patients}", "UCUM", "patients")  # a UCUM annotation: a count


def write_sr(
    source: SourceSlide,
    result: AnalysisResult,
    seg_levels: list[Dataset],
    heatmaps: dict[tuple[str, str], Dataset],
    out_dir: Path,
    annotations: Sequence[Dataset] = (),
    ood_map: Dataset | None = None,
    attention: dict[str, Dataset] | None = None,
) -> WrittenObject:
    """Write the measurement report; ``seg_levels[0]`` is the full-resolution SEG instance
    (``seg_levels`` is empty for a result without regions: the region groups are left out and
    the report holds the tissue, QC, OOD and call groups).

    ``heatmaps`` maps (task, class name) to the Parametric Map written for it (metadata is
    enough); ``annotations`` (the ANN of the same run) are listed as evidence beside them;
    ``ood_map`` (the tile OOD score Parametric Map) is the OOD check's source image; ``attention``
    maps an aggregator head's task to its attention Parametric Map. Raises ``ValueError`` when the
    result's fractions name unknown region classes.
    """
    algorithm = result.algorithm
    known = {c.name for c in result.region_classes}
    unknown = sorted(set(result.region_area_fraction or {}) - known)
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
    if result.qc is not None:
        groups.extend(_qc_groups(result.qc, algorithm_id, slide_level, tracking))
    if result.region_classes and not seg_levels:
        raise ValueError("the result has region classes but no SEG was written for them to reference")
    for index, region in enumerate(result.region_classes):  # none without a segmentation network
        seg0 = seg_levels[0]
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
    if result.ood is not None:
        groups.append(_ood_group(result, algorithm_id, slide_level, ood_map, tracking))
    evidence = dict(algorithm.test_evidence)
    attention = attention or {}
    for call in result.calls:
        call_algorithm = _with_evidence(algorithm, algorithm_id, evidence.get(call.task))
        groups.extend(_call_groups(
            call, call_algorithm, slide_level, heatmaps, tracking, evidence.get(call.task), attention.get(call.task)
        ))

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
        evidence=[*source.datasets, *seg_levels, *heatmaps.values(), *attention.values(), *annotations, *([ood_map] if ood_map is not None else [])],
        content=report,
        series_instance_uid=series_uid,
        series_number=common.SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        is_complete=True,
        is_final=False,  # unverified AI output, never a final report
        is_verified=False,
        **common.equipment(algorithm),
        series_description=common.series_description("measurement report", "SR", algorithm),
        coding_schemes=common.coding_schemes(),
        contributing_equipment=common.contributing_equipment(algorithm),
        **common.dated(content_date, content_time),
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


def _with_evidence(algorithm, algorithm_id, evidence: ValidationEvidence | None) -> hd.sr.AlgorithmIdentification:
    """The call's algorithm identification: the bundle's, plus its test-set evidence in words."""
    params = [f"{k}={v}" for k, v in common.algorithm_parameters(algorithm).items()]
    if evidence is None:
        params.append(f"test_evidence={NO_TEST_FIGURE}")
    else:
        ci = "" if evidence.ci_low is None or evidence.ci_high is None else f" (95% CI {evidence.ci_low:.3f} to {evidence.ci_high:.3f})"
        n = "" if evidence.patients is None else f" on {evidence.patients} test patients"
        params.append(f"test_evidence={evidence.metric} {evidence.value:.3f}{ci}{n}")
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=params,
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=common.MANUFACTURER,
    )


def _evidence_measurements(evidence: ValidationEvidence | None) -> list:
    if evidence is None:
        return []
    out = [hd.sr.Measurement(name=TEST_METRIC, value=float(evidence.value), unit=UNIT_NONE)]
    if evidence.ci_low is not None and evidence.ci_high is not None:
        out += [
            hd.sr.Measurement(name=TEST_CI_LOW, value=float(evidence.ci_low), unit=UNIT_NONE),
            hd.sr.Measurement(name=TEST_CI_HIGH, value=float(evidence.ci_high), unit=UNIT_NONE),
        ]
    if evidence.patients is not None:
        out.append(hd.sr.Measurement(name=TEST_PATIENTS, value=float(evidence.patients), unit=UNIT_PATIENTS))
    return out


def _ood_group(result: AnalysisResult, algorithm_id, slide_level, ood_map, tracking):
    """The OOD gate's verdict: in or out, the slide score (median tile score) and the threshold."""
    verdict = result.ood
    referenced = [hd.sr.SourceImageForMeasurement.from_source_image(ood_map)] if ood_map is not None else None
    measurements = [
        hd.sr.Measurement(name=OOD_THRESHOLD_LOW, value=float(verdict.slide_threshold_low), unit=UNIT_NONE),
        hd.sr.Measurement(name=OOD_THRESHOLD, value=float(verdict.slide_threshold), unit=UNIT_NONE),
    ]
    if verdict.slide_score is not None:
        measurements.insert(
            0, hd.sr.Measurement(name=OOD_SCORE, value=float(verdict.slide_score), unit=UNIT_NONE, referenced_images=referenced)
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking("ood", "check"),
        finding_type=OOD_CHECK,
        algorithm_id=algorithm_id,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=OOD_CHECK, value=OUT_OF_DISTRIBUTION if verdict.out_of_distribution else IN_DISTRIBUTION
            )
        ],
        measurements=measurements,
        source_images=[slide_level],
    )


def _call_groups(
    call: SlideCall, algorithm_id, slide_level, heatmaps, tracking,
    evidence: ValidationEvidence | None = None, attention_map=None,
) -> list:
    if len(call.probabilities) != len(call.classes):
        raise ValueError(
            f"{call.task} call has {len(call.probabilities)} probabilities for "
            f"{len(call.classes)} classes"
        )
    head = HEAD_CONCEPTS[call.task]
    if call.out_of_distribution:
        value = OUT_OF_DISTRIBUTION
    else:
        value = INDETERMINATE if call.call is None else common.coded(call.call)
    evaluations = [hd.sr.QualitativeEvaluation(name=head, value=value)]
    if call.call is None and call.indeterminate_reason is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=common.coded(INDETERMINATE_REASON), value=common.coded(call.indeterminate_reason)
            )
        )
    if call.fold_reason is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=common.coded(INDETERMINATE_REASON),
                value=common.coded(coding.INDETERMINATE_REASONS[call.fold_reason]),
            )
        )
    measurements = [
        hd.sr.Measurement(name=THRESHOLD, value=float(call.threshold), unit=UNIT_NONE),
        # T = 1.0 when not calibrated: the probabilities reported are the network's own
        hd.sr.Measurement(name=TEMPERATURE, value=float(call.temperature if call.calibrated else 1.0), unit=UNIT_NONE),
        *_evidence_measurements(evidence),
    ]
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
            qualitative_evaluations=[
                *evaluations,
                hd.sr.QualitativeEvaluation(
                    name=CALIBRATION, value=CALIBRATED if call.calibrated else NOT_CALIBRATED
                ),
            ],
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


def _qc_groups(qc: QcReport, algorithm_id, slide_level, tracking) -> list:
    """The verdict with its reasons, then each finding's area (module docstring)."""
    concept = common.coded(QC_CONCEPT)
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking("qc", "verdict"),
            finding_type=concept,
            algorithm_id=algorithm_id,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=concept, value=common.coded(QC_VERDICTS[qc.verdict])),
                *(
                    hd.sr.QualitativeEvaluation(name=common.coded(QC_REASON), value=common.coded(f.reason))
                    for f in qc.findings
                ),
            ],
            measurements=[hd.sr.Measurement(name=AREA, value=float(qc.usable_tissue_mm2), unit=UNIT_MM2)],
            source_images=[slide_level],
        )
    ]
    for finding in qc.findings:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking("qc", finding.reason.name),
                finding_type=common.coded(finding.reason),
                algorithm_id=algorithm_id,
                measurements=[hd.sr.Measurement(name=AREA, value=float(finding.area_mm2), unit=UNIT_MM2)],
                source_images=[slide_level],
            )
        )
    return groups
