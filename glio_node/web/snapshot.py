"""What the status page, the JSON API and /metrics show, read from the store in one place.

Pure reads (the design's "status page: reads the store only"): every function takes a session
and ``now`` and returns plain frozen records that the HTML template and the JSON API both render.
Nothing here returns patient data: series are named by UID (the page shortens them), and the
patient's name and ID, which the store never holds, are read from the spooled file's header
only when ``[status] show_patient_data`` is on (:func:`patient_of`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from glio_node.redact import without_uids
from glio_node.store import nodes
from glio_node.store.actions import intake_paused
from glio_node.store.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
)

RECENT_JOBS = 25
AUDIT_ROWS = 200


@dataclass(frozen=True)
class RunningJob:
    id: int
    series_instance_uid: str
    owner: str | None  # the node running it
    started_at: datetime | None
    tiles_done: int | None
    tiles_total: int | None
    percent: float | None  # None until the pipeline reported progress
    eta_seconds: float | None  # from the rate so far; None until some tiles are done
    attempt: int
    max_attempts: int


@dataclass(frozen=True)
class JobRow:
    id: int
    state: str
    series_instance_uid: str
    study_instance_uid: str
    created_at: datetime
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    bundle: str | None  # "name version"
    stage_seconds: dict[str, float]
    reason: str | None  # why it failed (or is being retried), in plain words
    deliveries: dict[str, int]  # delivery state -> count
    purged: bool
    patient: dict[str, str] | None = None  # only with show_patient_data
    qc_verdict: str | None = None  # slide QC: "pass", "warn" or "fail"; None: not analysed or QC off
    qc_reasons: tuple[str, ...] = ()  # e.g. "Pen mark 0.12 mm²", one per coded reason


@dataclass(frozen=True)
class DeliveryProblem:
    job_id: int
    destination: str
    state: str  # pending or failed
    objects: int
    attempts: int  # the most attempts among them
    last_status: str | None
    next_attempt_at: datetime | None


@dataclass(frozen=True)
class NodeStatus:
    owner: str
    hostname: str
    version: str
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float
    alive: bool  # heartbeat within nodes.SILENT_AFTER_SECONDS and not stopped
    device: str | None
    bundle: str | None
    stopped_at: datetime | None


@dataclass(frozen=True)
class Overview:
    """Everything the page shows except node-local health (see web.health)."""

    now: datetime
    intake_paused: bool
    series_receiving: int
    waiting: int
    running: list[RunningJob]
    jobs: list[JobRow]
    job_states: dict[str, int]
    delivery_problems: list[DeliveryProblem]
    throughput: list[tuple[datetime, int, int]]  # hour start, done, failed (last 24 h)
    nodes: list[NodeStatus] = field(default_factory=list)


def overview(session: Session, now: datetime, *, jobs: int = RECENT_JOBS) -> Overview:
    return Overview(
        now=now,
        intake_paused=intake_paused(session),
        series_receiving=session.scalar(
            select(func.count()).select_from(Series).where(
                Series.state.in_([SeriesState.RECEIVING, SeriesState.INCOMPLETE])
            )
        ) or 0,
        waiting=job_states(session).get(JobState.WAITING.value, 0),
        running=running_jobs(session, now),
        jobs=recent_jobs(session, jobs),
        job_states=job_states(session),
        delivery_problems=delivery_problems(session),
        throughput=throughput(session, now),
        nodes=node_statuses(session, now),
    )


def job_states(session: Session) -> dict[str, int]:
    counts = {s.value: 0 for s in JobState}
    for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        counts[JobState(state).value] = n
    return counts


def running_jobs(session: Session, now: datetime) -> list[RunningJob]:
    rows = session.execute(
        select(Job, Series.series_instance_uid)
        .join(Series, Series.id == Job.series_id)
        .where(Job.state == JobState.RUNNING)
        .order_by(Job.id)
    ).all()
    out = []
    for job, series_uid in rows:
        percent = eta = None
        if job.tiles_total:
            done = job.tiles_done or 0
            percent = 100.0 * done / job.tiles_total
            if done and job.started_at is not None:
                elapsed = ((job.progress_at or now) - job.started_at).total_seconds()
                eta = max(elapsed / done * (job.tiles_total - done), 0.0)
        out.append(
            RunningJob(
                id=job.id, series_instance_uid=series_uid, owner=job.lease_owner,
                started_at=job.started_at, tiles_done=job.tiles_done, tiles_total=job.tiles_total,
                percent=percent, eta_seconds=eta, attempt=job.attempts, max_attempts=job.max_attempts,
            )
        )
    return out


def recent_jobs(session: Session, limit: int = RECENT_JOBS) -> list[JobRow]:
    rows = session.execute(
        select(Job, Series.series_instance_uid, Series.study_instance_uid)
        .join(Series, Series.id == Job.series_id)
        .order_by(Job.id.desc())
        .limit(limit)
    ).all()
    ids = [job.id for job, _, _ in rows]
    counts: dict[int, Counter[str]] = {i: Counter() for i in ids}
    if ids:
        for job_id, state, n in session.execute(
            select(Delivery.job_id, Delivery.state, func.count())
            .where(Delivery.job_id.in_(ids))
            .group_by(Delivery.job_id, Delivery.state)
        ):
            counts[job_id][DeliveryState(state).value] = n
    return [
        JobRow(
            id=job.id,
            state=_shown_state(job, counts[job.id]),
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            created_at=job.created_at,
            finished_at=job.finished_at,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            bundle=f"{job.bundle_name} {job.bundle_version}" if job.bundle_name else None,
            stage_seconds={k: round(float(v), 2) for k, v in (job.stage_seconds or {}).items()},
            reason=plain_reason(job),
            deliveries=dict(counts[job.id]),
            purged=job.purged_at is not None,
            qc_verdict=(job.qc or {}).get("verdict"),
            qc_reasons=qc_reasons(job.qc),
        )
        for job, series_uid, study_uid in rows
    ]


def qc_reasons(qc: dict[str, Any] | None) -> tuple[str, ...]:
    """The stored QC reasons in words: "Pen mark 0.12 mm²" (meaning and area of each code)."""
    return tuple(f"{r['meaning']} {float(r['area_mm2']):.2f} mm²" for r in (qc or {}).get("reasons", ()))


def _shown_state(job: Job, deliveries: Counter[str]) -> str:
    """The job's state as an operator thinks of it: a done job is "delivered" once every result
    reached every destination, "delivering" while some are pending, "delivery failed" when
    one was given up on."""
    state = JobState(job.state)
    if state == JobState.WAITING and job.attempts:
        return "retrying"
    if state != JobState.DONE or not deliveries:
        return state.value
    if deliveries.get(DeliveryState.FAILED.value):
        return "delivery failed"
    if deliveries.get(DeliveryState.PENDING.value):
        return "delivering"
    return "delivered"


_PATH = re.compile(r"(?<![\w.])/(?:[^\s/:]+/)+([^\s/:]+)")


def plain_reason(job: Job) -> str | None:
    """Why a job failed or waits for a retry, as a sentence an operator can act on.

    Spool paths in the error are cut to the file name, and UIDs (the file name is one) are
    hidden, as in log lines; the job row keeps the full text.
    """
    if not job.last_error:
        return None
    job = _ErrorView(job, without_uids(_PATH.sub(r"\1", job.last_error)))
    state = JobState(job.state)
    if state == JobState.FAILED:
        if job.attempts >= job.max_attempts and not _is_permanent_text(job.last_error):
            return (
                f"Gave up after {job.attempts} attempts; the last one failed with: "
                f"{job.last_error}"
            )
        return f"The slide could not be analysed: {job.last_error}"
    if state == JobState.WAITING:
        return f"Attempt {job.attempts} of {job.max_attempts} failed and will be retried: {job.last_error}"
    return None


class _ErrorView:
    """A job with its error text replaced (read-only; the ORM row is not touched)."""

    def __init__(self, job: Job, last_error: str):
        self.state, self.attempts, self.max_attempts = job.state, job.attempts, job.max_attempts
        self.last_error = last_error


def _is_permanent_text(error: str) -> bool:
    # BadInput / BundleError messages say what to do; the scheduler marks transient ones with
    # their exception type ("RuntimeError: ..."), see NodeScheduler.run_claimed.
    head = error.split(":", 1)[0]
    return not head.endswith(("Error", "Exception"))


def delivery_problems(session: Session) -> list[DeliveryProblem]:
    """Deliveries not (yet) sent, one line per job and destination."""
    rows = session.execute(
        select(
            Delivery.job_id, Delivery.destination, Delivery.state, func.count(),
            func.max(Delivery.attempts), func.max(Delivery.last_status),
            func.min(Delivery.next_attempt_at),
        )
        .where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]))
        .group_by(Delivery.job_id, Delivery.destination, Delivery.state)
        .order_by(Delivery.job_id.desc())
        .limit(100)
    ).all()
    return [
        DeliveryProblem(
            job_id=job_id, destination=dest, state=DeliveryState(state).value, objects=n,
            attempts=attempts or 0, last_status=status, next_attempt_at=next_at,
        )
        for job_id, dest, state, n, attempts, status, next_at in rows
    ]


def throughput(session: Session, now: datetime) -> list[tuple[datetime, int, int]]:
    """Jobs finished per hour over the last 24 h: (hour start, done, failed), oldest first."""
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = end - timedelta(hours=24)
    hours = [start + timedelta(hours=i) for i in range(24)]
    done = [0] * 24
    failed = [0] * 24
    for finished_at, state in session.execute(
        select(Job.finished_at, Job.state).where(
            Job.finished_at >= start, Job.state.in_([JobState.DONE, JobState.FAILED])
        )
    ):
        i = int((finished_at - start).total_seconds() // 3600)
        if 0 <= i < 24:
            (done if JobState(state) == JobState.DONE else failed)[i] += 1
    return list(zip(hours, done, failed, strict=True))


def node_statuses(session: Session, now: datetime) -> list[NodeStatus]:
    out = []
    for row in nodes.all_nodes(session):
        age = (now - row.heartbeat_at).total_seconds()
        out.append(
            NodeStatus(
                owner=row.owner, hostname=row.hostname, version=row.version,
                started_at=row.started_at, heartbeat_at=row.heartbeat_at,
                heartbeat_age_seconds=max(age, 0.0),
                alive=row.stopped_at is None and age <= nodes.SILENT_AFTER_SECONDS,
                device=row.device,
                bundle=f"{row.bundle_name} {row.bundle_version}" if row.bundle_name else None,
                stopped_at=row.stopped_at,
            )
        )
    return out


def audit_search(
    session: Session, *, study_instance_uid: str = "", accession_number: str = ""
) -> list[AuditEvent]:
    """Audit rows of one study, found by Study Instance UID or by Accession Number (newest first).

    The accession number is looked up among received series; the search itself is never logged.
    """
    studies: set[str] = set()
    if study_instance_uid.strip():
        studies.add(study_instance_uid.strip())
    if accession_number.strip():
        studies.update(
            session.scalars(
                select(Series.study_instance_uid).where(
                    Series.accession_number == accession_number.strip()
                )
            )
        )
    if not studies:
        return []
    series = set(
        session.scalars(select(Series.series_instance_uid).where(Series.study_instance_uid.in_(studies)))
    )
    condition = AuditEvent.study_instance_uid.in_(studies)
    if series:
        condition = or_(condition, AuditEvent.series_instance_uid.in_(series))
    return list(
        session.scalars(
            select(AuditEvent).where(condition).order_by(AuditEvent.id.desc()).limit(AUDIT_ROWS)
        )
    )


def patient_of(session: Session, series_instance_uid: str) -> dict[str, str] | None:
    """PatientName and PatientID from the series' first spooled file, for ``show_patient_data``.

    None when the slide was purged or the file cannot be read (the page then shows nothing).
    """
    import pydicom

    path = session.scalar(
        select(Instance.path)
        .where(Instance.series_instance_uid == series_instance_uid)
        .order_by(Instance.id)
        .limit(1)
    )
    if path is None:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
    except (OSError, ValueError, EOFError, pydicom.errors.InvalidDicomError):
        return None
    return {"name": str(ds.get("PatientName", "")), "id": str(ds.get("PatientID", ""))}


def received_totals(session: Session) -> tuple[int, int]:
    """(instances, bytes) received so far (duplicates not counted)."""
    count, size = session.execute(
        select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
    ).one()
    return int(count), int(size)


def stage_durations(session: Session) -> dict[str, list[float]]:
    """Every finished job's stage times, by stage (for the /metrics histograms)."""
    out: dict[str, list[float]] = {}
    for (stages,) in session.execute(
        select(Job.stage_seconds).where(Job.state == JobState.DONE, Job.stage_seconds.is_not(None))
    ):
        for name, seconds in (stages or {}).items():
            out.setdefault(name, []).append(float(seconds))
    return out


def delivery_outcomes(session: Session) -> dict[str, int]:
    counts = {s.value: 0 for s in DeliveryState}
    for state, n in session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)):
        counts[DeliveryState(state).value] = n
    return counts


def as_json(value: Any) -> Any:
    """Records to JSON-able values (times as ISO 8601 UTC with Z)."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return as_json(asdict(value))
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value
