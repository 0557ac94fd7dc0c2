"""One ``[[sources]]`` DICOMweb server, polled: what is new, when it is taken, how it is stored.

One poll, top to bottom (:meth:`SourcePoller.poll`):

1. QIDO-RS: every series of the source's modality (``Modality=SM``).  DICOMweb has no "created
   since" query (Orthanc's plugin cannot filter series by when they arrived), so the store keeps
   every series UID the source ever named (``pull_series``) and a poll compares against it;
2. a series not seen before is recorded ``seen`` (at the very first poll, ones whose StudyDate is
   older than ``first_poll_lookback_days`` are recorded ``skipped`` instead); audit ``poll_found``;
3. a ``seen`` series whose instance count is the same as at the previous poll has stopped
   growing: it is retrieved by WADO-RS, each instance streamed into a file in the spool's
   ``incoming/`` folder;
4. each file goes through the receiver's intake (:mod:`glio_node.receive.intake`): the same
   checks as a C-STORE (a refused one gets its ``instance_refused`` audit row and is not
   stored), then made durable in the spool; in one transaction, every instance not stored yet
   gets its row and ``instance_received`` audit exactly as a C-STORE would (calling AE = the
   source's name), the series becomes ``taken`` and ``series_retrieved`` is audited.  From
   there the node's sweep, job, analysis and delivery are the same as for C-STORE.

A ``taken`` series is never fetched again, even if it grows later.  A failure (server down,
credentials refused, a body cut short) leaves the series ``seen``; the next poll tries again.
It is logged and audited once per distinct error, not at every poll, and its end is logged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import VLWholeSlideMicroscopyImageStorage
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from glio_node.config import Source
from glio_node.errors import BadInput, GlioError
from glio_node.pull.dicomweb import (
    DicomwebSource,
    FoundSeries,
    SourceUnreachable,
    Stopped,
    server_of,
)
from glio_node.receive import intake
from glio_node.receive.spool import Spool, checked_uid
from glio_node.receive.statuses import InstanceRefused
from glio_node.redact import redacted_logger, without_uids
from glio_node.store import audit
from glio_node.store.actions import intake_paused
from glio_node.store.audit import Event
from glio_node.store.db import dialect_insert
from glio_node.store.instances import ReceivedInstance, instance_exists
from glio_node.store.models import PullSeries, PullSource, PullState

log = redacted_logger(__name__)

Sessions = sessionmaker[Session]


class SourcePoller:
    """Polls one source; :meth:`poll` is the scheduler's job (module docstring)."""

    def __init__(
        self,
        source: Source,
        sessions: Sessions,
        spool: Spool,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.source = source
        self.sessions = sessions
        self.spool = spool
        self.now = clock
        self.stopping = threading.Event()
        self.client = DicomwebSource(source, self.stopping)
        self.address = server_of(source.url).split("://", 1)[1][:64]
        self.peer = intake.Peer(source.name, self.address)

    def stop(self) -> None:
        """Abandon a retrieval in progress at its next chunk (the node is stopping)."""
        self.stopping.set()

    def poll(self) -> int:
        """One poll; returns the number of series taken.  Never raises for the source's faults."""
        if self.stopping.is_set():
            return 0
        with self.sessions.begin() as session:
            if intake_paused(session):  # the operator paused intake: pulling is intake too
                return 0
        now = self.now()
        try:
            found = self.client.search_series()
        except GlioError as exc:
            self._failed(now, str(exc))
            return 0
        to_take = self._note(found, now)
        taken = 0
        failed = False
        for item in to_take:
            if self.stopping.is_set():
                return taken
            if not self.spool.has_room():
                self._failed(
                    now,
                    f"source {self.source.name}: the spool has less free space than [storage] "
                    "min_free_bytes; retrieval waits until there is room",
                )
                return taken
            try:
                self._take(item)
            except Stopped:
                log.info("source %s: retrieval abandoned, the node is stopping", self.source.name)
                return taken
            except SourceUnreachable as exc:  # the server: the other series would fail too
                self._failed(self.now(), str(exc))
                return taken
            except (GlioError, OSError) as exc:  # this series (refused, or our disk): the next one
                self._failed(self.now(), _message(self.source.name, exc))
                failed = True
                continue
            taken += 1
        if not failed:
            self._succeeded()
        return taken

    # -- bookkeeping -----------------------------------------------------------------------

    def _note(self, found: list[FoundSeries], now: datetime) -> list[FoundSeries]:
        """Record new series, update counts; the ``seen`` series that held still (to take)."""
        name = self.source.name
        to_take: list[FoundSeries] = []
        new = skipped = invalid = 0
        with self.sessions.begin() as session:
            state = self._state_row(session)
            first_poll = state.last_success_at is None
            state.last_poll_at = now
            state.last_success_at = now
            known = {
                row.series_instance_uid: row
                for row in session.scalars(select(PullSeries).where(PullSeries.source == name))
            }
            cutoff = None
            if first_poll and self.source.first_poll_lookback_days >= 0:
                cutoff = (now - timedelta(days=self.source.first_poll_lookback_days)).strftime("%Y%m%d")
            for item in found:
                try:
                    checked_uid("StudyInstanceUID", item.study_instance_uid)
                    checked_uid("SeriesInstanceUID", item.series_instance_uid)
                except BadInput:
                    invalid += 1
                    continue
                row = known.get(item.series_instance_uid)
                if row is None:
                    skip = cutoff is not None and (item.study_date or "") < cutoff
                    row = PullSeries(
                        source=name,
                        series_instance_uid=item.series_instance_uid,
                        study_instance_uid=item.study_instance_uid,
                        state=PullState.SKIPPED if skip else PullState.SEEN,
                        instance_count=item.instance_count,
                        first_seen_at=now,
                    )
                    session.add(row)
                    known[item.series_instance_uid] = row
                    skipped += skip
                    new += not skip
                elif row.state == PullState.SEEN:
                    if item.instance_count == row.instance_count:
                        to_take.append(item)
                    else:
                        row.instance_count = item.instance_count
            if new or skipped:
                audit.record(
                    session,
                    Event.POLL_FOUND,
                    at=now,
                    calling_ae=name,
                    address=self.address,
                    details={
                        "source": name,
                        "new_series": new,
                        "skipped_series": skipped,
                        "series_listed": len(found),
                        **({"invalid_uids": invalid} if invalid else {}),
                        **({"first_poll_lookback_days": self.source.first_poll_lookback_days}
                           if skipped else {}),
                    },
                )
        if new or skipped:
            log.info(
                "source %s: %d new series%s", name, new,
                f", {skipped} older than first_poll_lookback_days skipped" if skipped else "",
            )
        if invalid:
            log.warning("source %s: %d series with invalid UIDs ignored", name, invalid)
        return to_take

    def _state_row(self, session: Session) -> PullSource:
        session.execute(
            dialect_insert(session)(PullSource)
            .values(name=self.source.name)
            .on_conflict_do_nothing(index_elements=[PullSource.name])
        )
        return session.scalars(select(PullSource).where(PullSource.name == self.source.name)).one()

    def _failed(self, now: datetime, error: str) -> None:
        """Log and audit ``error`` when it is new for this source (not at every poll)."""
        with self.sessions.begin() as session:
            state = self._state_row(session)
            state.last_poll_at = now
            repeated = state.last_error == error
            state.last_error = error
            if not repeated:
                audit.record(
                    session, Event.POLL_FAILED, at=now, calling_ae=self.source.name,
                    address=self.address, details={"source": self.source.name, "error": error[:500]},
                )
        if repeated:
            log.debug("%s (again)", error)
        else:
            log.warning("%s", error)

    def _succeeded(self) -> None:
        with self.sessions.begin() as session:
            state = self._state_row(session)
            was = state.last_error
            state.last_error = None
        if was:
            log.info("source %s: polling works again", self.source.name)

    # -- retrieval -------------------------------------------------------------------------

    def _take(self, item: FoundSeries) -> None:
        """Retrieve one series into ``incoming/``, then store and record it (module docstring)."""
        files: list[Path] = []
        current: list[BinaryIO] = []

        def open_part(headers: dict[str, str]) -> BinaryIO:
            kind = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
            if kind != "application/dicom":
                raise SourceUnreachable(
                    f"{self.client.where}: WADO-RS sent a part of type {kind!r}, not "
                    "application/dicom; trying again at the next poll"
                )
            for f in current:
                f.close()
            current.clear()
            path = self.spool.new_temp_file()
            files.append(path)
            current.append(path.open("wb"))
            return current[0]

        try:
            try:
                self.client.retrieve_series(
                    item.study_instance_uid, item.series_instance_uid, open_part
                )
            finally:
                for f in current:
                    f.close()
            self._store(item, files)
        finally:
            for path in files:
                path.unlink(missing_ok=True)  # stored files were moved away; the rest goes

    def _store(self, item: FoundSeries, files: list[Path]) -> None:
        name = self.source.name
        ignored: list[str] = []
        refused: list[InstanceRefused] = []
        checked = [
            r for r in (self._checked(item, p, ignored, refused) for p in files) if r is not None
        ]
        with self.sessions.begin() as session:
            already = {
                r.sop_instance_uid for r in checked if instance_exists(session, r.sop_instance_uid)
            }
        # Durable before the transaction that records them, as the receiver does (fsync outside
        # the database's write lock); a file whose row never comes is overwritten next time.
        fresh = []
        for r in checked:
            if r.sop_instance_uid in already:
                continue
            fresh.append(intake.spool_instance(self.spool, r))
        now = self.now()
        stored = 0
        with self.sessions.begin() as session:
            taken = session.execute(
                update(PullSeries)
                .where(
                    PullSeries.source == name,
                    PullSeries.series_instance_uid == item.series_instance_uid,
                    PullSeries.state == PullState.SEEN,
                )
                .values(state=PullState.TAKEN, taken_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not taken:
                log.info("source %s: series already taken (by another node?)", name)
                return
            for received in fresh:
                if instance_exists(session, received.sop_instance_uid):  # a C-STORE meanwhile
                    continue
                intake.record(session, received, now)
                stored += 1
            for refusal in refused:
                intake.audit_refusal(session, self.peer, refusal, {}, now)
            audit.record(
                session,
                Event.SERIES_RETRIEVED,
                at=now,
                calling_ae=name,
                address=self.address,
                study_instance_uid=item.study_instance_uid,
                series_instance_uid=item.series_instance_uid,
                details={
                    "source": name,
                    "instances": len(files),
                    "stored": stored,
                    "already_stored": len(checked) - stored,
                    "size_bytes": sum(r.size_bytes for r in fresh),
                    **({"ignored": ignored[:10]} if ignored else {}),
                },
            )
        from glio_node.redact import series_tag

        log.info(
            "source %s: series %s retrieved: %d instance(s) stored, %d already there%s",
            name, series_tag(item.series_instance_uid), stored, len(checked) - stored,
            f", {len(ignored)} ignored ({without_uids(ignored[0])})" if ignored else "",
        )

    def _checked(
        self, item: FoundSeries, path: Path, ignored: list[str], refused: list[InstanceRefused]
    ) -> ReceivedInstance | None:
        """The instance in ``path`` if the intake admits it (a VL WSI a reader can use, with
        valid UIDs) and it belongs to the series; else noted in ``ignored`` (the reason, no
        patient data), a refusal also in ``refused`` (for its audit row), and None."""
        try:
            admitted = intake.admit(path, self.peer, sop_class_uid=VLWholeSlideMicroscopyImageStorage)
        except InstanceRefused as exc:
            ignored.append(f"0x{exc.refusal.status:04X} {exc.refusal.reason}: {exc.detail}"[:200])
            refused.append(exc)
            return None
        if (admitted.series_instance_uid, admitted.study_instance_uid) != (
            item.series_instance_uid, item.study_instance_uid
        ):
            ignored.append("instance of another series than the one asked for")
            return None
        return admitted


def _message(source_name: str, exc: Exception) -> str:
    if isinstance(exc, OSError):
        return f"source {source_name}: writing a retrieved series to the spool failed: {exc.strerror or exc}"
    if isinstance(exc, InstanceRefused):  # intake.spool_instance: the disk failed
        return f"source {source_name}: writing a retrieved series to the spool failed: {exc.detail}"
    return str(exc)
