"""Storage Commitment Push Model SCU (PS3.4 Annex J): the N-ACTION that asks a destination to
take responsibility for objects the node has stored there.

The answer is not the N-ACTION's response (that only says the request was understood) but an
N-EVENT-REPORT the destination sends later, normally on a new association it opens to the
node's own AE (handled by :func:`glio_node.receive.scp.handle_commitment_report`).  A
destination may also answer on this association while it is open: ``on_report`` (the same
handler, bound) is installed for that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from glio_node.config import Destination

REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID, PS3.4 J.3.2.1
NOT_SUPPORTED = "Storage Commitment SOP class not accepted by the destination"


@dataclass(frozen=True)
class CommitmentSend:
    """What the destination said to the N-ACTION."""

    ok: bool  # accepted: now wait for the N-EVENT-REPORT
    status: str  # "0x0000", "no presentation context", "association rejected", ...


def action_information(transaction_uid: str, references: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION's Action Information: Transaction UID and the Referenced SOP Sequence of
    (SOP Class UID, SOP Instance UID) pairs."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class_uid, sop_instance_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def request_commitment(
    destination: Destination,
    calling_ae_title: str,
    transaction_uid: str,
    references: Sequence[tuple[str, str]],
    *,
    timeout_seconds: float = 30.0,
    on_report: Callable[..., Any] | None = None,
) -> CommitmentSend:
    """Send one N-ACTION (Request Storage Commitment) to ``destination``.

    Never raises for network trouble: an unreachable destination, a rejected association, a
    destination that does not accept the Storage Commitment SOP class (DCMTK ``storescp``) and
    a failure status all come back as ``ok=False`` with a status an operator can read.
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_seconds
    ae.connection_timeout = min(timeout_seconds, 10.0)
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers = [(evt.EVT_N_EVENT_REPORT, on_report)] if on_report is not None else []
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, evt_handlers=handlers
    )
    if not assoc.is_established:
        if assoc.rejected_contexts:  # pynetdicom aborts when no context was accepted
            return CommitmentSend(False, NOT_SUPPORTED)
        return CommitmentSend(
            False,
            "association rejected" if assoc.is_rejected
            else "no association (connection refused, aborted or timed out)",
        )
    try:
        if not any(
            cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.accepted_contexts
        ):
            return CommitmentSend(False, NOT_SUPPORTED)
        status, _reply = assoc.send_n_action(
            action_information(transaction_uid, references),
            REQUEST_STORAGE_COMMITMENT,
            StorageCommitmentPushModel,
            StorageCommitmentPushModelInstance,
        )
        if "Status" not in status:
            return CommitmentSend(False, "no answer to N-ACTION")
        code = int(status.Status)
        return CommitmentSend(code == 0x0000, f"0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
