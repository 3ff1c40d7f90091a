"""Issue 14: attempts count what they should. A job is failed for repeated losses only when it
wrote no new checkpoint between them (max_attempts), and in any case at a hard ceiling on
starts (max_starts); the failure reason says which."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, JobKind, utcnow
from app.services.jobs import claim, create_job, heartbeat, release_job
from app.settings import Settings
from worker.reaper import reap


def _job(factory: sessionmaker[Session], max_attempts: int, max_starts: int) -> str:
    with factory() as s:
        job, _ = create_job(
            s,
            kind=JobKind.train,
            params={"epochs": 12},
            queue="gpu",
            max_attempts=max_attempts,
            max_starts=max_starts,
            dataset="digits",
            arch="simcnn",
        )
        return job.id


def _lose(factory: sessionmaker[Session], job_id: str, n: int, epoch: int | None) -> str | None:
    """Start attempt ``n``; write a checkpoint of ``epoch`` (None: no progress); lose the worker."""
    worker = f"host:{n}:w"
    assert claim(factory, job_id, worker) is not None
    if epoch is not None:
        progress = {"phase": "training", "epoch": epoch, "test_acc": 0.5, "checkpoint_epoch": epoch}
        assert heartbeat(factory, job_id, worker, progress) is False
    return release_job(factory, job_id, worker, f"worker {worker} lost")


def _get(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_a_job_that_progresses_between_losses_is_not_failed_for_them(
    factory: sessionmaker[Session],
) -> None:
    # Before: failed at its third loss ("gave up after 3 attempt(s)") though each resumed further.
    job_id = _job(factory, max_attempts=3, max_starts=50)
    for n in range(1, 11):  # ten losses, each after a new checkpoint
        assert _lose(factory, job_id, n, epoch=n) == "requeued"
    job = _get(factory, job_id)
    assert job.status == "queued" and job.attempts == 10 and job.stalled_losses == 0
    assert "requeued to resume from the last checkpoint" in (job.error or "")


def test_a_job_that_kills_its_worker_every_time_fails_with_that_reason(
    factory: sessionmaker[Session],
) -> None:
    job_id = _job(factory, max_attempts=3, max_starts=50)
    assert _lose(factory, job_id, 1, epoch=1) == "requeued"  # progress once, then none
    assert _lose(factory, job_id, 2, epoch=None) == "requeued"
    assert _lose(factory, job_id, 3, epoch=None) == "requeued"
    assert _lose(factory, job_id, 4, epoch=None) == "failed"
    job = _get(factory, job_id)
    assert job.status == "failed" and job.attempts == 4
    assert "without writing a new checkpoint" in (job.error or "")
    assert "max_attempts=3" in (job.error or "")


def test_the_hard_ceiling_stops_even_a_progressing_job(factory: sessionmaker[Session]) -> None:
    job_id = _job(factory, max_attempts=2, max_starts=4)
    for n in range(1, 4):
        assert _lose(factory, job_id, n, epoch=n) == "requeued"
    assert _lose(factory, job_id, 4, epoch=4) == "failed"
    job = _get(factory, job_id)
    assert "hard ceiling" in (job.error or "") and "max_starts=4" in (job.error or "")


def test_the_reaper_counts_losses_the_same_way(
    factory: sessionmaker[Session], settings: Settings
) -> None:
    job_id = _job(factory, max_attempts=2, max_starts=50)
    later = utcnow() + dt.timedelta(seconds=settings.stale_after_s * 10)
    for n in range(1, 6):  # five stale attempts, each with a new checkpoint: all requeued
        worker = f"host:{n}:w"
        assert claim(factory, job_id, worker) is not None
        heartbeat(factory, job_id, worker, {"epoch": n, "test_acc": 0.5, "checkpoint_epoch": n})
        assert reap(factory, settings, now=later) == [(job_id, "requeued")]
    for n in (6, 7):  # two without one: failed
        assert claim(factory, job_id, f"host:{n}:w") is not None
        outcome = reap(factory, settings, now=later)
    assert outcome == [(job_id, "failed")]
    assert "without writing a new checkpoint" in (_get(factory, job_id).error or "")


def test_settings_reach_the_job_row(settings: Settings) -> None:
    assert Settings(data_dir=settings.data_dir, max_job_starts=7).max_job_starts == 7
