"""Series on their way to a job: which are quiet, which node queues one, and their files.

The receiver creates and touches series rows (:mod:`glio_node.store.instances`); the sweep
(:mod:`glio_node.worker.sweep`) asks :func:`quiet_series` which have stopped growing, then moves
each on with one guarded UPDATE: :func:`take_for_queue` (several nodes may sweep at once; the one
whose UPDATE changes the row queues the job) or :func:`mark_incomplete`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from glio_node.store.models import Instance, Series, SeriesState

SWEPT_STATES = (SeriesState.RECEIVING, SeriesState.INCOMPLETE)  # a quiet series in these is swept


@dataclass(frozen=True)
class QuietSeries:
    """A series that received nothing since before the sweep's cut-off (a snapshot of its row)."""

    id: int
    series_instance_uid: str
    last_received_at: datetime  # the guard of take_for_queue: a new instance since changes it
    state: SeriesState  # RECEIVING, or INCOMPLETE once it was found quiet but not whole


def quiet_series(session: Session, received_before: datetime) -> list[QuietSeries]:
    """Series still receiving (or waiting as incomplete) whose last instance arrived before
    ``received_before``, oldest row first."""
    rows = session.execute(
        select(Series.id, Series.series_instance_uid, Series.last_received_at, Series.state)
        .where(Series.state.in_(SWEPT_STATES))
        .where(Series.last_received_at <= received_before)
        .order_by(Series.id)
    ).all()
    return [QuietSeries(*row) for row in rows]


def take_for_queue(session: Session, series: QuietSeries) -> bool:
    """Mark ``series`` queued, in one statement; False when another node took it first or an
    instance arrived since it was found quiet (then it is swept again later)."""
    taken = session.execute(
        update(Series)
        .where(
            Series.id == series.id,
            Series.state.in_(SWEPT_STATES),
            Series.last_received_at == series.last_received_at,
        )
        .values(state=SeriesState.QUEUED)
        .execution_options(synchronize_session=False)
    ).rowcount
    return bool(taken)


def mark_incomplete(session: Session, series: QuietSeries) -> bool:
    """A receiving series found quiet but not whole: INCOMPLETE (it waits
    ``incomplete_wait_seconds``).  False when its state changed meanwhile."""
    changed = session.execute(
        update(Series)
        .where(Series.id == series.id, Series.state == SeriesState.RECEIVING)
        .values(state=SeriesState.INCOMPLETE)
        .execution_options(synchronize_session=False)
    ).rowcount
    return bool(changed)


def series_files(session: Session, series_instance_uid: str) -> list[str]:
    """The spooled files of a series, in the order they were received."""
    return list(
        session.scalars(
            select(Instance.path)
            .where(Instance.series_instance_uid == series_instance_uid)
            .order_by(Instance.id)
        )
    )
