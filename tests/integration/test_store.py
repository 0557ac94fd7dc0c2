"""The SQL store on SQLite and on the real PostgreSQL: migrations, queue, leases, audit trail.

PostgreSQL tests run in a fresh database ``glio_test_<random>`` created for this module and
dropped after it; when nothing listens on 127.0.0.1:5432 they fail under CI and skip elsewhere.
``GLIO_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``)
names the server and a role allowed to create databases.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from glio_node.store import audit, nodes
from glio_node.store.deliveries import ResultObject, add_deliveries, claim_deliveries, release_claims_of
from glio_node.store.db import current_revision, head_revision, make_engine, make_sessions, upgrade
from glio_node.store.instances import ReceivedInstance, instance_exists, record_instance
from glio_node.store.models import AuditEvent, Base, Instance, Job, JobState, Series, SeriesState
from glio_node.store.queue import (
    BundleInfo,
    RetryPolicy,
    claim_job,
    enqueue_series,
    fail_job,
    finish_job,
    get_job,
    renew_lease,
    requeue_expired,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(backoff_base_seconds=10, backoff_max_seconds=15)
BUNDLE = BundleInfo("glio-demo", "1.0.0", "ab" * 32)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """An empty database, migrated to head."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'glio.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        _drop_all(url)
    upgrade(url)
    yield url


