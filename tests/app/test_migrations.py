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
from tests.support.services import postgres_available, throwaway_postgres

TABLES = {
    "api_keys", "datasets", "jobs", "models", "modules", "compositions", "composition_sources"
}


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


def test_0002_gives_each_existing_composition_its_model_as_source(tmp_path: Path) -> None:
    url = Settings(data_dir=tmp_path).database_url
    migrate.upgrade(url, "0001")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO models (id, name, version, status, dataset, arch, width, modular, tau, "
                "num_classes, class_names, input_spec, config, tags, metrics, created_at) VALUES "
                "(7, 'm', 1, 'ready', 'digits', 'simcnn', 0.25, 1, 0.9, 10, '[]', '{}', '{}', '{}', "
                "'{}', '2026-01-01 00:00:00')"
            ))
            conn.execute(text(
                "INSERT INTO compositions (id, model_id, classes, class_names, classes_key, finetuned, "
                "status, metrics, created_at) VALUES (3, 7, '[3, 5]', '[\"3\", \"5\"]', '3,5', 0, "
                "'ready', '{}', '2026-01-01 00:00:00')"
            ))
        migrate.upgrade(url)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM composition_sources")).mappings().all()
        assert [dict(r) for r in rows] == [
            {"composition_id": 3, "position": 0, "model_id": 7, "classes": "[3, 5]",
             "class_names": '["3", "5"]'}
        ]
        migrate.downgrade(url, "0001")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM compositions")).scalar() == 1
    finally:
        engine.dispose()
