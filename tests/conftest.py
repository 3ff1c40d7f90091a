"""Fixtures shared by all test packages: a clean MWT_ environment, a migrated SQLite template;
and, under CI, no skipped test."""

from __future__ import annotations

import os
from collections.abc import Generator
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


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _fail_a_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI every test runs: a skip (a tool or service missing, an optional import absent)
    would let the suite pass with part of it untested, so it is reported as a failure."""
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every test must run: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    _fail_a_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report: pytest.CollectReport = yield
    _fail_a_skip(report)
    return report
