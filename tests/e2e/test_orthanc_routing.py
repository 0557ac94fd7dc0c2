"""A hospital's Orthanc routes new slides to glio-node by itself (adapters/orthanc/).

The story: a scanner sends a slide to the PACS (DCMTK storescu -> Debian's Orthanc on
loopback).  When the series is stable, the Lua script in adapters/orthanc/ sends it to
glio-node; glio-node returns SEG, SR and heatmaps to the same Orthanc, into the slide's study.
Nothing is routed twice and the results never loop back to the node.  Series that are not
whole-slide images, or that fail an administrator's rule, stay in Orthanc.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_process import PARAMETRIC_MAP, Node, wait_for
from orthanc_peer import Orthanc, free_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from glio_node.store.models import JobState

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs("orthanc", "storescu"),
]

SCRIPT = Path(__file__).resolve().parents[2] / "adapters" / "orthanc" / "glio-node-routing.lua"
def routing_pacs(folder: Path, node_port: int, script: Path = SCRIPT) -> Orthanc:
    """An Orthanc configured as adapters/orthanc/README.md tells an administrator to."""
    return Orthanc(folder, free_port(), free_port(), extra={
        "LuaScripts": [str(script)],
        "DicomModalities": {"glionode": ["GLIONODE", "127.0.0.1", node_port]},
        "StableAge": 2,
    })


def scanner_sends(pacs: Orthanc, files: list[Path] | tuple[Path, ...]) -> None:
    """What a scanner does: C-STORE to the PACS (-xy -R: propose VL WSI with JPEG)."""
    done = subprocess.run(
        ["storescu", "-aet", "SCANNER", "-aec", pacs.ae_title, "-xy", "-R", "127.0.0.1",
         str(pacs.dicom_port), *map(str, files)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr


def routing_log(pacs: Orthanc) -> list[str]:
    """The script's own lines in Orthanc's log ("Lua says: glio-node routing: ...")."""
    text = (pacs.folder / "orthanc.log").read_text(errors="replace")
    return re.findall(r"glio-node routing: (.*)", text)


def decisions(pacs: Orthanc) -> list[str]:
    return [line for line in routing_log(pacs) if line.startswith("series ")]


def start_storescp(port: int, received: Path) -> subprocess.Popen[bytes]:
    """A plain DCMTK storescp standing in for glio-node where only routing is checked."""
    received.mkdir(exist_ok=True)
    return subprocess.Popen(
        ["storescp", "-aet", "GLIONODE", "+xa", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, received = free_port(), tmp_path / "received"
    proc = start_storescp(port, received)
    yield port, received
    proc.terminate()
    proc.wait(timeout=10)


def ct_image(folder: Path) -> Path:
    """A tiny CT-like instance from another modality, in a new study."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "CT-1", "Test^Ct", "CT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = bytes(8 * 8 * 2)
    path = folder / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_slide_stored_in_orthanc_is_routed_to_the_node_once_and_the_results_do_not_loop(
    tmp_path, make_node, slide
):
    # The node's destination is the PACS; the PACS's "glionode" modality is the node.
    pacs_ports = (free_port(), free_port())
    node: Node = make_node(pacs_ports[0]).start()
    pacs = routing_pacs(tmp_path / "pacs", node.port)
    pacs.dicom_port, pacs.http_port = pacs_ports
    pacs.start()
    try:
        scanner_sends(pacs, slide.files)
        wait_for(lambda: node.jobs() and node.jobs()[0].state == JobState.DONE, 180,
                 "the routed slide to be analysed", node)
        wait_for(node.all_delivered, 60, "the results to be delivered to Orthanc", node)
        delivered = {d.sop_instance_uid: d.sop_class_uid for d in node.deliveries()}
        wait_for(lambda: pacs.instance_count() == len(slide.files) + len(delivered), 30,
                 "the results to be stored in Orthanc")
        result_series = [s for s in pacs.series_of_study(slide.study_instance_uid)
                         if s["MainDicomTags"].get("Modality") != "SM"]
        # Every result series becomes stable in Orthanc and is looked at, then left alone.
        wait_for(lambda: len(decisions(pacs)) == 1 + len(result_series), 30,
                 "Orthanc to decide on every result series")

        routed = [line for line in decisions(pacs) if " routed to glionode" in line]
        assert len(routed) == 1, decisions(pacs)
        not_routed = [line for line in decisions(pacs) if " not routed: " in line]
        assert len(not_routed) == len(result_series)
        assert all("not SM" in line or "glio-node" in line for line in not_routed), not_routed

        # The node received the slide's instances exactly once, and nothing else.
        received = Counter(e.sop_instance_uid for e in node.events("instance_received"))
        assert set(received.values()) == {1}
        assert len(received) == len(slide.files)
        assert node.events("instance_duplicate") == []
        [job] = node.jobs()
        assert job.attempts == 1

        # The slide's study in Orthanc holds the slide and the results, and nothing else.
        in_study = {i["MainDicomTags"]["SOPInstanceUID"]
                    for i in pacs.instances_of_study(slide.study_instance_uid)}
        assert in_study == set(received) | set(delivered)
        assert pacs.instance_count() == len(in_study)
        modalities = Counter(s["MainDicomTags"].get("Modality")
                             for s in pacs.series_of_study(slide.study_instance_uid))
        assert modalities["SM"] == 1 and modalities["SEG"] >= 1 and modalities["SR"] == 1, modalities
        assert PARAMETRIC_MAP in delivered.values()
        jobs = [pacs.get(f"/jobs/{j}") for j in pacs.get("/jobs")]
        stores = [j for j in jobs if j["Type"] == "DicomModalityStore"]
        assert [j["State"] for j in stores] == ["Success"]
    finally:
        pacs.stop()
    assert node.stop() == 0


