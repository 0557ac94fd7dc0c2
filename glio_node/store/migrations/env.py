"""Alembic environment for glio-node: runs the packaged migrations on the URL it is handed.

Called through :func:`glio_node.store.db.upgrade` (``glio-node db upgrade``); the URL comes in
``config.attributes["database_url"]``, so no alembic.ini is needed.  SQLite gets batch mode so
that later migrations can alter tables.
"""

from __future__ import annotations

from alembic import context

from glio_node.store.db import make_engine
from glio_node.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: call glio_node.store.db.upgrade(database_url)")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run glio-node db upgrade")
run_migrations_online()
