"""The embedded executor: spawned job processes, crash handling, shutdown."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job
from app.settings import Settings
from tests.support.job_processes import claim_and_hang, crash_after_claim
from worker.executor import Executor


def _wait(factory: sessionmaker[Session], job_id: str, pred, timeout: float = 60.0) -> Job:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with factory() as s:
            job = s.get(Job, job_id)
            assert job is not None
            if pred(job):
                return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached the expected state: {job.status} {job.error}")


@pytest.mark.slow
def test_a_dying_job_process_is_retried_then_failed(
    factory: sessionmaker[Session], settings: Settings, submit_job: Callable[..., str]
) -> None:
    job_id = submit_job(max_attempts=2)
    ex = Executor(settings, factory, target=crash_after_claim)
    ex.start()
    try:
        job = _wait(factory, job_id, lambda j: j.status == "failed")
    finally:
        ex.stop()
    assert job.attempts == 2
    assert "died (exit code 3)" in (job.error or "") and "gave up after 2 attempt(s)" in (
        job.error or ""
    )


def test_shutdown_requeues_running_jobs_without_spending_an_attempt(
    factory: sessionmaker[Session], settings: Settings, submit_job: Callable[..., str]
) -> None:
    job_id = submit_job(max_attempts=1)
    ex = Executor(settings, factory, target=claim_and_hang)
    ex.start()
    _wait(factory, job_id, lambda j: j.status == "running")
    assert ex.running() == [job_id]
    ex.stop(timeout=5)
    job = _wait(factory, job_id, lambda j: True)
    assert job.status == "queued" and job.attempts == 0 and "shut down" in (job.error or "")


@pytest.mark.slow
def test_a_hung_job_is_handed_back_and_its_process_exits(
    factory: sessionmaker[Session], settings: Settings, submit_job: Callable[..., str]
) -> None:
    from tests.support.job_processes import claim_report_and_hang

    job_id = submit_job(max_attempts=2)
    hung = settings.model_copy(update={"stall_after_s": 1.5})
    ex = Executor(hung, factory, target=claim_report_and_hang)
    ex.start()
    try:
        job = _wait(factory, job_id, lambda j: j.status == "failed", timeout=90)
    finally:
        ex.stop()
    # Each attempt heartbeat happily while hung; the stall watchdog handed it back and exited.
    assert job.attempts == 2 and ex.running() == []
    assert "no progress for" in (job.error or "") and "looked hung" in (job.error or "")
    assert "gave up after 2 attempt(s)" in (job.error or "")