def test_a_routing_that_found_the_node_down_is_resent_as_the_readme_says(tmp_path, make_node, slide):
    pacs_ports = (free_port(), free_port())
    node: Node = make_node(pacs_ports[0])  # configured, not running yet
    pacs = routing_pacs(tmp_path / "pacs", node.port)
    pacs.dicom_port, pacs.http_port = pacs_ports
    pacs.start()
    try:
        scanner_sends(pacs, slide.files)
        wait_for(lambda: any("failed; it is resubmitted" in line for line in routing_log(pacs)), 30,
                 "Orthanc's store job to fail and the script to say how to re-send")
        [failed] = [j for j in pacs.get("/jobs") if pacs.get(f"/jobs/{j}")["State"] == "Failure"]
        assert pacs.get(f"/jobs/{failed}")["Type"] == "DicomModalityStore"

        node.start()
        pacs.post(f"/jobs/{failed}/resubmit", {})
        wait_for(lambda: node.jobs() and node.jobs()[0].state == JobState.DONE, 180,
                 "the re-sent slide to be analysed", node)
        wait_for(node.all_delivered, 60, "the results to be delivered to Orthanc", node)
        received = Counter(e.sop_instance_uid for e in node.events("instance_received"))
        assert len(received) == len(slide.files) and set(received.values()) == {1}
        wait_for(lambda: pacs.get(f"/jobs/{failed}")["State"] == "Success", 30, "the job to succeed")
    finally:
        pacs.stop()
    assert node.stop() == 0


def test_a_series_that_is_not_a_whole_slide_image_is_not_routed(tmp_path, storescp):
    port, received = storescp
    pacs = routing_pacs(tmp_path / "pacs", port).start()
    try:
        scanner_sends(pacs, [ct_image(tmp_path)])
        wait_for(lambda: decisions(pacs), 30, "the CT series to become stable")
        [decision] = decisions(pacs)
        assert "not routed: Modality is CT, not SM" in decision
        assert list(received.iterdir()) == []
        assert pacs.get("/jobs") == []
    finally:
        pacs.stop()


@pytest.mark.parametrize(("stain", "routed"), [("h&e", True), ("ihc", False)])
def test_a_stain_rule_routes_only_the_matching_slides(tmp_path, storescp, slide, stain, routed):
    port, received = storescp
    text = SCRIPT.read_text()
    assert "  rules = {},\n" in text
    script = tmp_path / "routing.lua"
    script.write_text(text.replace("  rules = {},\n", f"  rules = {{ Stain = '{stain}' }},\n"))
    pacs = routing_pacs(tmp_path / "pacs", port, script).start()
    try:
        scanner_sends(pacs, slide.files)
        wait_for(lambda: decisions(pacs), 30, "the slide's series to become stable")
        [decision] = decisions(pacs)
        if routed:
            assert " routed to glionode" in decision
            wait_for(lambda: len(list(received.iterdir())) == len(slide.files), 30,
                     "the slide to arrive at the node")
        else:
            assert "not routed: rule Stain does not match" in decision
            assert list(received.iterdir()) == []
    finally:
        pacs.stop()


def test_a_slide_uploaded_through_orthancs_rest_api_is_routed_too(tmp_path, storescp, slide):
    # OrthancWSIDicomizer and Orthanc Explorer upload by REST: no calling AE on the instances.
    port, received = storescp
    pacs = routing_pacs(tmp_path / "pacs", port).start()
    try:
        for path in slide.files:
            request = urllib.request.Request(pacs.url + "/instances", data=path.read_bytes(), method="POST")
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert answer.status == 200
        wait_for(lambda: decisions(pacs), 30, "the slide's series to become stable")
        [decision] = decisions(pacs)
        assert " routed to glionode" in decision
        wait_for(lambda: len(list(received.iterdir())) == len(slide.files), 30, "the slide to arrive at the node")
    finally:
        pacs.stop()


def test_a_failed_routing_is_resubmitted_when_the_next_series_becomes_stable(tmp_path, slide):
    port, received = free_port(), tmp_path / "received"
    pacs = routing_pacs(tmp_path / "pacs", port).start()  # the node is down
    node = None
    try:
        scanner_sends(pacs, slide.files)
        wait_for(lambda: any("failed; it is resubmitted" in line for line in routing_log(pacs)), 30,
                 "the store job to fail")
        node = start_storescp(port, received)  # the node is back
        wait_for(lambda: node.poll() is None and subprocess.run(
            ["echoscu", "-aec", "GLIONODE", "127.0.0.1", str(port)], check=False, capture_output=True,
        ).returncode == 0, 15, "the stand-in node to listen")
        scanner_sends(pacs, [ct_image(tmp_path)])  # any next series
        wait_for(lambda: any(" resubmitted" in line and line.startswith("job ") for line in routing_log(pacs)),
                 30, "the failed job to be resubmitted")
        wait_for(lambda: len(list(received.iterdir())) == len(slide.files), 30, "the slide to arrive")
        # Sent once more, not twice: nothing else is queued for the node.
        jobs = [pacs.get(f"/jobs/{j}") for j in pacs.get("/jobs")]
        assert [j["State"] for j in jobs if j["Type"] == "DicomModalityStore"] == ["Success"]
    finally:
        pacs.stop()
        if node is not None:
            node.terminate()
            node.wait(timeout=10)
