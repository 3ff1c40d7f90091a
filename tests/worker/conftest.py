"""Fixtures for worker tests: a migrated SQLite registry and a session factory."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import JobKind
from app.db.session import make_engine, make_sessionmaker
from app.services.jobs import create_job
from app.settings import Settings


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


@pytest.fixture
def submit_job(factory: sessionmaker[Session]) -> Callable[..., str]:
    """Queue a one-epoch digits training job; returns its id."""

    def submit(max_attempts: int = 3) -> str:
        with factory() as s:
            job, _ = create_job(
                s,
                kind=JobKind.train,
                params={"epochs": 1},
                queue="gpu",
                max_attempts=max_attempts,
                dataset="digits",
                arch="simcnn",
            )
            return job.id

    return submit
