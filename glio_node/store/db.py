"""Engine and sessions for the node's database, and the programmatic schema upgrade.

- SQLite (one node): WAL journal, ``synchronous=FULL`` (a committed row survives power loss,
  which is what lets the receiver answer success), foreign keys on, a busy timeout, and every
  transaction opened with ``BEGIN IMMEDIATE`` so that two writers queue on the busy timeout
  instead of failing with "database is locked" when a read turns into a write.
- PostgreSQL (several nodes sharing one queue): psycopg 3; ``postgresql://`` URLs are read as
  ``postgresql+psycopg://``.

Nothing is created at import time: the entry point calls :func:`make_engine` and
:func:`make_sessions` and passes the session factory down.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import AbstractContextManager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalise_url(database_url: str | URL) -> URL:
    """The URL SQLAlchemy should use: psycopg 3 for PostgreSQL."""
    url = make_url(database_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


def make_engine(database_url: str | URL, **kwargs: Any) -> Engine:
    """An engine for ``database_url`` with the pragmas / driver this module documents.

    A SQLite database's folder is created if missing.  ``kwargs`` go to ``create_engine``.
    """
    url = normalise_url(database_url)
    # Bound values (UIDs, accession numbers) stay out of error texts, which reach log lines.
    kwargs.setdefault("hide_parameters", True)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control away from the sqlite3 module (it would BEGIN DEFERRED lazily);
    # _sqlite_begin issues BEGIN IMMEDIATE instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


# One lock per SQLite engine (made on first use, gone with the engine), for :func:`writer_turn`.
_turns: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_turns_guard = threading.Lock()


def writer_turn(sessions: sessionmaker[Session]) -> AbstractContextManager[Any]:
    """Hold around ``sessions.begin()`` on a hot path where threads of this process write at
    once (the receiver's associations): on SQLite they then take turns on a lock, not on
    SQLite's busy handler.

    Every SQLite transaction here is ``BEGIN IMMEDIATE``, so only one runs at a time anyway;
    a thread that finds the database locked sleeps in the busy handler's growing steps (1, 2,
    5, 10 ... ms) and may wake long after the lock is free, while a waiter on this lock is
    woken as soon as it is released.  With four associations storing at once that waiting was
    about a quarter of the durable intake's time (docs/benchmarks-receive.md, 2026-12-07).
    Correctness still rests on SQLite's own locking: threads or processes that do not take
    the turn simply queue on the busy timeout as before.  For PostgreSQL (concurrent writers,
    group commit) this is a no-op.  Take it once per transaction: it is not re-entrant.
    """
    engine = sessions.kw.get("bind")
    if not isinstance(engine, Engine) or engine.dialect.name != "sqlite":
        return nullcontext()
    with _turns_guard:
        lock = _turns.get(engine)
        if lock is None:
            lock = _turns[engine] = threading.Lock()
    return lock


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    """The session factory the service passes to its parts (``with sessions.begin() as s:``)."""
    return sessionmaker(engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """The Alembic script folder shipped inside the package."""
    return Path(str(resources.files("glio_node.store") / "migrations"))


def alembic_config(database_url: str | URL) -> Any:
    """An Alembic ``Config`` for the packaged migrations and ``database_url`` (no .ini file)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # The URL goes through attributes, not the ini (ConfigParser would mangle '%' in passwords).
    cfg.attributes["database_url"] = normalise_url(database_url)
    return cfg


def upgrade(database_url: str | URL, revision: str = "head") -> None:
    """Bring the database schema to ``revision`` (default: the newest); idempotent.

    This is what ``glio-node db upgrade`` runs, as a deploy step before ``serve``.
    """
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def current_revision(database_url: str | URL) -> str | None:
    """The schema revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision shipped with this version of glio-node."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir())).get_current_head()


def dialect_insert(session: Session) -> Any:
    """The INSERT construct of the session's database (both have ON CONFLICT DO NOTHING)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"database {name!r}: use sqlite or postgresql")
    return insert
