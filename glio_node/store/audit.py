"""The audit trail: one append-only row per step, in the same transaction as the step.

``record`` adds a row to the caller's session (the caller commits it together with the state
change it describes); ``export`` streams rows for ``glio-node audit export``.  Nothing in the
application updates or deletes ``audit_event`` rows.  No patient data goes in: UIDs, AE titles,
addresses, sizes, hashes, model versions and timings only.
"""

from __future__ import annotations

import csv
import enum
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from glio_node.store.models import AuditEvent

ExportFormat = Literal["csv", "json"]


class Event(enum.StrEnum):
    """What happened; the value is what the ``event`` column holds."""

    ASSOCIATION_ACCEPTED = "association_accepted"
    ASSOCIATION_REJECTED = "association_rejected"
    INSTANCE_RECEIVED = "instance_received"
    INSTANCE_DUPLICATE = "instance_duplicate"  # re-sent SOP instance, not stored again
    INSTANCE_REFUSED = "instance_refused"  # a failure status was returned; details say which
    SERIES_COMPLETE = "series_complete"
    SERIES_INCOMPLETE = "series_incomplete"  # quiet but frames missing; details say what, and whether it runs anyway
    JOB_QUEUED = "job_queued"
    JOB_STARTED = "job_started"
    JOB_RETRY = "job_retry"  # transient failure, waiting for its backoff
    JOB_FINISHED = "job_finished"
    JOB_FAILED = "job_failed"  # permanent, or attempts exhausted
    LEASE_EXPIRED = "lease_expired"
    NODE_GONE = "node_gone"  # a running job taken back at once: its node's process is gone; details say why
    DELIVERY_RECLAIMED = "delivery_reclaimed"  # a gone node's claimed delivery, sendable again at once
    JOB_RELEASED = "job_released"  # its node stopped before the job finished; waiting again
    OBJECTS_CREATED = "objects_created"
    DELIVERY_ATTEMPT = "delivery_attempt"
    PURGE = "purge"
    POLL_FOUND = "poll_found"  # a [[sources]] poll found series not seen before; details: counts
    POLL_FAILED = "poll_failed"  # a source could not be polled or read; once per distinct error
    SERIES_RETRIEVED = "series_retrieved"  # a series pulled by WADO-RS into the spool
    COMMITMENT_REQUESTED = "commitment_requested"  # N-ACTION sent to a destination
    COMMITMENT_CONFIRMED = "commitment_confirmed"  # N-EVENT-REPORT: every object committed
    COMMITMENT_FAILED = "commitment_failed"  # failed objects, refused N-ACTION, or no answer in time
    # Operator actions from the status page (details say who: the authenticated user, address)
    JOB_RETRY_REQUESTED = "job_retry_requested"  # a failed job queued again by an operator
    RESEND_REQUESTED = "resend_requested"  # a job's results to be sent again to every destination
    INTAKE_PAUSED = "intake_paused"  # C-STORE answered 0xA700 until resumed
    INTAKE_RESUMED = "intake_resumed"


# The row's own columns that callers may set; anything else is an error, not silently dropped.
FIELDS = (
    "calling_ae",
    "address",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "job_id",
    "details",
)
COLUMNS = ("id", "at", "event", *FIELDS)


def record(
    session: Session, event: Event | str, *, at: datetime | None = None, **fields: Any
) -> AuditEvent:
    """Add one audit row to ``session`` (committed with the caller's transaction).

    ``fields`` are columns of :class:`AuditEvent` (``calling_ae``, ``address``, the three UIDs,
    ``job_id``, ``details`` – a JSON-able dict).  ``at`` defaults to now (UTC).  Raises
    ``TypeError`` for an unknown field and ``ValueError`` for an unknown event name.
    """
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise TypeError(
            f"audit field(s) {', '.join(unknown)} unknown; allowed: {', '.join(FIELDS)}"
        )
    row = AuditEvent(event=Event(event).value, at=at or datetime.now(UTC), **fields)
    session.add(row)
    return row


def export(
    session: Session, since: datetime | None = None, format: ExportFormat = "csv"
) -> Iterator[str]:
    """The audit rows at or after ``since`` (all when None), oldest first, as text chunks.

    ``csv``: a header line then one line per row (``details`` as compact JSON).  ``json``: one
    JSON array of objects.  Times are ISO 8601 UTC.  Rows are fetched in batches, so a long
    trail is never held in memory at once: ``sys.stdout.writelines(export(...))``.
    """
    if format not in ("csv", "json"):
        raise ValueError(f"audit export format {format!r}: use csv or json")
    if since is not None and since.tzinfo is None:
        raise ValueError(f"since = {since.isoformat()} has no time zone: give UTC, e.g. ...Z")
    stmt = select(AuditEvent).order_by(AuditEvent.id)
    if since is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    rows = session.scalars(stmt.execution_options(yield_per=500))
    if format == "csv":
        yield from _csv(rows)
    else:
        yield from _json(rows)


def as_dict(row: AuditEvent) -> dict[str, Any]:
    """One row as plain JSON-able values."""
    d = {c: getattr(row, c) for c in COLUMNS}
    d["at"] = row.at.isoformat().replace("+00:00", "Z")
    return d


def _csv(rows: Any) -> Iterator[str]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        d = as_dict(row)
        if d["details"] is not None:
            d["details"] = json.dumps(d["details"], separators=(",", ":"), sort_keys=True)
        writer.writerow(["" if d[c] is None else d[c] for c in COLUMNS])
        if buf.tell() > 65536:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def _json(rows: Any) -> Iterator[str]:
    yield "["
    sep = "\n"
    for row in rows:
        yield sep + json.dumps(as_dict(row), sort_keys=True)
        sep = ",\n"
    yield "\n]\n"
