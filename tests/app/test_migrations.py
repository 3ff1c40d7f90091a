"""Schema only through migrations: up/down on SQLite and a throwaway Postgres; ORM == migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from app.db import migrate
from app.db.models import Base
from app.db.session import make_engine
from app.settings import Settings
from app.testing import postgres_available, throwaway_postgres

TABLES = {"api_keys", "datasets", "jobs", "models", "modules", "compositions"}


def _round_trip(url: str) -> None:
    engine = make_engine(url)
    try:
        migrate.upgrade(url)
        assert set(inspect(engine).get_table_names()) >= TABLES
        assert migrate.is_up_to_date(engine)
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert diff == [], f"ORM models and migrations disagree: {diff}"
        migrate.downgrade(url, "base")
        assert not TABLES & set(inspect(engine).get_table_names())
        assert migrate.current_revision(engine) is None
        migrate.upgrade(url)
        assert migrate.is_up_to_date(engine)
    finally:
        engine.dispose()


def test_sqlite_upgrade_downgrade(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    _round_trip(settings.database_url)
    engine = make_engine(settings)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


@pytest.mark.integration
def test_postgres_upgrade_downgrade() -> None:
    assert postgres_available(), "PostgreSQL is not running on 127.0.0.1:5432 (see README: Tests)"
    with throwaway_postgres() as url:
        _round_trip(url)
        engine = make_engine(url)
        cols = {c["name"]: c for c in inspect(engine).get_columns("models")}
        assert "JSONB" in str(cols["tags"]["type"]).upper()
        engine.dispose()
