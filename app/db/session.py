"""Engine and session factories (SQLite with WAL + busy timeout, or Postgres through psycopg 3)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()


def make_engine(settings: Settings | str, **kw: Any) -> Engine:
    """An engine for ``settings.database_url`` (or a URL), configured for concurrent API + worker use."""
    url = settings if isinstance(settings, str) else settings.database_url
    if url.startswith("sqlite"):
        if not isinstance(settings, str):
            settings.ensure_dirs()
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=kw.pop("pool_size", 20),
            max_overflow=kw.pop("max_overflow", 40),
            **kw,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=kw.pop("pool_size", 10),
        max_overflow=kw.pop("max_overflow", 20),
        **kw,
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)

