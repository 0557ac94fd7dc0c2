"""Every status the receiver answers, in one place (docs/conformance.md lists the same).

C-STORE: a refused instance is an :class:`InstanceRefused` carrying one :class:`Refusal`; the
handler turns it into the status below and an ``instance_refused`` audit row whose ``reason`` is
the member's name in lower case.  Anything not listed is logged and audited and answered 0xC211
(the status pynetdicom also uses for a failing handler).  The DICOMweb poller refuses with the
same table (no status goes back over HTTP, but the audit row is the same).

N-EVENT-REPORT (Storage Commitment reports from destinations): :class:`ReportStatus`.

The 0xA900 members say "this is not a usable VL Whole Slide Microscopy image" (an attribute the
IOD requires is missing, unreadable or absurd); the 0xC2xx ones say "these bytes cannot be
read as sent" (encoding, pixel data framing).  All are permanent: re-sending the same file gets
the same answer.  Only the 0xA7xx ones are worth sending again later.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from glio_node.errors import GlioError

SUCCESS = 0x0000


class Refusal(enum.Enum):
    """Why an instance was refused: (DICOM status, what the audit row and log say)."""

    DISK_LOW = (0xA700, "out of resources: free disk on the spool under min_free_bytes")
    INTAKE_PAUSED = (0xA700, "out of resources: intake paused by an operator; send again later")
    WRITE_FAILED = (0xA700, "out of resources: the instance file could not be written")
    DATABASE_UNAVAILABLE = (0xA701, "out of resources: the database did not record the instance")
    SOP_CLASS_MISMATCH = (0xA900, "dataset does not match SOP class: SOPClassUID differs")
    ATTRIBUTE_MISSING = (
        0xA900, "dataset does not match SOP class: an attribute a VL WSI reader needs is missing"
    )
    VALUE_UNREADABLE = (
        0xA900, "dataset does not match SOP class: a value a VL WSI reader needs is unreadable"
    )
    VALUE_OUT_OF_RANGE = (
        0xA900, "dataset does not match SOP class: zero or absurd image size, frame count or spacing"
    )
    UNPARSABLE = (0xC210, "cannot understand: the dataset could not be parsed")
    MISSING_UID = (0xC210, "cannot understand: a required UID is missing")
    INVALID_UID = (0xC210, "cannot understand: a UID is not digits and dots of at most 64")
    SOP_INSTANCE_MISMATCH = (0xC210, "cannot understand: SOPInstanceUID differs from the request")
    UNEXPECTED = (0xC211, "cannot understand: unexpected error in the receiver (see the log)")
    TRANSFER_SYNTAX_MISMATCH = (
        0xC220, "cannot understand: the data is not encoded in the negotiated transfer syntax"
    )
    TRANSFER_SYNTAX_UNSUPPORTED = (
        0xC220, "cannot understand: the file is in a transfer syntax the node does not read"
    )
    TRUNCATED = (
        0xC221,
        "cannot understand: the data ends early (a length past its end, pixel data cut or not "
        "delimited)",
    )
    FRAMES_MISMATCH = (
        0xC222,
        "cannot understand: NumberOfFrames does not match the pixel data (fragments, offset "
        "table or length)",
    )

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def description(self) -> str:
        return self.value[1]

    @property
    def reason(self) -> str:
        """The ``reason`` of the ``instance_refused`` audit row."""
        return self.name.lower()


class ReportStatus(enum.IntEnum):
    """The answers to a Storage Commitment N-EVENT-REPORT (docs/conformance.md section 4)."""

    RECORDED = 0x0000  # the report was recorded
    PROCESSING_FAILURE = 0x0110  # the database could not record it; the destination may resend
    NO_SUCH_SOP_INSTANCE = 0x0112  # not the well-known instance 1.2.840.10008.1.20.1.1
    NO_SUCH_EVENT_TYPE = 0x0113  # Event Type ID other than 1 or 2
    INVALID_ARGUMENT = 0x0115  # unreadable, unknown transaction, or not from its destination
    NO_SUCH_SOP_CLASS = 0x0118  # not Storage Commitment Push Model


class InstanceRefused(GlioError):
    """An instance the node will not store; ``refusal`` says which status to answer."""

    def __init__(self, refusal: Refusal, detail: str, uids: Mapping[str, str] | None = None):
        super().__init__(f"{refusal.description} ({detail})")
        self.refusal = refusal
        self.detail = detail
        self.uids = dict(uids or {})  # the instance's UIDs known so far, for the audit row
