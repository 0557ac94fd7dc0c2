"""The node's log names no UID: a whole ``serve`` round trip, then every UID of the slide, of a
refused instance, of the results and of the Storage Commitment transactions is looked for in
the log (docs/operations.md: the log is read by people who must not see identifiers; the audit
trail keeps the UIDs).

The round trip: DCMTK storescu sends the slide, sends it again (duplicates), sends an instance
the receiver refuses (no Series Instance UID); the node analyses the slide, sends the results to
Orthanc with Storage Commitment on and takes Orthanc's N-EVENT-REPORT; then it is stopped.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from node_process import wait_for
from orthanc_peer import Orthanc, free_port
from pydicom.uid import generate_uid

from glio_node.store.models import DeliveryState

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs("orthanc", "storescu"),
]

DICOM_STANDARD_ROOT = "1.2.840.10008."  # SOP classes, transfer syntaxes: not identifiers


def uids_in(path: Path) -> set[str]:
    """Every UID value in a DICOM file (meta header and nested sequences too), less the
    standard's own (SOP classes, transfer syntaxes)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    found: set[str] = set()

    def visit(_ds: pydicom.Dataset, elem: pydicom.DataElement) -> None:
        if elem.VR == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            found.update(str(v) for v in values)

    ds.file_meta.walk(visit)
    ds.walk(visit)
    return {uid for uid in found if not uid.startswith(DICOM_STANDARD_ROOT)}


def test_a_whole_round_trip_logs_no_uid_of_the_slide_its_results_or_the_commitment(
    tmp_path, make_node, slide, monkeypatch
):
    # An instance the receiver refuses (0xC210): the slide's first file, a new SOP Instance UID,
    # no Series Instance UID.
    refused = pydicom.dcmread(slide.files[0])
    refused.SOPInstanceUID = refused.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del refused.SeriesInstanceUID
    refused_path = tmp_path / "refused.dcm"
    refused.save_as(refused_path, enforce_file_format=True)

    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port())
    node = make_node(orthanc.dicom_port)
    orthanc.extra = {"DicomModalities": {"glionode": ["GLIONODE", "127.0.0.1", node.port]}}
    monkeypatch.setenv("GLIO_DESTINATIONS_0_STORAGE_COMMITMENT", "true")
    orthanc.start()
    try:
        node.start()
        node.send(slide)
        node.send(slide)  # the PACS sends the slide again: every instance a duplicate
        subprocess.run(
            ["storescu", "-aec", "GLIONODE", "-xy", "-R", "127.0.0.1", str(node.port), str(refused_path)],
            capture_output=True, timeout=60,
        )
        wait_for(lambda: node.events("commitment_confirmed"), 180, "Orthanc's commitment", node)
        wait_for(
            lambda: all(d.state == DeliveryState.COMMITTED for d in node.deliveries()),
            30, "every delivery committed", node,
        )
        assert node.stop() == 0
    finally:
        orthanc.stop()

    # The round trip did what the log lines are about.
    assert len(node.events("instance_duplicate")) == len(slide.files)
    [refusal] = node.events("instance_refused")
    assert refusal.details["status"] == "0xC210"
    [requested] = node.events("commitment_requested")

    results = list((node.folder / "spool" / "results").rglob("*.dcm"))  # the GeoJSON is not delivered here
    assert len(results) == len(node.deliveries())
    uids = set().union(*(uids_in(p) for p in [*slide.files, refused_path, *results]))
    uids.add(requested.details["transaction_uid"])
    assert {slide.study_instance_uid, slide.series_instance_uid, str(refused.SOPInstanceUID)} <= uids

    log = node.log()
    leaked = sorted(uid for uid in uids if uid in log)
    assert leaked == [], f"UIDs in the log: {leaked}"
    # The lines about those instances were written, naming the peer instead of the instance.
    assert re.search(r"C-STORE from \S+: instance already stored, not stored again", log)
    assert re.search(r"C-STORE from \S+ refused with 0xC210", log)
    assert "destination pacs committed" in log