def _drop_all(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield make_sessions(engine)
    engine.dispose()


def receive(session: Session, series: str, sop: str, at: datetime = T0) -> None:
    record_instance(
        session,
        ReceivedInstance(
            sop_instance_uid=sop,
            series_instance_uid=series,
            study_instance_uid="1.2.3",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.6",
            transfer_syntax_uid="1.2.840.10008.1.2.4.50",
            path=f"/spool/{sop}.dcm",
            size_bytes=1000,
            sha256="0" * 64,
            calling_ae="ORTHANC",
            address="127.0.0.1:4242",
        ),
        at,
    )


def queued(sessions: sessionmaker[Session], series: str, max_attempts: int = 3) -> int:
    with sessions.begin() as s:
        receive(s, series, f"{series}.1")
        return enqueue_series(s, series, max_attempts=max_attempts, now=T0).job_id


def events(sessions: sessionmaker[Session], job_id: int | None = None) -> list[str]:
    with sessions.begin() as s:
        stmt = select(AuditEvent.event).order_by(AuditEvent.id)
        if job_id is not None:
            stmt = stmt.where(AuditEvent.job_id == job_id)
        return list(s.scalars(stmt))


# ------------------------------------------------------------------------------------------
# Schema


def test_migrations_apply_on_an_empty_database_and_match_the_models(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert current_revision(database_url) == head_revision() is not None
    upgrade(database_url)  # idempotent
    engine = make_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        insp = inspect(conn)
        assert insp.get_foreign_keys("audit_event") == []  # the trail outlives what it describes
        assert {"instance", "series", "job", "delivery", "audit_event"} <= set(insp.get_table_names())
    engine.dispose()


def test_sqlite_pragmas(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    engine.dispose()


def test_times_are_aware_utc_and_naive_times_are_refused(sessions):
    with sessions.begin() as s:
        receive(s, "1.2.3.4", "1.2.3.4.1", at=datetime(2026, 1, 1, 13, 0, tzinfo=timedelta_tz(1)))
    with sessions.begin() as s:
        row = s.scalars(select(Instance)).one()
        assert row.received_at == T0 and row.received_at.tzinfo is not None
    from sqlalchemy.exc import StatementError

    with pytest.raises(StatementError, match="naive datetime"):
        with sessions.begin() as s:
            receive(s, "1.2.3.5", "1.2.3.5.1", at=datetime(2026, 1, 1))


def timedelta_tz(hours: int):
    from datetime import timezone

    return timezone(timedelta(hours=hours))


# ------------------------------------------------------------------------------------------
# Instances and series


def test_instances_create_and_touch_their_series(sessions):
    with sessions.begin() as s:
        receive(s, "1.2.3.4", "1.2.3.4.1", T0)
        receive(s, "1.2.3.4", "1.2.3.4.2", T0 + timedelta(seconds=5))
    with sessions.begin() as s:
        series = s.scalars(select(Series)).one()
        assert series.instance_count == 2
        assert series.first_received_at == T0
        assert series.last_received_at == T0 + timedelta(seconds=5)
        assert series.state == SeriesState.RECEIVING
        assert instance_exists(s, "1.2.3.4.2") and not instance_exists(s, "1.2.3.4.3")
    assert events(sessions) == ["instance_received", "instance_received"]


def test_a_sop_instance_is_stored_once(sessions):
    from sqlalchemy.exc import IntegrityError

    with sessions.begin() as s:
        receive(s, "1.2.3.4", "1.2.3.4.1")
    with pytest.raises(IntegrityError):
        with sessions.begin() as s:
            receive(s, "1.2.3.4", "1.2.3.4.1")
    with sessions.begin() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
        assert s.scalars(select(Series.instance_count)).one() == 1  # rolled back with it


# ------------------------------------------------------------------------------------------
# Queue


def test_one_job_per_series_however_often_enqueued(sessions):
    job_id = queued(sessions, "1.2.3.4")
    for _ in range(4):
        with sessions.begin() as s:
            again = enqueue_series(s, "1.2.3.4", max_attempts=3, now=T0)
            assert again.job_id == job_id and not again.created
    with sessions.begin() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        assert s.scalars(select(Series.state)).one() == SeriesState.QUEUED
    assert events(sessions).count("job_queued") == 1


def test_enqueue_needs_a_received_series(sessions):
    with pytest.raises(LookupError, match="series 9.9 was never received"):
        with sessions.begin() as s:
            enqueue_series(s, "9.9", max_attempts=3, now=T0)


def test_claim_renew_finish(sessions):
    job_id = queued(sessions, "1.2.3.4")
    with sessions.begin() as s:
        job = claim_job(s, "node-a", lease_seconds=60, now=T0)
    assert job is not None and job.id == job_id
    assert job.state == JobState.RUNNING and job.attempts == 1 and job.lease_owner == "node-a"
    assert job.lease_expires_at == T0 + timedelta(seconds=60)
    assert job.series_instance_uid == "1.2.3.4" and job.study_instance_uid == "1.2.3"
    with sessions.begin() as s:
        assert claim_job(s, "node-b", 60, T0) is None  # nothing else waiting
        assert renew_lease(s, job_id, "node-a", 60, T0 + timedelta(seconds=50))
        assert not renew_lease(s, job_id, "node-b", 60, T0 + timedelta(seconds=50))
        assert not finish_job(s, job_id, "node-b", T0)
    with sessions.begin() as s:
        assert get_job(s, job_id).lease_expires_at == T0 + timedelta(seconds=110)
        assert finish_job(s, job_id, "node-a", T0 + timedelta(seconds=70), bundle=BUNDLE,
                          stage_seconds={"open": 1.5, "predict": 20.0})
    with sessions.begin() as s:
        row = s.get(Job, job_id)
        assert row.state == JobState.DONE and row.lease_owner is None
        assert (row.bundle_name, row.bundle_version, row.bundle_sha256) == ("glio-demo", "1.0.0", "ab" * 32)
        assert row.stage_seconds == {"open": 1.5, "predict": 20.0}
        finished = s.scalars(select(AuditEvent).where(AuditEvent.event == "job_finished")).one()
        assert finished.details["bundle_version"] == "1.0.0"
        assert finished.details["stage_seconds"]["predict"] == 20.0
        assert not renew_lease(s, job_id, "node-a", 60, T0)  # done: no lease to renew
    assert events(sessions, job_id) == ["job_queued", "job_started", "job_finished"]


def test_transient_failures_back_off_capped_then_fail_after_max_attempts(sessions):
    job_id = queued(sessions, "1.2.3.4", max_attempts=3)
    now = T0
    delays = []
    for attempt in (1, 2, 3):
        with sessions.begin() as s:
            job = claim_job(s, "node-a", 60, now)
            assert job is not None and job.attempts == attempt
            state = fail_job(s, job_id, "node-a", "PACS down", transient=True, now=now, policy=POLICY)
        with sessions.begin() as s:
            row = s.get(Job, job_id)
            if attempt < 3:
                assert state == JobState.WAITING and row.state == JobState.WAITING
                delays.append(row.not_before - now)
                assert claim_job(s, "node-a", 60, row.not_before - timedelta(seconds=1)) is None
                now = row.not_before
            else:
                assert state == JobState.FAILED and row.state == JobState.FAILED
                assert row.last_error == "PACS down"
    assert delays == [timedelta(seconds=10), timedelta(seconds=15)]  # 10, then 20 capped at 15
    assert events(sessions, job_id) == [
        "job_queued", "job_started", "job_retry", "job_started", "job_retry", "job_started", "job_failed",
    ]
    with sessions.begin() as s:
        assert claim_job(s, "node-a", 60, now + timedelta(days=1)) is None


def test_permanent_failure_is_not_retried(sessions):
    job_id = queued(sessions, "1.2.3.4", max_attempts=5)
    with sessions.begin() as s:
        claim_job(s, "node-a", 60, T0)
        assert fail_job(s, job_id, "node-a", "not a WSI", transient=False, now=T0, policy=POLICY) == JobState.FAILED
        assert fail_job(s, job_id, "node-a", "again", transient=False, now=T0, policy=POLICY) is None
    with sessions.begin() as s:
        failed = s.scalars(select(AuditEvent).where(AuditEvent.event == "job_failed")).one()
        assert failed.details["error"] == "not a WSI" and failed.details["transient"] is False


def test_expired_leases_are_taken_back(sessions):
    job_id = queued(sessions, "1.2.3.4", max_attempts=2)
    with sessions.begin() as s:
        claim_job(s, "node-a", 60, T0)
    with sessions.begin() as s:
        assert requeue_expired(s, T0 + timedelta(seconds=30)) == []
    with sessions.begin() as s:
        [job] = requeue_expired(s, T0 + timedelta(seconds=61))
        assert job.id == job_id and job.state == JobState.WAITING
    with sessions.begin() as s:
        assert not finish_job(s, job_id, "node-a", T0 + timedelta(seconds=62))  # lost its lease
        job = claim_job(s, "node-b", 60, T0 + timedelta(seconds=62))
        assert job is not None and job.attempts == 2 and job.lease_owner == "node-b"
    with sessions.begin() as s:  # the last attempt's lease expires too: failed, not forever
        [job] = requeue_expired(s, T0 + timedelta(seconds=200))
        assert job.state == JobState.FAILED
    with sessions.begin() as s:
        assert claim_job(s, "node-c", 60, T0 + timedelta(seconds=300)) is None
        expired = s.scalars(select(AuditEvent).where(AuditEvent.event == "lease_expired")).all()
        assert [e.details["owner"] for e in expired] == ["node-a", "node-b"]
    assert events(sessions, job_id)[-2:] == ["lease_expired", "job_failed"]


def test_claims_come_oldest_first(sessions):
    ids = [queued(sessions, f"1.2.3.{i}") for i in range(3)]
    with sessions.begin() as s:
        got = [claim_job(s, "n", 60, T0).id for _ in range(3)]
    assert got == ids


@pytest.mark.parametrize("workers", [4])
def test_concurrent_claimers_never_get_the_same_job(database_url, workers):
    engine = make_engine(database_url, pool_size=workers + 1)
    sessions = make_sessions(engine)
    job_ids = {queued(sessions, f"1.2.3.{i}") for i in range(24)}
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(workers)

    def worker(name: str) -> None:
        start.wait()
        while True:
            with sessions.begin() as s:
                job = claim_job(s, name, 60, T0)
                if job is None:
                    return
                s.execute(text("SELECT 1"))  # hold the claim's transaction a moment
            with lock:
                claimed.append((name, job.id))

    threads = [threading.Thread(target=worker, args=(f"node-{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ids = [job_id for _, job_id in claimed]
    assert sorted(ids) == sorted(job_ids)  # every job once, none twice
    engine.dispose()


def test_postgres_claimers_skip_locked_rows_instead_of_waiting(postgres_url):
    _drop_all(postgres_url)
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessions(engine)
    first, second = queued(sessions, "1.2.3.1"), queued(sessions, "1.2.3.2")
    a, b = sessions(), sessions()
    try:
        a.begin()
        job_a = claim_job(a, "node-a", 60, T0)  # row locked until a commits
        b.begin()
        b.execute(text("SET LOCAL lock_timeout = '2s'"))  # without SKIP LOCKED: an error here
        job_b = claim_job(b, "node-b", 60, T0)
        assert (job_a.id, job_b.id) == (first, second)
        a.rollback()  # node-a dies before committing: its job is claimable again
        b.commit()
        with sessions.begin() as s:
            again = claim_job(s, "node-c", 60, T0)
            assert again is not None and again.id == first and again.attempts == 1
    finally:
        a.close()
        b.close()
        engine.dispose()


# ------------------------------------------------------------------------------------------
# Audit trail


def test_audit_export_csv_and_json(sessions):
    job_id = queued(sessions, "1.2.3.4")
    with sessions.begin() as s:
        claim_job(s, "node-a", 60, T0 + timedelta(minutes=1))
        audit.record(s, audit.Event.PURGE, at=T0 + timedelta(minutes=2), details={"bytes": 5})
    with sessions.begin() as s:
        text_csv = "".join(audit.export(s, since=T0 + timedelta(minutes=1), format="csv"))
        rows = list(csv.DictReader(io.StringIO(text_csv)))
        assert [r["event"] for r in rows] == ["job_started", "purge"]
        assert rows[0]["job_id"] == str(job_id) and rows[0]["at"] == "2026-01-01T12:01:00Z"
        assert json.loads(rows[1]["details"]) == {"bytes": 5}
        everything = json.loads("".join(audit.export(s, format="json")))
        assert [r["event"] for r in everything] == [
            "instance_received", "job_queued", "job_started", "purge",
        ]
        assert everything[0]["calling_ae"] == "ORTHANC"
        with pytest.raises(ValueError, match="use csv or json"):
            list(audit.export(s, format="xml"))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="has no time zone"):
            list(audit.export(s, since=datetime(2026, 1, 1)))


def test_audit_record_refuses_unknown_fields_and_events(sessions):
    with sessions.begin() as s:
        with pytest.raises(TypeError, match="patient_name unknown"):
            audit.record(s, audit.Event.PURGE, patient_name="X")
        with pytest.raises(ValueError, match="'job_exploded' is not a valid Event"):
            audit.record(s, "job_exploded")


# ------------------------------------------------------------------------------------------
# Crash recovery: a gone node's work is taken back without waiting for its lease


def register_node(s: Session, owner: str, process: nodes.ProcessId | None, at: datetime) -> None:
    nodes.register(s, nodes.NodeInfo(owner, "gpu-a", "0.1.0", "cpu", "glio-demo", "1.0.0", process), at)


def test_a_crashed_process_on_this_host_loses_its_job_and_deliveries_at_once(sessions):
    """The node's process was SIGKILLed (here: a real child process, killed): the next sweep
    takes its running job and its claimed delivery back, 5 s into a 300 s lease."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        process = nodes.process_id(child.pid)
        assert process is not None
        owner = f"gpu-a:{child.pid}:dead01"
        job_id = queued(sessions, "1.2.3.4")
        other = queued(sessions, "1.2.3.5")
        with sessions.begin() as s:
            register_node(s, owner, process, T0)
            claim_job(s, owner, 300, T0)
            add_deliveries(s, other, ["pacs"], [ResultObject("1.2.9.1", "1.2.840.10008.5.1.4.1.1.66.4", "/r/1.dcm")], T0)
            [claimed] = claim_deliveries(s, T0, 300, owner=owner)
        now = T0 + timedelta(seconds=5)  # the heartbeat is fresh too: only the process tells
        with sessions.begin() as s:
            assert nodes.gone_owners(s, now, silent_after_seconds=30) == {}  # still running
    finally:
        child.kill()
        child.wait()
    with sessions.begin() as s:
        gone = nodes.gone_owners(s, now, silent_after_seconds=30)
        assert gone == {owner: f"process {child.pid} on this host is gone"}
        assert nodes.gone_owners(s, now, silent_after_seconds=30, exclude=[owner]) == {}
        [job] = requeue_expired(s, now, gone)
        assert job.id == job_id and job.state == JobState.WAITING
        assert release_claims_of(s, gone, now) == 1
    with sessions.begin() as s:
        [taken] = s.scalars(select(AuditEvent).where(AuditEvent.event == "node_gone")).all()
        assert taken.job_id == job_id
        assert taken.details == {
            "owner": owner, "reason": f"process {child.pid} on this host is gone",
            "attempt": 1, "requeued": True,
        }
        [reclaimed] = s.scalars(select(AuditEvent).where(AuditEvent.event == "delivery_reclaimed")).all()
        assert reclaimed.details == {"destination": "pacs", "owner": owner, "reason": gone[owner]}
        assert reclaimed.sop_instance_uid == claimed.sop_instance_uid
        assert not s.scalars(select(AuditEvent).where(AuditEvent.event == "lease_expired")).all()
        again = claim_job(s, "gpu-b:2:bbbbbb", 300, now)
        assert again is not None and again.id == job_id and again.attempts == 2
        assert [d.id for d in claim_deliveries(s, now, 300, owner="gpu-b:2:bbbbbb")] == [claimed.id]
    with sessions.begin() as s:  # the dead owner's late writes are refused
        assert not renew_lease(s, job_id, owner, 300, now)
        assert requeue_expired(s, now, gone) == [] and release_claims_of(s, gone, now) == 0


def test_a_reused_pid_does_not_keep_a_dead_nodes_job(sessions):
    """The PID of the crashed node now belongs to another process (here: this one): the start
    time differs, so the job is taken back; the same PID with its own start time is alive."""
    me = nodes.this_process()
    assert me is not None
    job_id, _ = queued(sessions, "1.2.3.4"), queued(sessions, "1.2.3.5")
    earlier = dataclasses.replace(me, start_ticks=me.start_ticks - 1)
    with sessions.begin() as s:
        register_node(s, "gpu-a:reused:1", earlier, T0)
        register_node(s, "gpu-a:alive:2", me, T0)
        claim_job(s, "gpu-a:reused:1", 300, T0)
        claim_job(s, "gpu-a:alive:2", 300, T0)
        assert nodes.gone_owners(s, T0, silent_after_seconds=30) == {
            "gpu-a:reused:1": f"process {me.pid} on this host is gone"
        }
        [job] = requeue_expired(s, T0, nodes.gone_owners(s, T0, silent_after_seconds=30))
        assert job.id == job_id


def test_a_holder_without_a_node_row_or_on_another_host_waits_for_its_lease(sessions):
    """No node row (an older version, a test), or a process of another host: nothing here can
    say it is gone until its heartbeat is silent, or its lease passes."""
    me = nodes.this_process()
    assert me is not None
    elsewhere = dataclasses.replace(me, boot_id="another-machine", pid=2**22 + 7)  # no such PID here
    first, second = queued(sessions, "1.2.3.4"), queued(sessions, "1.2.3.5")
    with sessions.begin() as s:
        register_node(s, "gpu-b:7:bbbbbb", elsewhere, T0)
        claim_job(s, "no-row:1:aaaaaa", 60, T0)
        claim_job(s, "gpu-b:7:bbbbbb", 60, T0)
    with sessions.begin() as s:
        gone = nodes.gone_owners(s, T0 + timedelta(seconds=30), silent_after_seconds=30)
        assert gone == {} and requeue_expired(s, T0 + timedelta(seconds=30), gone) == []
    with sessions.begin() as s:
        gone = nodes.gone_owners(s, T0 + timedelta(seconds=31), silent_after_seconds=30)
        assert gone == {"gpu-b:7:bbbbbb": "no heartbeat for 31 s (node_silent_seconds = 30)"}
        assert [j.id for j in requeue_expired(s, T0 + timedelta(seconds=31), gone)] == [second]
    with sessions.begin() as s:
        assert [j.id for j in requeue_expired(s, T0 + timedelta(seconds=61))] == [first]
    assert events(sessions, first)[-1] == "lease_expired"
    assert events(sessions, second)[-1] == "node_gone"


def test_a_killed_process_not_yet_reaped_is_gone_and_a_foreign_key_cannot_be_judged():
    """A zombie (killed, its parent has not waited for it yet) still has its PID and start
    time, but runs nothing: gone.  A key from another boot or a malformed one: no verdict."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        process = nodes.process_id(child.pid)
        assert process is not None and nodes.process_gone(child.pid, process.key) is False
        child.kill()
        deadline = time.monotonic() + 10
        while nodes.process_gone(child.pid, process.key) is not True and time.monotonic() < deadline:
            time.sleep(0.05)
        assert nodes.process_gone(child.pid, process.key) is True
        assert nodes.process_id(child.pid) is not None  # still a zombie: /proc shows it
    finally:
        child.kill()
        child.wait()
    assert nodes.process_gone(child.pid, process.key) is True
    elsewhere = dataclasses.replace(process, boot_id="another-machine")
    assert nodes.process_gone(child.pid, elsewhere.key) is None
    assert nodes.process_gone(child.pid, "not a key") is None


def test_threads_of_one_sqlite_node_take_turns_on_one_lock_per_database(tmp_path):
    from glio_node.store.db import writer_turn

    one = make_engine(f"sqlite:///{tmp_path / 'one.db'}")
    other = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        turn = writer_turn(make_sessions(one))
        assert turn is writer_turn(make_sessions(one))  # every factory of the same database
        assert turn is not writer_turn(make_sessions(other))
        order: list[str] = []
        with turn:
            waiter = threading.Thread(target=lambda: (turn.acquire(), order.append("second"), turn.release()))
            waiter.start()
            time.sleep(0.05)
            order.append("first")
        waiter.join(5)
        assert order == ["first", "second"]
    finally:
        one.dispose()
        other.dispose()


def test_postgresql_writers_do_not_take_turns():
    from contextlib import nullcontext

    from glio_node.store.db import writer_turn

    engine = make_engine("postgresql://postgres@127.0.0.1:5432/postgres")  # not connected
    try:
        assert isinstance(writer_turn(make_sessions(engine)), nullcontext)
    finally:
        engine.dispose()
