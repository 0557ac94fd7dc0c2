"""The senders against a real Orthanc: C-STORE SCU and STOW-RS, and a destination that is down."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pydicom
import pytest
from orthanc_peer import Orthanc, free_port

from glio_node.config import Destination
from glio_node.errors import TransientError
from glio_node.send.dicomweb import StowSender
from glio_node.send.dimse import DimseSender
from glio_node.synthetic.slide import SlideSpec, SyntheticSlide, write_synthetic_slide

pytestmark = pytest.mark.needs("orthanc")

SPEC = SlideSpec(width_px=512, height_px=512, tile_size=256, levels=2, context_images=False)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port()).start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    return write_synthetic_slide(SPEC, tmp_path_factory.mktemp("send-slide"))


def _sop_uids(files) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def _uids(orthanc: Orthanc, study: str) -> set[str]:
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances_of_study(study)}


def test_c_store_sends_each_file_and_reports_its_status(orthanc, slide):
    dest = Destination("pacs", orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)
    results = DimseSender(dest, "GLIONODE").send(list(slide.files))
    assert [r.status for r in results] == ["0x0000"] * len(slide.files)
    assert all(r.ok for r in results)
    assert _uids(orthanc, slide.study_instance_uid) >= _sop_uids(slide.files)


def test_stow_rs_sends_each_file(orthanc, tmp_path):
    other = write_synthetic_slide(replace(SPEC, seed=7), tmp_path)
    dest = Destination("web", type="dicomweb", url=orthanc.dicomweb_url)
    results = StowSender(dest).send(list(other.files))
    assert all(r.ok for r in results), results
    assert {r.status for r in results} == {"HTTP 200"}
    assert _uids(orthanc, other.study_instance_uid) == _sop_uids(other.files)


def test_a_destination_that_is_down_is_a_transient_error(slide):
    port = free_port()
    with pytest.raises(TransientError, match=r"pacs \(ORTHANC@127.0.0.1:\d+\): no association"):
        DimseSender(Destination("pacs", "ORTHANC", "127.0.0.1", port), "GLIONODE").send(
            list(slide.files)
        )
    with pytest.raises(TransientError, match=r"web \(http://127.0.0.1:\d+/dicom-web/studies\)"):
        StowSender(
            Destination("web", type="dicomweb", url=f"http://127.0.0.1:{port}/dicom-web")
        ).send(list(slide.files))
