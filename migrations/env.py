"""Alembic environment: the database URL comes from ``app.settings.Settings`` (MWT_DATABASE_URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from app.db.models import Base
from app.db.session import make_engine
from app.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    # ``app.db.migrate`` passes the URL explicitly; the alembic CLI falls back to the settings.
    return config.attributes.get("database_url") or get_settings().database_url


def _configure(connection: Connection | None = None, **kw: object) -> None:
    url = _url()
    context.configure(
        connection=connection,
        url=None if connection is not None else url,
        target_metadata=target_metadata,
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        **kw,
    )


def run_migrations_offline() -> None:
    _configure(literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _no_sqlite_cascades(connection: Connection) -> None:
    """SQLite batch migrations copy a table, drop it and rename the copy: with foreign keys
    on, the drop would cascade-delete the rows of every table that references it. The
    pragma is ignored inside a transaction, so it is set before the migration's opens."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # the caller's connection: its transaction is its own
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _no_sqlite_cascades(conn)
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
