"""Fixtures for worker tests: a migrated SQLite registry and a session factory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.db import migrate
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MWT_") and not key.startswith("MWT_TEST_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("template")
    migrate.upgrade(Settings(data_dir=d))
    return d


@pytest.fixture
def settings(tmp_path: Path, sqlite_template: Path) -> Settings:
    d = tmp_path / "data"
    d.mkdir()
    for f in sqlite_template.glob("mwt.db*"):
        shutil.copy(f, d / f.name)
    return Settings(
        data_dir=d,
        heartbeat_interval_s=0.2,
        stale_after_s=2,
        reaper_interval_s=0.5,
        executor_poll_s=0.2,
        device="cpu",
    )


@pytest.fixture
def factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()
