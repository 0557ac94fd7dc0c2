"""What a pathologist reads beside each call: was the slide like the training slides, what did the
bundle score on its test patients, and which stain normalisation its tiles had.  Written by the
real writers and checked with dciodvfy."""

from __future__ import annotations

from dataclasses import replace

import dciodvfy
import numpy as np
import pydicom
from test_writers import make_result, make_source

from glio_node.results import OodResult, Raster, ValidationEvidence
from glio_node.writers import write_results
from glio_node.writers.sr import NO_TEST_FIGURE

MGMT_EVIDENCE = ValidationEvidence("slide balanced accuracy", 0.81, 0.62, 0.94, 12)
STAIN = "Macenko to the reference H&E stain matrix ((0.5626; 0.2159)...)"


def _items(ds):
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _items(item)


def _ours(ds):
    """glio-node's Contributing Equipment item (after the source's acquisition equipment)."""
    return next(e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "glio-node")


def _gated_result(out_of_distribution: bool):
    base = make_result()
    algorithm = replace(
        base.algorithm,
        normalizations=(("molecular", "Macenko to the reference H&E stain matrix ((0.5626, 0.2159)...)"),),
        test_evidence=(("mgmt", MGMT_EVIDENCE),),
        dataset="synthetic slides only",
    )
    grid = base.heatmaps[0].probabilities
    scores = np.linspace(0.5, 4.0, grid.array.shape[0] * grid.array.shape[1]).reshape(grid.array.shape[:2])
    scores[0, 0] = np.nan
    verdict = OodResult("molecular", 3.1 if out_of_distribution else 1.0, 2.4, out_of_distribution,
                        Raster(scores.astype(np.float32), grid.mm_per_px), slide_threshold_low=0.8)
    calls = tuple(replace(c, call=None, out_of_distribution=True) if out_of_distribution else c for c in base.calls)
    return replace(base, algorithm=algorithm, ood=verdict, calls=calls)


def test_out_of_distribution_calls_evidence_and_stain_are_coded_and_valid(tmp_path):
    written = write_results([make_source()], _gated_result(True), tmp_path)
    sr = pydicom.dcmread(next(o.path for o in written.objects if o.kind == "sr"))
    items = list(_items(sr))

    calls = [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue.startswith("GLIO-")
             and i.ConceptNameCodeSequence[0].CodeValue in ("GLIO-SUBTYPE", "GLIO-MGMT", "GLIO-EGFR")]
    assert len(calls) == 3 and {c.ConceptCodeSequence[0].CodeValue for c in calls} == {"GLIO-OOD"}
    assert {c.ConceptCodeSequence[0].CodeMeaning for c in calls} == {"Indeterminate (out of distribution)"}
    check = next(i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "OODCHECK")
    assert check.ConceptCodeSequence[0].CodeValue == "GLIO-OOD"

    numbers = {i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
               for i in items if i.ValueType == "NUM"}
    assert numbers["OODSCORE"] == 3.1 and numbers["OODTHRESH"] == 2.4 and numbers["OODTHRLOW"] == 0.8
    assert (numbers["TESTMETRIC"], numbers["TESTCILOW"], numbers["TESTCIHIGH"], numbers["TESTPATIENTS"]) == (0.81, 0.62, 0.94, 12)
    parameters = " ".join(str(i.TextValue) for i in items if i.ValueType == "TEXT")
    assert "test_evidence=slide balanced accuracy 0.810 (95% CI 0.620 to 0.940) on 12 test patients" in parameters
    assert f"test_evidence={NO_TEST_FIGURE}" in parameters  # subtype and EGFR have no test figure
    assert "molecular_stain_normalization=" + STAIN in parameters and "dataset=synthetic slides only" in parameters

    ood_map = pydicom.dcmread(next(o.path for o in written.objects if o.path.name.startswith("ood-")))
    assert ood_map.SeriesNumber == 9050
    mapping = ood_map.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == 0.001
    assert "Stain normalisation: molecular: Macenko" in _ours(ood_map).ContributionDescription
    for heatmap in (o for o in written.objects if o.kind == "heatmap"):
        assert "Stain normalisation: molecular: Macenko" in _ours(pydicom.dcmread(heatmap.path)).ContributionDescription
    for o in written.objects:
        dciodvfy.assert_valid(o.path)


def test_a_slide_within_the_distribution_keeps_its_called_classes(tmp_path):
    written = write_results([make_source()], _gated_result(False), tmp_path)
    sr = pydicom.dcmread(next(o.path for o in written.objects if o.kind == "sr"))
    values = [i.ConceptCodeSequence[0].CodeValue for i in _items(sr) if i.ValueType == "CODE"]
    assert "GLIO-INDIST" in values and "GLIO-OOD" not in values
    dciodvfy.assert_valid(next(o.path for o in written.objects if o.kind == "sr"))
