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
    "api_keys", "datasets", "jobs", "models", "modules", "compositions", "composition_sources",
    "weights",
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


def test_0004_backfills_owners_from_jobs_and_scopes_idempotency_keys(tmp_path: Path) -> None:
    url = Settings(data_dir=tmp_path).database_url
    migrate.upgrade(url, "0003")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO api_keys (id, name, prefix, key_hash, scopes, created_at) VALUES "
                "(5, 'alice', 'mwt_a', 'h5', '[\"write\"]', '2026-01-01 00:00:00'), "
                "(6, 'bob', 'mwt_b', 'h6', '[\"write\"]', '2026-01-01 00:00:00')"
            ))
            conn.execute(text(
                "INSERT INTO jobs (id, kind, status, queue, params, attempts, max_attempts, "
                "cancel_requested, idempotency_key, created_at, api_key_id) VALUES "
                "('j1', 'train', 'succeeded', 'gpu', '{}', 1, 3, 0, 'k', '2026-01-01 00:00:00', 5)"
            ))
            conn.execute(text(
                "INSERT INTO models (id, name, version, status, dataset, arch, width, modular, tau, "
                "num_classes, class_names, input_spec, config, tags, metrics, job_id, created_at) "
                "VALUES (7, 'm', 1, 'ready', 'digits', 'simcnn', 0.25, 1, 0.9, 10, '[]', '{}', "
                "'{}', '{}', '{}', 'j1', '2026-01-01 00:00:00')"
            ))
            conn.execute(text(
                "INSERT INTO modules (id, model_id, class_index, class_name, dataset, arch, krr, "
                "kept_kernels, total_kernels, artifact_path, sha256, size_bytes, created_at) VALUES "
                "(1, 7, 0, '0', 'digits', 'simcnn', 0.3, 3, 10, 'p', 's', 1, '2026-01-01 00:00:00')"
            ))
            conn.execute(text(
                "INSERT INTO compositions (id, model_id, classes, class_names, classes_key, "
                "finetuned, status, metrics, created_at) VALUES (3, 7, '[3]', '[\"3\"]', '3', 0, "
                "'ready', '{}', '2026-01-01 00:00:00')"
            ))
            conn.execute(text(
                "INSERT INTO composition_sources (composition_id, position, model_id, classes, "
                "class_names) VALUES (3, 0, 7, '[3]', '[\"3\"]')"
            ))
        migrate.upgrade(url)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT api_key_id FROM models")).scalar() == 5
            assert conn.execute(text("SELECT api_key_id FROM compositions")).scalar() == 5
            # Rebuilding tables on SQLite must not cascade-delete what references them.
            assert conn.execute(text("SELECT count(*) FROM modules")).scalar() == 1
            assert conn.execute(text("SELECT count(*) FROM composition_sources")).scalar() == 1
            # Another key may now use the same Idempotency-Key.
            conn.execute(text(
                "INSERT INTO jobs (id, kind, status, queue, params, attempts, max_attempts, "
                "cancel_requested, idempotency_key, created_at, api_key_id) VALUES "
                "('j2', 'train', 'queued', 'gpu', '{}', 0, 3, 0, 'k', '2026-01-02 00:00:00', 6)"
            ))
        migrate.downgrade(url, "0003")
        with engine.connect() as conn:
            # Back to one key per Idempotency-Key: the newest keeps it.
            rows = conn.execute(text("SELECT id, idempotency_key FROM jobs ORDER BY id")).all()
            assert [tuple(r) for r in rows] == [("j1", None), ("j2", "k")]
            assert conn.execute(text("SELECT count(*) FROM modules")).scalar() == 1
    finally:
        engine.dispose()
