"""The C-STORE / C-ECHO SCP: pynetdicom AE and thin handlers with their dependencies bound.

One C-STORE, top to bottom (:func:`handle_store`; the steps are those of every instance,
in :mod:`glio_node.receive.intake`):

1. pynetdicom has streamed the dataset into a file in the spool's ``incoming/`` folder
   (``STORE_RECV_CHUNKED_DATASET``), so an instance is never held whole in memory;
2. :func:`~glio_node.receive.intake.admit`: its header is parsed (no pixel data), its UIDs
   checked against the request, and :func:`~glio_node.receive.intake.check_instance` asks
   whether a VL WSI reader could use it (header attributes, transfer syntax, fragment table):
   any problem is its own failure status (0xA900 / 0xC2xx), and the association goes on;
3. :func:`~glio_node.receive.intake.accept`: a SOP Instance UID already stored -> success, not
   stored again (audit ``instance_duplicate``); intake paused by an operator (status page) or
   free disk under ``min_free_bytes`` -> 0xA700, before anything is stored; else the file is
   fsync'ed and renamed into place, the directory fsync'ed (:meth:`Spool.store`), and the
   instance row, its series and the ``instance_received`` audit row are committed;
4. only then 0x0000 is returned: the sender may delete its copy.  A refusal is an
   ``instance_refused`` audit row naming the reason.

Associations from calling AE titles outside ``[node] allowed_calling_ae_titles`` (when the list
is not empty) are rejected by pynetdicom's ``require_calling_aet``; :func:`handle_rejected`
audits them.  Every status comes from :mod:`glio_node.receive.statuses`.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.uid import VLWholeSlideMicroscopyImageStorage
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.events import Event as DicomEvent
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import Settings
from glio_node.receive.intake import (
    PARSE_ERRORS,
    WSI_TRANSFER_SYNTAXES,
    Outcome,
    Peer,
    accept,
    admit,
    audit_refusal,
)
from glio_node.receive.spool import Spool
from glio_node.receive.statuses import SUCCESS, InstanceRefused, Refusal, ReportStatus
from glio_node.redact import redacted_logger
from glio_node.store import audit, commitments
from glio_node.store.audit import Event

log = redacted_logger(__name__)

STORAGE_SOP_CLASSES = (VLWholeSlideMicroscopyImageStorage,)
MAX_PDU_BYTES = 1_048_576  # the largest PDU we accept; bounds the memory of one read

Sessions = sessionmaker[Session]


def build_ae(settings: Settings, spool: Spool) -> AE:
    """The receiving AE: our AE title, the WSI storage and verification contexts, the
    calling-AE allow-list, and chunked receive into ``spool.incoming_dir``.

    Receiving in chunks is a pynetdicom process-wide setting; so is the folder its temporary
    files go to (the last AE built wins; a file elsewhere is copied into the spool).
    """
    _receive_chunked_into(spool.incoming_dir)
    ae = AE(ae_title=settings.node.ae_title)
    # Larger PDUs than pynetdicom's 16 KiB default: fewer PDUs to decode in Python per instance
    # (DCMTK senders then send 128 KiB ones), the receiver's CPU being its bottleneck.
    ae.maximum_pdu_size = MAX_PDU_BYTES
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(WSI_TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    # Storage Commitment reports (N-EVENT-REPORT) from destinations: the destination opens the
    # association and takes the SCP role of the SOP class, so accept either proposed role.
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    if settings.node.allowed_calling_ae_titles:
        ae.require_calling_aet = list(settings.node.allowed_calling_ae_titles)
    return ae


def event_handlers(
    spool: Spool, sessions: Sessions, max_attempts: int = 100,
    reporters: Mapping[str, str] | None = None,
) -> list[tuple[Any, ...]]:
    """The handlers with their dependencies bound, for ``AE.start_server(evt_handlers=...)``.

    ``max_attempts``: ``[worker] delivery_max_attempts``, the cap on re-sending an object a
    Storage Commitment report says failed.  ``reporters``: destination name -> its AE title;
    a commitment report is taken only from the AE title its request went to."""
    return [
        (evt.EVT_C_STORE, handle_store, [spool, sessions]),
        (evt.EVT_N_EVENT_REPORT, handle_commitment_report, [sessions, max_attempts, dict(reporters or {})]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_ACCEPTED, handle_accepted, [sessions]),
        (evt.EVT_REJECTED, handle_rejected, [sessions]),
    ]


def start_receiver(
    settings: Settings,
    spool: Spool,
    sessions: Sessions,
    address: tuple[str, int] | None = None,
) -> ThreadedAssociationServer:
    """Start the SCP in background threads on ``address`` (default ``[node] host, port``).

    Stop it with ``server.shutdown()``.
    """
    ae = build_ae(settings, spool)
    spool.clean_incoming()
    return ae.start_server(
        address or (settings.node.host, settings.node.port),
        block=False,
        evt_handlers=event_handlers(
            spool, sessions, settings.worker.delivery_max_attempts,
            {d.name: d.ae_title for d in settings.destinations if d.storage_commitment},
        ),
    )


# ------------------------------------------------------------------------------------------
# Handlers


def handle_echo(event: DicomEvent) -> int:
    """C-ECHO: the node is up."""
    return SUCCESS


def handle_accepted(event: DicomEvent, sessions: Sessions) -> None:
    """Audit an accepted association (who, from where, to which AE title)."""
    calling_ae, address = _peer(event)
    _audit_quietly(
        sessions,
        Event.ASSOCIATION_ACCEPTED,
        calling_ae=calling_ae,
        address=address,
        details={"called_ae": event.assoc.acceptor.ae_title},
    )
    log.info("association accepted from %s at %s", calling_ae, address)


def handle_rejected(event: DicomEvent, sessions: Sessions) -> None:
    """Audit a rejected association (pynetdicom has already sent the A-ASSOCIATE-RJ)."""
    calling_ae, address = _peer(event)
    allowed = [t.strip() for t in event.assoc.ae.require_calling_aet]
    reason = (
        "calling AE title not allowed"
        if allowed and calling_ae not in allowed
        else "rejected by the association policy (e.g. too many associations)"
    )
    _audit_quietly(
        sessions,
        Event.ASSOCIATION_REJECTED,
        calling_ae=calling_ae,
        address=address,
        details={"reason": reason, "called_ae": event.assoc.acceptor.ae_title},
    )
    log.warning("association rejected from %s at %s: %s", calling_ae, address, reason)


def handle_store(event: DicomEvent, spool: Spool, sessions: Sessions) -> int:
    """C-STORE: make the instance durable, record it, then answer (module docstring)."""
    calling_ae, address = _peer(event)
    affected = str(event.request.AffectedSOPInstanceUID or "")
    try:
        return _store(event, spool, sessions, calling_ae, address)
    except InstanceRefused as refused:
        refusal, detail, uids = refused.refusal, refused.detail, refused.uids
    except Exception as exc:  # the handler boundary: log and audit the unforeseen, then refuse
        log.exception("C-STORE from %s failed unexpectedly", calling_ae)
        refusal, detail, uids = Refusal.UNEXPECTED, f"{type(exc).__name__}: {exc}", {}
    try:
        with sessions.begin() as session:
            audit_refusal(
                session, Peer(calling_ae, address), InstanceRefused(refusal, detail, uids),
                {"sop_instance_uid": affected if len(affected) <= 64 else None},
            )
    except SQLAlchemyError:  # the DICOM answer must still go out
        log.exception("could not write audit event %s", Event.INSTANCE_REFUSED.value)
    log.warning("C-STORE from %s refused with 0x%04X: %s", calling_ae, refusal.status, detail)
    return refusal.status


def _store(
    event: DicomEvent, spool: Spool, sessions: Sessions, calling_ae: str, address: str
) -> int:
    peer = Peer(calling_ae, address)
    admitted = admit(
        Path(event.dataset_path),
        peer,
        sop_class_uid=str(event.request.AffectedSOPClassUID),
        sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
        transfer_syntax=str(event.context.transfer_syntax),
    )
    written = getattr(event.request, "_dataset_file", None)  # our _HashingFile, when streamed
    digest = written.digest() if isinstance(written, _HashingFile) else None
    if accept(sessions, spool, admitted, digest=digest) is Outcome.DUPLICATE:
        log.info("C-STORE from %s: instance already stored, not stored again", calling_ae)
    return SUCCESS


def handle_commitment_report(
    event: DicomEvent, sessions: Sessions, max_attempts: int, reporters: Mapping[str, str]
) -> tuple[int, None]:
    """N-EVENT-REPORT of the Storage Commitment Push Model: apply the destination's answer to
    the request with its Transaction UID (:func:`glio_node.store.commitments.record_report`).

    Answers (:class:`~glio_node.receive.statuses.ReportStatus`): 0x0000 once recorded; 0x0112
    (no such SOP instance) for another SOP instance than the
    well-known one, 0x0113 for an event type other than 1/2, 0x0115 for a report without a
    usable Transaction UID or naming a transaction the node never started; 0x0110 when the
    database cannot record it (the destination may send it again).
    """
    from pynetdicom.sop_class import StorageCommitmentPushModelInstance

    calling_ae, address = _peer(event)
    request = event.request
    if str(request.AffectedSOPClassUID) != StorageCommitmentPushModel:
        return ReportStatus.NO_SUCH_SOP_CLASS, None  # N-EVENT-REPORTs of other services
    if str(request.AffectedSOPInstanceUID) != StorageCommitmentPushModelInstance:
        return ReportStatus.NO_SUCH_SOP_INSTANCE, None
    if request.EventTypeID not in (1, 2):
        return ReportStatus.NO_SUCH_EVENT_TYPE, None
    try:
        info = event.event_information
        transaction_uid = str(info.TransactionUID)
        committed = [
            str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])
        ]
        failed = {
            str(item.ReferencedSOPInstanceUID): (
                int(item.FailureReason) if "FailureReason" in item else None
            )
            for item in info.get("FailedSOPSequence", [])
        }
    except PARSE_ERRORS as exc:
        log.warning("Storage Commitment report from %s unreadable: %s", calling_ae, exc)
        return ReportStatus.INVALID_ARGUMENT, None
    try:
        with sessions.begin() as session:
            outcome = commitments.record_report(
                session, transaction_uid, committed, failed, datetime.now(UTC),
                max_attempts=max_attempts, calling_ae=calling_ae, address=address,
                reporters=reporters,
            )
    except SQLAlchemyError:
        log.exception("Storage Commitment report from %s could not be recorded", calling_ae)
        return ReportStatus.PROCESSING_FAILURE, None
    if outcome is None:
        log.warning(
            "Storage Commitment report from %s for transaction %s, which this node did not "
            "request of that AE title: ignored", calling_ae, transaction_uid,
        )
        return ReportStatus.INVALID_ARGUMENT, None
    if failed:
        log.warning(
            "destination %s: Storage Commitment of job %d failed for %d object(s): %d will be "
            "sent again, %d given up", outcome.destination, outcome.job_id, len(failed),
            outcome.resend, outcome.given_up,
        )
    log.info(
        "destination %s committed %d object(s) of job %d",
        outcome.destination, outcome.committed, outcome.job_id,
    )
    return ReportStatus.RECORDED, None


# ------------------------------------------------------------------------------------------
# Helpers


def _peer(event: DicomEvent) -> tuple[str, str]:
    """The other side's AE title and address: the requestor of an association a peer opened,
    the acceptor of one the node opened (a commitment report on the N-ACTION's association)."""
    peer = event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor
    return str(peer.ae_title).strip(), f"{peer.address}:{peer.port}"


def _audit_quietly(sessions: Sessions, event: Event, **fields: Any) -> None:
    """Write one audit row in its own transaction; a database failure is logged, not raised
    (the DICOM answer must still go out)."""
    try:
        with sessions.begin() as session:
            audit.record(session, event, **fields)
    except SQLAlchemyError:
        log.exception("could not write audit event %s", event.value)


_chunk_dir: Path | None = None  # where pynetdicom's chunked receive writes (set by build_ae)


class _HashingFile:
    """pynetdicom's temporary file for a streamed C-STORE dataset, hashing the bytes as they
    are written, so that the spool need not read the file again to record its SHA-256.

    pynetdicom only writes to it sequentially (``write``, ``file.flush()``, ``close()``,
    ``name``); anything else is passed through to the file.
    """

    def __init__(self, file: Any):
        self._file = file
        self._sha256 = hashlib.sha256()
        self._size = 0
        self.name = file.name
        self.file = file.file

    def write(self, data: bytes) -> int:
        self._sha256.update(data)
        self._size += len(data)
        return self._file.write(data)

    def digest(self) -> tuple[str, int]:
        """SHA-256 (hex) and size of what was written so far."""
        return self._sha256.hexdigest(), self._size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _named_temporary_file(*args: Any, **kwargs: Any) -> Any:
    if _chunk_dir is not None and _chunk_dir.is_dir():
        kwargs.setdefault("dir", _chunk_dir)
    file = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 - pynetdicom closes it
    return _HashingFile(file) if "w" in str(kwargs.get("mode", "")) else file


def _receive_chunked_into(directory: Path) -> None:
    """Make pynetdicom stream C-STORE datasets into temporary files in ``directory``.

    pynetdicom 3 creates them with ``tempfile.NamedTemporaryFile()`` in the system temp folder,
    which may be a RAM disk or another filesystem; pointing its module-level name at ours keeps
    the data on disk and on the spool's filesystem, so storing it is a rename.  Should the folder
    be gone (a test's spool), the system temp folder is used again.  Handlers of other SCPs in
    the process still get ``event.dataset`` (pynetdicom reads it from the file).
    """
    global _chunk_dir
    _chunk_dir = Path(directory)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[attr-defined]
