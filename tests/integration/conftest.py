"""Integration fixtures: real processes (mwt serve / migrate / api / Celery worker), real Redis and Postgres."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MWT_") and not key.startswith("MWT_TEST_"):
            monkeypatch.delenv(key)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)
