"""A destination that answers a Storage Commitment request on the request's own association.

The standard lets the SCP send its N-EVENT-REPORT on the association that carried the N-ACTION
(PS3.4 J.3.3); Orthanc opens a new one (tests/integration/test_commitment_peers.py).  The peer
here is a pynetdicom AE, a real DICOM implementation, that stores what the node sends and reports
the commitment before it answers the N-ACTION.  The report must be applied like one that comes
to the receiver: it is from the destination's own AE title, though the node opened the
association.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from orthanc_peer import free_port
from pydicom import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, evt
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    VLWholeSlideMicroscopyImageStorage,
)
from test_commitment_peers import SPEC, Setup

from glio_node.config import Destination
from glio_node.store.models import DeliveryState
from glio_node.synthetic.slide import SyntheticSlide, write_synthetic_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    return write_synthetic_slide(SPEC, tmp_path_factory.mktemp("same-association-slide"))


class ReportingPeer:
    """Stores every C-STORE; answers an N-ACTION by first sending the N-EVENT-REPORT (all
    referenced objects committed) on the same association."""

    def __init__(self) -> None:
        self.port = free_port()
        self.stored: set[str] = set()
        ae = AE(ae_title="PEERPACS")
        ae.add_supported_context(VLWholeSlideMicroscopyImageStorage, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)],
        )

    def _store(self, event) -> int:
        self.stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event):
        asked = event.action_information
        report = Dataset()
        report.TransactionUID = asked.TransactionUID
        report.ReferencedSOPSequence = [
            item for item in asked.ReferencedSOPSequence
            if str(item.ReferencedSOPInstanceUID) in self.stored
        ]
        event.assoc.send_n_event_report(
            report, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
        )
        return 0x0000, None

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def peer() -> Iterator[ReportingPeer]:
    running = ReportingPeer()
    yield running
    running.stop()


def test_a_report_on_the_requests_own_association_commits_the_results(tmp_path, slide, peer):
    pacs = Destination("pacs", "PEERPACS", "127.0.0.1", peer.port, storage_commitment=True)
    setup = Setup(tmp_path, slide, [pacs])
    try:
        setup.scheduler.deliver()
        assert {d.state for d in setup.deliveries()} == {DeliveryState.SENT}
        assert len(peer.stored) == len(slide.files)

        setup.scheduler.request_commitments()
        [confirmed] = setup.events("commitment_confirmed")
        assert confirmed.calling_ae == "PEERPACS"  # the destination, not the node's own AE title
        assert confirmed.details["committed"] == len(slide.files)
        assert {d.state for d in setup.deliveries()} == {DeliveryState.COMMITTED}
        setup.scheduler.purge()
        assert setup.purged()
    finally:
        setup.close()
