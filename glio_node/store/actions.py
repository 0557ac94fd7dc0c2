"""What an operator may do from the status page: retry a failed job, re-send a job's results,
pause and resume intake.

Each action changes the store and writes its audit row (who: the authenticated user and the
client address) in the caller's transaction; the node then acts on what the store says (the
dispatcher claims the waiting job, the deliverer sends the pending deliveries, the receiver
answers 0xA700 while intake is paused).  An action that does not apply raises
:class:`ActionRefused` with a sentence the page shows as it is.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from glio_node.errors import GlioError
from glio_node.store import audit
from glio_node.store.audit import Event
from glio_node.store.db import dialect_insert
from glio_node.store.models import (
    Control,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Series,
)

INTAKE_PAUSED = "intake_paused"  # Control.name; value "true" / "false"


class ActionRefused(GlioError):
    """The action does not apply to this job (or this view); the message says why."""


def intake_paused(session: Session) -> bool:
    """Whether an operator paused intake (the receiver answers C-STORE with 0xA700)."""
    value = session.scalar(select(Control.value).where(Control.name == INTAKE_PAUSED))
    return value == "true"


def set_intake_paused(
    session: Session, paused: bool, now: datetime, *, by: str, address: str | None
) -> None:
    """Pause (True) or resume (False) intake on every node of this database; audited."""
    insert = dialect_insert(session)
    value = "true" if paused else "false"
    session.execute(
        insert(Control)
        .values(name=INTAKE_PAUSED, value=value, changed_at=now)
        .on_conflict_do_update(index_elements=[Control.name], set_={"value": value, "changed_at": now})
    )
    audit.record(
        session,
        Event.INTAKE_PAUSED if paused else Event.INTAKE_RESUMED,
        at=now,
        address=address,
        details={"by": by},
    )


def retry_job(session: Session, job_id: int, now: datetime, *, by: str, address: str | None) -> None:
    """Queue a failed job again with a fresh set of attempts; audit ``job_retry_requested``."""
    row = _job(session, job_id)
    if JobState(row.state) != JobState.FAILED:
        raise ActionRefused(f"job {job_id} is {JobState(row.state).value}: only a failed job can be retried")
    if row.purged_at is not None:
        raise ActionRefused(f"job {job_id}'s slide was removed from the spool: ask the PACS to send it again")
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.FAILED)
        .values(
            state=JobState.WAITING, attempts=0, not_before=None, finished_at=None,
            lease_owner=None, lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if not changed:  # another operator (or a double click) retried it in between
        raise ActionRefused(f"job {job_id} was retried already")
    audit.record(
        session,
        Event.JOB_RETRY_REQUESTED,
        at=now,
        address=address,
        job_id=job_id,
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        details={"by": by, "previous_error": (row.last_error or "")[:500]},
    )


def resend_job(session: Session, job_id: int, now: datetime, *, by: str, address: str | None) -> int:
    """Send every result of a done job again to every destination; returns how many objects.

    Every delivery of the job becomes ``pending`` with its attempts reset, due now; audit
    ``resend_requested``.  Refused while the job is not done, or once its results were purged.
    """
    row = _job(session, job_id)
    if JobState(row.state) != JobState.DONE:
        raise ActionRefused(f"job {job_id} is {JobState(row.state).value}: only a finished job's results can be re-sent")
    if row.purged_at is not None:
        raise ActionRefused(
            f"job {job_id}'s results were removed from the spool after delivery: "
            "retrieve them from the PACS, or ask the PACS to send the slide again"
        )
    count = session.execute(
        update(Delivery)
        .where(Delivery.job_id == job_id)
        .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=now, delivered_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not count:
        raise ActionRefused(f"job {job_id} has no results to send (no destination was configured when it finished)")
    audit.record(
        session,
        Event.RESEND_REQUESTED,
        at=now,
        address=address,
        job_id=job_id,
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        details={"by": by, "objects": count},
    )
    return count


def _job(session: Session, job_id: int) -> Row[Any]:
    """The job's state, last error, purge time and UIDs, for an action to check and audit."""
    row = session.execute(
        select(Job.state, Job.last_error, Job.purged_at, Series.study_instance_uid,
               Series.series_instance_uid)
        .join(Series, Series.id == Job.series_id)
        .where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        raise ActionRefused(f"job {job_id} does not exist")
    return row
