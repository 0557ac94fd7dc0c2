"""The destinations' reachability, checked by send/echo's prober against real peers.

The story: the operator's page says whether each destination answers, without the page itself
opening an association.  A DCMTK ``storescp`` is the PACS (it answers C-ECHO as a Verification
SCP); a port where nothing listens is a PACS that is down; a real Orthanc that checks the
called AE title refuses the association, and its DICOMweb root with basic auth tells right
credentials from wrong ones.  The background thread posts on the board the page reads, and
sees a PACS go away.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from orthanc_peer import Orthanc, free_port

from glio_node.config import Destination
from glio_node.reachability import NOT_CHECKED, Reachability, ReachabilityBoard
from glio_node.send.echo import ReachabilityProber

storescp_missing = pytest.mark.needs("storescp")


def _wait_for(condition: Callable[[], object], seconds: float, what: str) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {seconds} s")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "-od", str(tmp_path), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(lambda: _listening(port), 10, "storescp listening")
        yield port, process
    finally:
        process.terminate()
        process.wait(10)


def _dimse(name: str, port: int, ae_title: str = "STORESCP") -> Destination:
    return Destination(name=name, ae_title=ae_title, host="127.0.0.1", port=port)


@storescp_missing
def test_one_round_says_which_pacs_answers_c_echo_and_which_is_down(storescp):
    port, _ = storescp
    up, down = _dimse("archive", port), _dimse("backup", free_port())
    board = ReachabilityBoard([up, down])
    assert [(r.destination, r.ok, r.detail) for r in board.all()] == [
        ("archive", None, NOT_CHECKED), ("backup", None, NOT_CHECKED),
    ]

    results = ReachabilityProber([up, down], "GLIONODE", board, 60, timeout_seconds=2).check_all()

    assert results == board.all()
    archive, backup = results
    assert (archive.kind, archive.ok) == ("C-ECHO", True)
    assert archive.detail == f"STORESCP@127.0.0.1:{port} answered C-ECHO"
    assert (backup.kind, backup.ok) == ("C-ECHO", False)
    assert backup.detail == f"STORESCP@127.0.0.1:{down.port}: no answer (host, port or firewall)"
    assert archive.checked_at is not None and archive.checked_at.tzinfo is not None


@storescp_missing
def test_the_background_prober_posts_at_once_and_sees_the_pacs_go_away(storescp, caplog):
    caplog.set_level(logging.INFO, logger="glio_node.send.echo")
    port, process = storescp
    pacs = _dimse("archive", port)
    board = ReachabilityBoard([pacs])
    prober = ReachabilityProber([pacs], "GLIONODE", board, 0, timeout_seconds=1).start()  # 0: floored to 1 s
    try:
        first = _wait_for(lambda: board.all()[0].ok, 10, "first C-ECHO answer")
        assert first is True
        process.terminate()
        process.wait(10)
        gone = _wait_for(lambda: board.all()[0].ok is False and board.all()[0], 15, "the PACS seen down")
        assert "no answer" in gone.detail
    finally:
        prober.stop(timeout=5)
    assert not prober._thread.is_alive()
    # One line per change of state, not one per round.
    changes = [r.getMessage() for r in caplog.records if r.name == "glio_node.send.echo"]
    assert changes == [
        f"destination archive reachable (C-ECHO): STORESCP@127.0.0.1:{port} answered C-ECHO",
        f"destination archive not reachable (C-ECHO): STORESCP@127.0.0.1:{port}: no answer (host, port or firewall)",
    ]


def test_the_board_refuses_a_destination_it_does_not_list_and_the_prober_a_zero_timeout():
    board = ReachabilityBoard([_dimse("archive", 104)])
    with pytest.raises(ValueError, match=r"reachability of 'elsewhere' posted, but the configured destinations are archive"):
        board.post(Reachability("elsewhere", "C-ECHO", True, "", None))
    with pytest.raises(ValueError, match=r"timeout_seconds = 0: must be more than 0 seconds"):
        ReachabilityProber([], "GLIONODE", board, 60, timeout_seconds=0)


@pytest.mark.needs("orthanc")
def test_orthanc_refuses_a_wrong_called_ae_and_its_dicomweb_root_tells_good_credentials_from_bad(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(), extra={
        "DicomCheckCalledAet": True,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"glio": "right-password"},
    }).start()
    try:
        web = orthanc.dicomweb_url
        destinations = [
            _dimse("wrong-ae", orthanc.dicom_port, ae_title="NOT-ORTHANC"),
            _dimse("orthanc", orthanc.dicom_port, ae_title="ORTHANC"),
            Destination(name="web", type="dicomweb", url=web, username="glio", password="right-password"),
            Destination(name="web-bad", type="dicomweb", url=web, username="glio", password="wrong-password"),
            Destination(name="web-down", type="dicomweb", url=f"http://127.0.0.1:{free_port()}/dicom-web"),
        ]
        board = ReachabilityBoard(destinations)
        got = {r.destination: r for r in ReachabilityProber(destinations, "GLIONODE", board, 60, timeout_seconds=2).check_all()}
    finally:
        orthanc.stop()
    assert (got["wrong-ae"].ok, got["wrong-ae"].detail) == (
        False, f"NOT-ORTHANC@127.0.0.1:{orthanc.dicom_port}: association rejected (check the AE titles)"
    )
    assert got["orthanc"].ok is True
    assert (got["web"].kind, got["web"].ok, got["web"].detail) == ("HTTP", True, "HTTP 200")
    assert (got["web-bad"].ok, got["web-bad"].detail) == (False, "HTTP 401: check the destination's credentials")
    assert got["web-down"].ok is False and got["web-down"].detail.startswith("no answer: ")
