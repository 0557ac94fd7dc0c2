"""What every step of the node's background work shares, built once by the scheduler."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import Destination, Settings
from glio_node.store.queue import RetryPolicy

Sessions = sessionmaker[Session]


class SpoolFolders(Protocol):
    """The two things the worker asks of the spool (:class:`glio_node.receive.spool.Spool`)."""

    def results_dir(self, study_instance_uid: str, series_instance_uid: str) -> Path:
        """Where a series' job writes its results (not created)."""
        ...

    def purge_series(self, study_instance_uid: str, series_instance_uid: str) -> int:
        """Delete a series' instances and results; the number of files deleted."""
        ...


@dataclass(frozen=True)
class WorkContext:
    """The settings, the store, this node's name on the queue and its clock.

    ``owner``: this process on the queue (``host:pid:random``), the lease owner of its jobs and
    deliveries.  ``clock``: passed in so tests move time on exactly.  ``stopping``: set by
    ``NodeScheduler.stop``; every step checks it before it takes new work.
    """

    settings: Settings
    sessions: Sessions
    owner: str
    clock: Callable[[], datetime]
    stopping: threading.Event = field(default_factory=threading.Event)

    def now(self) -> datetime:
        return self.clock()

    @property
    def policy(self) -> RetryPolicy:
        """The capped backoff of jobs, deliveries and commitment requests alike."""
        w = self.settings.worker
        return RetryPolicy(w.backoff_base_seconds, w.backoff_max_seconds)

    @property
    def destinations(self) -> dict[str, Destination]:
        return {d.name: d for d in self.settings.destinations}

    def commitment_destinations(self) -> list[str]:
        """Names of the destinations whose deliveries count only once committed."""
        return [d.name for d in self.settings.destinations if d.storage_commitment]
