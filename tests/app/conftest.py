"""Fixtures for API tests: a migrated SQLite registry per test (copied from a session template)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.auth import create_key, ensure_admin_key
from app.db import migrate
from app.db.models import Base, Model
from app.db.session import make_engine
from app.main import create_app
from app.settings import Settings
from tests.support.registry import seed_fake_model
from tests.support.services import postgres_available, throwaway_postgres


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One migrated throwaway Postgres database for the session (emptied before each test)."""
    if not postgres_available():
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 (see README: Tests)")
    with throwaway_postgres() as url:
        migrate.upgrade(url)
        yield url


def _truncate(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=[pytest.mark.integration, pytest.mark.postgres])]
)
def settings(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Settings:
    """Every API test runs against both registries: SQLite (embedded) and Postgres (distributed)."""
    d = tmp_path / "data"
    d.mkdir()
    url = ""
    if request.param == "sqlite":
        for f in sqlite_template.glob("mwt.db*"):
            shutil.copy(f, d / f.name)
    else:
        url = request.getfixturevalue("postgres_url")
        _truncate(url)
    return Settings(
        data_dir=d, database_url=url, reaper_interval_s=0, key_cache_s=0, sse_poll_s=0.05
    )


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings, run_executor=False)


@pytest.fixture
def client(app: FastAPI, settings: Settings) -> Iterator[TestClient]:
    with TestClient(app) as c:
        token = ensure_admin_key(app.state.sessionmaker, settings)
        c.headers["Authorization"] = f"Bearer {token}"
        yield c


@pytest.fixture
def make_key(app: FastAPI) -> Callable[..., str]:
    def make(*scopes: str) -> str:
        with app.state.sessionmaker() as s:
            _, token = create_key(s, "test", scopes)
            s.commit()
        return token

    return make


@pytest.fixture
def seeded(app: FastAPI, settings: Settings) -> Model:
    with app.state.sessionmaker() as s:
        return seed_fake_model(s, settings)
