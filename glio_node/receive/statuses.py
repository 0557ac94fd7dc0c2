"""The C-STORE statuses the node answers, in one table (docs/conformance lists the same).

A refused instance is an :class:`InstanceRefused` carrying one :class:`Refusal`; the handler
turns it into the status below and an ``instance_refused`` audit row.  Anything not listed is
logged and audited and answered 0xC211 (the status pynetdicom also uses for a failing handler).
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
    UNPARSABLE = (0xC210, "cannot understand: the dataset could not be parsed")
    MISSING_UID = (0xC210, "cannot understand: a required UID is missing")
    INVALID_UID = (0xC210, "cannot understand: a UID is not digits and dots of at most 64")
    SOP_INSTANCE_MISMATCH = (0xC210, "cannot understand: SOPInstanceUID differs from the request")
    UNEXPECTED = (0xC211, "cannot understand: unexpected error in the receiver (see the log)")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def description(self) -> str:
        return self.value[1]


class InstanceRefused(GlioError):
    """An instance the node will not store; ``refusal`` says which status to answer."""

    def __init__(self, refusal: Refusal, detail: str, uids: Mapping[str, str] | None = None):
        super().__init__(f"{refusal.description} ({detail})")
        self.refusal = refusal
        self.detail = detail
        self.uids = dict(uids or {})  # the instance's UIDs known so far, for the audit row
