"""Storage Commitment end to end: DCMTK storescu -> ``glio-node serve`` -> Orthanc and storescp.

The node sends its results to two destinations that both have ``storage_commitment = true``:
Orthanc, which commits them by an N-EVENT-REPORT on an association it opens to the node, and
DCMTK's storescp, which stores them but cannot commit (it refuses the Storage Commitment SOP
class).  With ``retention_seconds = 0`` the spool would be purged at once if "sent" were
enough; it is not purged while storescp's commitment is missing, and is purged once the
operator turns commitment off for storescp (the Orthanc results being committed).
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from node_process import wait_for
from orthanc_peer import Orthanc, free_port

from glio_node.store.models import DeliveryState
from glio_node.store.nodes import HEARTBEAT_SECONDS

PURGE_SECONDS = 5  # the node purges every 5 s when retention_seconds < 60 (scheduler.py)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs("orthanc", "storescu"),
]

def spooled_files(folder: Path) -> list[Path]:
    return [p for p in (folder / "spool" / "instances").rglob("*") if p.is_file()]


def test_the_spool_keeps_a_slide_until_every_destination_with_commitment_confirmed_it(
    tmp_path, make_node, slide, monkeypatch
):
    archive_port = free_port()
    (tmp_path / "storescp").mkdir()
    storescp = subprocess.Popen(
        ["storescp", "+xa", "-od", str(tmp_path / "storescp"), str(archive_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port())
    node = make_node(orthanc.dicom_port, extra_toml=f"""
[[destinations]]
name = "archive"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {archive_port}
storage_commitment = true
""")
    orthanc.extra = {"DicomModalities": {"glionode": ["GLIONODE", "127.0.0.1", node.port]}}
    monkeypatch.setenv("GLIO_DESTINATIONS_0_STORAGE_COMMITMENT", "true")  # "pacs" = Orthanc
    monkeypatch.setenv("GLIO_STORAGE_RETENTION_SECONDS", "0")
    orthanc.start()
    try:
        node.start()
        node.send(slide)
        assert spooled_files(node.folder)

        def committed_by(name: str):
            return [e for e in node.events("commitment_confirmed") if e.details["destination"] == name]

        [confirmed] = wait_for(lambda: committed_by("pacs"), 180, "Orthanc's commitment", node)
        assert confirmed.calling_ae == "ORTHANC"
        [refused] = wait_for(lambda: node.events("commitment_failed"), 30, "storescp's refusal", node)
        assert refused.details["destination"] == "archive"
        assert refused.details["reason"] == "n_action_refused"
        assert "not accepted" in refused.details["status"]
        [requested_pacs] = [
            e for e in node.events("commitment_requested") if e.details["destination"] == "pacs"
        ]
        assert requested_pacs.details["transaction_uid"] == confirmed.details["transaction_uid"]
        states = {(d.destination, d.state) for d in node.deliveries()}
        assert states == {("pacs", DeliveryState.COMMITTED), ("archive", DeliveryState.SENT)}

        # No audit row says "a purge ran and kept the job", so the witness is the node's own
        # heartbeat: written by the same scheduler, once it is a purge period plus a heartbeat
        # past this point, a purge has run since and had a heartbeat's time to finish.
        since = datetime.now(UTC) + timedelta(seconds=PURGE_SECONDS + HEARTBEAT_SECONDS)
        wait_for(lambda: (beat := node.heartbeat()) and beat >= since, 30, "a purge period to pass", node)
        assert node.events("purge") == []
        assert spooled_files(node.folder)
        assert "refused the Storage Commitment request" in node.log()
        assert slide.series_instance_uid not in node.log()
        assert node.stop() == 0

        # The operator turns commitment off for the archive: sent is enough there now.
        monkeypatch.setenv("GLIO_DESTINATIONS_1_STORAGE_COMMITMENT", "false")
        node.start()
        [purge] = wait_for(lambda: node.events("purge"), 30, "the purge", node)
        assert purge.id > confirmed.id
        assert spooled_files(node.folder) == []
        assert node.stop() == 0
    finally:
        orthanc.stop()
        storescp.terminate()
        storescp.wait(timeout=10)
