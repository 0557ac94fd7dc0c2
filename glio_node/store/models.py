"""The tables of the node: received instances, series, jobs, deliveries and the audit trail.

SQLAlchemy 2 typed ORM.  Column names follow DICOM keywords (``series_instance_uid``).  Every
time is timezone-aware UTC (:class:`UtcDateTime`; SQLite keeps them as ISO text in UTC, so
comparisons stay correct).  Enumerated states are stored as their lowercase string values with a
CHECK constraint.  The schema is created by the Alembic migrations in ``store/migrations``, never
by ``create_all`` in the service.

``audit_event`` is deliberately unrelated to the other tables: no foreign keys, no cascades, so
deleting a job, series or instance can never delete or block its history.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)  # DICOM UI: at most 64 characters


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend; naive datetimes are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only makes an INTEGER PRIMARY KEY the auto-incrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving, or quiet but not yet judged complete
    INCOMPLETE = "incomplete"  # quiet, but its metadata says frames or levels are missing
    QUEUED = "queued"  # a job exists for it


class JobState(enum.StrEnum):
    WAITING = "waiting"  # ready to be claimed once not_before has passed
    RUNNING = "running"  # claimed; lease_owner holds it until lease_expires_at
    DONE = "done"  # results written (delivery is tracked per destination in `delivery`)
    FAILED = "failed"  # permanent failure or attempts exhausted; last_error says why


class DeliveryState(enum.StrEnum):
    PENDING = "pending"  # to be sent (again) at next_attempt_at
    SENT = "sent"  # the destination answered success
    COMMITTED = "committed"  # the destination confirmed storage commitment
    FAILED = "failed"  # given up after max attempts or a permanent refusal


class PullState(enum.StrEnum):
    SEEN = "seen"  # found by QIDO-RS; taken once its instance count holds still for one poll
    TAKEN = "taken"  # retrieved by WADO-RS into the spool; never fetched again
    SKIPPED = "skipped"  # already on the server at the first poll and older than the lookback


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JSON()}


class Series(Base):
    """One received series; created by the first instance that arrives for it."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime] = mapped_column(index=True)
    instance_count: Mapped[int] = mapped_column(default=0)
    state: Mapped[SeriesState] = mapped_column(
        _enum(SeriesState, "series_state"), default=SeriesState.RECEIVING, index=True
    )
    # From the first instance; for the status page's audit search.  Not a name or ID, but it
    # leads to a patient in the RIS: never logged, never in a URL.
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)

    job: Mapped[Job | None] = relationship(back_populates="series")


class Instance(Base):
    """One received SOP instance, durable in the spool at ``path``."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(
        UID, ForeignKey("series.series_instance_uid"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)  # absolute path of the file in the spool
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))  # of the stored file, hex
    received_at: Mapped[datetime]
    calling_ae: Mapped[str] = mapped_column(String(16))


class Job(Base):
    """The analysis of one series; at most one per series, however often it is re-sent."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    series_id: Mapped[int] = mapped_column(BigId, ForeignKey("series.id"), unique=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.WAITING)
    attempts: Mapped[int] = mapped_column(default=0)  # claims so far (a claim is an attempt)
    max_attempts: Mapped[int]
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    not_before: Mapped[datetime | None]  # not claimable before this (retry backoff)
    last_error: Mapped[str | None] = mapped_column(Text)
    bundle_name: Mapped[str | None] = mapped_column(String(128))
    bundle_version: Mapped[str | None] = mapped_column(String(64))
    bundle_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]  # last claim
    finished_at: Mapped[datetime | None]
    stage_seconds: Mapped[dict[str, Any] | None]
    purged_at: Mapped[datetime | None]  # slide and results removed from the spool (delivered)
    tiles_done: Mapped[int | None]  # progress of the running attempt (tiles inferred so far)
    tiles_total: Mapped[int | None]  # tiles the running attempt will infer (all networks)
    progress_at: Mapped[datetime | None]  # when tiles_done was last written (ETA, staleness)
    # Slide QC of the finished analysis (job.JobSummary.qc): verdict, coded reasons with areas.
    qc: Mapped[dict[str, Any] | None]

    series: Mapped[Series] = relationship(back_populates="job")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job")

    __table_args__ = (Index("ix_job_state_not_before", "state", "not_before"),)


