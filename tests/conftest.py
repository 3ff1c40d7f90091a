"""Fixtures shared by all test packages: a clean MWT_ environment, a migrated SQLite template."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.db import migrate
from app.settings import Settings


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test, never from the developer's shell."""
    for key in list(os.environ):
        if key.startswith("MWT_") and not key.startswith("MWT_TEST_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated registry, copied per test (cheaper than migrating each time)."""
    d = tmp_path_factory.mktemp("template")
    migrate.upgrade(Settings(data_dir=d))
    return d
