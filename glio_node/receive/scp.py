"""The C-STORE / C-ECHO SCP: pynetdicom AE and thin handlers with their dependencies bound.

One C-STORE, top to bottom (:func:`handle_store`):

1. pynetdicom has streamed the dataset into a file in the spool's ``incoming/`` folder
   (``STORE_RECV_CHUNKED_DATASET``), so an instance is never held whole in memory;
2. its header is parsed (no pixel data) and its UIDs checked: unparsable or missing/invalid
   UIDs -> 0xC210, and the association goes on;
3. a SOP Instance UID already stored -> success, not stored again (audit ``instance_duplicate``);
4. intake paused by an operator (status page) -> 0xA700, before anything is stored;
   free disk under ``min_free_bytes`` -> 0xA700;
5. the file is fsync'ed and renamed into place, the directory fsync'ed (:meth:`Spool.store`);
6. the instance row, its series and the ``instance_received`` audit row are committed;
7. only then 0x0000 is returned: the sender may delete its copy.

Associations from calling AE titles outside ``[node] allowed_calling_ae_titles`` (when the list
is not empty) are rejected by pynetdicom's ``require_calling_aet``; :func:`handle_rejected`
audits them.  Every status comes from :mod:`glio_node.receive.statuses`.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    VLWholeSlideMicroscopyImageStorage,
)
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.events import Event as DicomEvent
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import Settings
from glio_node.errors import BadInput
from glio_node.receive.spool import Spool, checked_uid
from glio_node.receive.statuses import SUCCESS, InstanceRefused, Refusal
from glio_node.redact import redacted_logger
from glio_node.store import audit, commitments
from glio_node.store.actions import intake_paused
from glio_node.store.audit import Event
from glio_node.store.instances import ReceivedInstance, instance_exists, record_instance

log = redacted_logger(__name__)

# What scanners and PACS send whole-slide images in.  Deflate is accepted too (rare for WSI).
WSI_TRANSFER_SYNTAXES = (
    JPEGBaseline8Bit,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
)
STORAGE_SOP_CLASSES = (VLWholeSlideMicroscopyImageStorage,)
MAX_PDU_BYTES = 1_048_576  # the largest PDU we accept; bounds the memory of one read

# What pydicom raises on malformed bytes: a bad dataset is the sender's problem (0xC210), not a
# crash of the receiver.
_PARSE_ERRORS = (
    InvalidDicomError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    EOFError,
    OSError,
    NotImplementedError,
    struct.error,
    zlib.error,
)

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
        log.exception("C-STORE of %s from %s failed unexpectedly", affected, calling_ae)
        refusal, detail, uids = Refusal.UNEXPECTED, f"{type(exc).__name__}: {exc}", {}
    uids = {"sop_instance_uid": affected if len(affected) <= 64 else None, **uids}
    _audit_quietly(
        sessions,
        Event.INSTANCE_REFUSED,
        calling_ae=calling_ae,
        address=address,
        details={
            "status": f"0x{refusal.status:04X}",
            "reason": refusal.name.lower(),
            "detail": detail[:500],
        },
        **uids,
    )
    log.warning(
        "C-STORE of %s from %s refused with 0x%04X: %s",
        affected,
        calling_ae,
        refusal.status,
        detail,
    )
    return refusal.status


def _store(
    event: DicomEvent, spool: Spool, sessions: Sessions, calling_ae: str, address: str
) -> int:
    source = Path(event.dataset_path)
    header = _read_header(source)
    uids: dict[str, str] = {}
    for keyword, field in (
        ("SOPInstanceUID", "sop_instance_uid"),
        ("SeriesInstanceUID", "series_instance_uid"),
        ("StudyInstanceUID", "study_instance_uid"),
    ):
        uids[field] = _uid(header, keyword, uids)
    sop_class_uid = _uid(header, "SOPClassUID", uids)

    if uids["sop_instance_uid"] != str(event.request.AffectedSOPInstanceUID):
        raise InstanceRefused(
            Refusal.SOP_INSTANCE_MISMATCH,
            f"dataset {uids['sop_instance_uid']}, request {event.request.AffectedSOPInstanceUID}",
            uids,
        )
    if sop_class_uid != str(event.request.AffectedSOPClassUID):
        raise InstanceRefused(
            Refusal.SOP_CLASS_MISMATCH,
            f"dataset {sop_class_uid}, request {event.request.AffectedSOPClassUID}",
            uids,
        )

    try:
        with sessions.begin() as session:
            if instance_exists(session, uids["sop_instance_uid"]):
                audit.record(
                    session,
                    Event.INSTANCE_DUPLICATE,
                    calling_ae=calling_ae,
                    address=address,
                    **uids,
                )
                log.info("C-STORE of %s: already stored, not stored again", uids["sop_instance_uid"])
                return SUCCESS
            paused = intake_paused(session)
    except SQLAlchemyError as exc:
        raise InstanceRefused(Refusal.DATABASE_UNAVAILABLE, type(exc).__name__, uids) from exc

    if paused:
        # Status page "pause intake": the instance is refused before it is stored; the PACS keeps
        # its copy and sends it again later (0xA700 is a retryable "out of resources").
        raise InstanceRefused(Refusal.INTAKE_PAUSED, "an operator paused intake", uids)
    if not spool.has_room():
        raise InstanceRefused(
            Refusal.DISK_LOW,
            f"{spool.free_bytes()} bytes free, min_free_bytes {spool.min_free_bytes}",
            uids,
        )
    written = getattr(event.request, "_dataset_file", None)  # our _HashingFile, when streamed
    digest = written.digest() if isinstance(written, _HashingFile) else None
    try:
        stored = spool.store(
            source,
            uids["study_instance_uid"],
            uids["series_instance_uid"],
            uids["sop_instance_uid"],
            digest=digest,
        )
    except OSError as exc:
        raise InstanceRefused(Refusal.WRITE_FAILED, f"{exc.strerror or exc}", uids) from exc

    received = ReceivedInstance(
        sop_class_uid=sop_class_uid,
        transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
        path=str(stored.path),
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        calling_ae=calling_ae,
        address=address,
        accession_number=accession_number(header),
        **uids,
    )
    try:
        with sessions.begin() as session:
            record_instance(session, received, datetime.now(UTC))
    except IntegrityError:
        # A concurrent association stored the same instance first: it is durable either way.
        with sessions.begin() as session:
            audit.record(
                session, Event.INSTANCE_DUPLICATE, calling_ae=calling_ae, address=address, **uids
            )
        return SUCCESS
    except SQLAlchemyError as exc:
        stored.path.unlink(missing_ok=True)
        raise InstanceRefused(Refusal.DATABASE_UNAVAILABLE, type(exc).__name__, uids) from exc
    return SUCCESS


def handle_commitment_report(
    event: DicomEvent, sessions: Sessions, max_attempts: int, reporters: Mapping[str, str]
) -> tuple[int, None]:
    """N-EVENT-REPORT of the Storage Commitment Push Model: apply the destination's answer to
    the request with its Transaction UID (:func:`glio_node.store.commitments.record_report`).

    0x0000 once recorded; 0x0112 (no such SOP instance) for another SOP instance than the
    well-known one, 0x0113 for an event type other than 1/2, 0x0115 for a report without a
    usable Transaction UID or naming a transaction the node never started; 0x0110 when the
    database cannot record it (the destination may send it again).
    """
    from pynetdicom.sop_class import StorageCommitmentPushModelInstance

    calling_ae, address = _peer(event)
    request = event.request
    if str(request.AffectedSOPClassUID) != StorageCommitmentPushModel:
        return 0x0118, None  # no such SOP class: N-EVENT-REPORTs of other services
    if str(request.AffectedSOPInstanceUID) != StorageCommitmentPushModelInstance:
        return 0x0112, None
    if request.EventTypeID not in (1, 2):
        return 0x0113, None
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
    except (*_PARSE_ERRORS, AttributeError) as exc:
        log.warning("Storage Commitment report from %s unreadable: %s", calling_ae, exc)
        return 0x0115, None
    try:
        with sessions.begin() as session:
            outcome = commitments.record_report(
                session, transaction_uid, committed, failed, datetime.now(UTC),
                max_attempts=max_attempts, calling_ae=calling_ae, address=address,
                reporters=reporters,
            )
    except SQLAlchemyError:
        log.exception("Storage Commitment report from %s could not be recorded", calling_ae)
        return 0x0110, None
    if outcome is None:
        log.warning(
            "Storage Commitment report from %s for transaction %s, which this node did not "
            "request of that AE title: ignored", calling_ae, transaction_uid,
        )
        return 0x0115, None
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
    return 0x0000, None


# ------------------------------------------------------------------------------------------
# Helpers


def accession_number(header: pydicom.Dataset) -> str | None:
    """The Accession Number (SH, at most 16 characters) for the audit search, or None."""
    try:
        value = str(header.get("AccessionNumber", "") or "").strip()
    except _PARSE_ERRORS:  # a malformed optional element does not refuse the instance
        return None
    return value[:16] or None


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        # Values are decoded lazily: touch the ones we need while errors are still caught here.
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            ds.get(keyword)
        ds.file_meta.TransferSyntaxUID  # noqa: B018
    except _PARSE_ERRORS as exc:
        raise InstanceRefused(Refusal.UNPARSABLE, f"{type(exc).__name__}: {exc}") from exc
    return ds


def _uid(ds: pydicom.Dataset, keyword: str, known: dict[str, str]) -> str:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        raise InstanceRefused(Refusal.MISSING_UID, f"{keyword} is missing or empty", known)
    try:
        return checked_uid(keyword, value)
    except BadInput as exc:
        raise InstanceRefused(Refusal.INVALID_UID, str(exc), known) from exc


def _peer(event: DicomEvent) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), f"{requestor.address}:{requestor.port}"


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