class Delivery(Base):
    """One result object to one destination."""

    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("job.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))  # [[destinations]] name
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)  # the result file in the spool
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState, "delivery_state"), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    last_status: Mapped[str | None] = mapped_column(String(64))  # DIMSE status or HTTP code
    next_attempt_at: Mapped[datetime | None]  # a claim moves it a lease ahead
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # node owner of the claim
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    committed_at: Mapped[datetime | None]  # the destination confirmed storage commitment

    job: Mapped[Job] = relationship(back_populates="deliveries")

    __table_args__ = (
        UniqueConstraint("job_id", "destination", "sop_instance_uid"),
        Index("ix_delivery_state_next_attempt_at", "state", "next_attempt_at"),
    )


class CommitmentState(enum.StrEnum):
    REQUESTED = "requested"  # N-ACTION accepted; waiting for the N-EVENT-REPORT
    CONFIRMED = "confirmed"  # the report says every referenced object is committed
    FAILED = "failed"  # the report lists failed objects (they are sent again)
    REFUSED = "refused"  # the N-ACTION was refused or the destination was unreachable
    EXPIRED = "expired"  # no report within commitment_timeout_seconds; asked again


class StorageCommitment(Base):
    """One Storage Commitment request (N-ACTION) for the results of a job on one destination."""

    __tablename__ = "storage_commitment"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("job.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))  # [[destinations]] name
    attempt: Mapped[int]  # 1 for the first request of this job on this destination
    transaction_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[CommitmentState] = mapped_column(
        _enum(CommitmentState, "commitment_state"), index=True
    )
    sop_instance_uids: Mapped[list[str]] = mapped_column(JSON)  # referenced in the N-ACTION
    requested_at: Mapped[datetime]
    answered_at: Mapped[datetime | None]  # N-EVENT-REPORT received (or N-ACTION refused)
    retry_at: Mapped[datetime | None]  # refused / expired: do not ask again before this
    last_status: Mapped[str | None] = mapped_column(String(64))  # N-ACTION status or reason
    failures: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)  # Failed SOP Sequence

    __table_args__ = (UniqueConstraint("job_id", "destination", "attempt"),)


class AuditEvent(Base):
    """One row of the append-only audit trail (never updated or deleted by the application)."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    event: Mapped[str] = mapped_column(String(64), index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    address: Mapped[str | None] = mapped_column(String(64))  # peer "host:port"
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    job_id: Mapped[int | None] = mapped_column(BigInteger)  # no foreign key, on purpose
    details: Mapped[dict[str, Any] | None]


class PullSource(Base):
    """What the node remembers of one ``[[sources]]`` DICOMweb server between polls."""

    __tablename__ = "pull_source"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(16), unique=True)  # [[sources]] name
    last_poll_at: Mapped[datetime | None]  # last poll, whatever its outcome
    last_success_at: Mapped[datetime | None]  # last poll whose QIDO-RS query answered
    last_error: Mapped[str | None] = mapped_column(Text)  # why the polls fail now; None when fine


class PullSeries(Base):
    """A series a source's QIDO-RS answer named: seen, taken (retrieved) or skipped."""

    __tablename__ = "pull_series"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    source: Mapped[str] = mapped_column(String(16))  # [[sources]] name
    series_instance_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    state: Mapped[PullState] = mapped_column(_enum(PullState, "pull_state"))
    instance_count: Mapped[int | None]  # NumberOfSeriesRelatedInstances at the last poll
    first_seen_at: Mapped[datetime]
    taken_at: Mapped[datetime | None]

    __table_args__ = (UniqueConstraint("source", "series_instance_uid"),)


class NodeRow(Base):
    """One ``glio-node`` process that uses this database, and its heartbeat.

    ``owner`` is the scheduler's queue owner (``host:pid:random``), so a running job's
    ``lease_owner`` names the node row that runs it.  Rows of stopped nodes stay (the page shows
    them as silent); the status page treats a heartbeat older than a few intervals as gone.
    """

    __tablename__ = "node"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime] = mapped_column(index=True)
    device: Mapped[str | None] = mapped_column(String(64))  # "cpu", "gpu: ..." as chosen
    bundle_name: Mapped[str | None] = mapped_column(String(128))
    bundle_version: Mapped[str | None] = mapped_column(String(64))
    stopped_at: Mapped[datetime | None]  # a clean stop; None while running (or after a crash)
    # The process behind the row (see store/nodes.ProcessId): a node on the same host takes the
    # jobs of a gone process back at once.  None for rows written before revision 0006.
    pid: Mapped[int | None]
    process_key: Mapped[str | None] = mapped_column(String(128))  # boot id, PID namespace, start


class Control(Base):
    """Operator switches shared by every node on this database (e.g. ``intake_paused``)."""

    __tablename__ = "control"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
    changed_at: Mapped[datetime]
