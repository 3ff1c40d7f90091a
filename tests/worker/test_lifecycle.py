"""Claiming, heartbeats, fencing, the reaper and the attempts cap, on a real SQLite registry."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, JobStatus, Model, ModelStatus
from app.services.jobs import claim, finish, release_job, reserve_model
from app.settings import Settings
from worker.jobs import JobContext
from worker.reaper import reap


def _get(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _age_heartbeat(factory: sessionmaker[Session], job_id: str, seconds: float) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    with factory() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=old))
        s.commit()


def test_claim_is_exclusive(factory: sessionmaker[Session], submit_job: Callable[..., str]) -> None:
    job_id = submit_job()
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(claim(factory, job_id, f"w{i}")))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [r for r in results if r is not None]
    assert len(claimed) == 1
    job = _get(factory, job_id)
    assert job.status == "running" and job.attempts == 1 and job.started_at is not None
    assert claim(factory, job_id, "late") is None  # a duplicate delivery does nothing


def test_cancelled_before_start(
    factory: sessionmaker[Session], submit_job: Callable[..., str]
) -> None:
    job_id = submit_job()
    with factory() as s:
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        s.commit()
    assert claim(factory, job_id, "w") is None
    assert _get(factory, job_id).status == "cancelled"


def test_reaper_requeues_then_fails_after_max_attempts(
    factory: sessionmaker[Session], settings: Settings, submit_job: Callable[..., str]
) -> None:
    job_id = submit_job(max_attempts=2)
    requeued: list[tuple[str, str]] = []
    assert claim(factory, job_id, "w1") is not None
    assert (
        reap(factory, settings, requeue=lambda j, q: requeued.append((j, q))) == []
    )  # fresh heartbeat
    _age_heartbeat(factory, job_id, 60)
    assert reap(factory, settings, requeue=lambda j, q: requeued.append((j, q))) == [
        (job_id, "requeued")
    ]
    job = _get(factory, job_id)
    assert job.status == "queued" and job.worker is None and "requeued" in (job.error or "")
    assert requeued == [(job_id, "gpu")]
    assert claim(factory, job_id, "w2") is not None
    assert _get(factory, job_id).attempts == 2
    _age_heartbeat(factory, job_id, 60)
    assert reap(factory, settings) == [(job_id, "failed")]
    job = _get(factory, job_id)
    assert job.status == "failed" and "gave up after 2 attempt(s)" in (job.error or "")
    assert job.finished_at is not None


def test_reaper_honours_cancel_and_marks_pending_model_cancelled(
    factory: sessionmaker[Session], settings: Settings, submit_job: Callable[..., str]
) -> None:
    job_id = submit_job()
    claim(factory, job_id, "w1")
    with factory() as s:
        m = Model(
            name="n",
            version=1,
            dataset="digits",
            arch="simcnn",
            width=1.0,
            num_classes=10,
            job_id=job_id,
        )
        s.add(m)
        s.flush()
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True, model_id=m.id))
        s.commit()
        model_id = m.id
    _age_heartbeat(factory, job_id, 60)
    assert reap(factory, settings) == [(job_id, "cancelled")]
    with factory() as s:
        model = s.get(Model, model_id)
        assert model is not None
        assert model.status == ModelStatus.cancelled.value and model.version is None


def test_a_run_that_ends_unmade_gives_its_version_back(
    factory: sessionmaker[Session], submit_job: Callable[..., str]
) -> None:
    """A cancelled run's model says `cancelled`, a failed one's `failed`; neither keeps a
    version number, so the next run of the name takes v1, and v2 only after a real v1."""
    data = SimpleNamespace(
        name="digits", num_classes=2, class_names=["a", "b"], spec=SimpleNamespace(to_json=dict)
    )
    cfg = {"arch": "simcnn", "width": 0.25, "modular": True, "epochs": 1}

    def start() -> tuple[str, int]:
        job_id = submit_job()
        job = claim(factory, job_id, "w")
        assert job is not None
        return job_id, reserve_model(factory, job, "w", data, cfg)

    def model(model_id: int) -> Model:
        with factory() as s:
            m = s.get(Model, model_id)
            assert m is not None
            return m

    for end in (JobStatus.cancelled, JobStatus.failed):
        job_id, model_id = start()
        assert model(model_id).version == 1
        with factory() as s:
            assert finish(s, job_id, "w", end, error="stopped")
        assert (model(model_id).status, model(model_id).version) == (end.value, None)
    _, kept = start()  # still pending: holds its number
    _, after = start()
    assert (model(kept).version, model(after).version) == (1, 2)


def test_fencing_a_reaped_attempt_loses_the_job(
    factory: sessionmaker[Session], settings: Settings, submit_job: Callable[..., str]
) -> None:
    job_id = submit_job()
    job = claim(factory, job_id, "old")
    assert job is not None
    ctx = JobContext(factory, settings, job, "old")
    ctx.report({"epoch": 1}, force=True)
    assert not ctx.lost and _get(factory, job_id).progress == {"epoch": 1}
    _age_heartbeat(factory, job_id, 60)
    reap(factory, settings)
    assert claim(factory, job_id, "new") is not None
    ctx.report({"epoch": 2}, force=True)  # the old attempt wakes up
    assert ctx.lost and ctx.should_stop()
    after = _get(factory, job_id)
    assert after.worker == "new" and after.progress["epoch"] == 1  # the old write was refused


def test_heartbeat_thread_and_cancel_flag(
    factory: sessionmaker[Session], settings: Settings, submit_job: Callable[..., str]
) -> None:
    job_id = submit_job()
    job = claim(factory, job_id, "w")
    assert job is not None
    first = _get(factory, job_id).heartbeat_at
    with JobContext(factory, settings, job, "w") as ctx:
        threading.Event().wait(0.8)
        assert _get(factory, job_id).heartbeat_at > first  # type: ignore[operator]
        with factory() as s:
            s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
            s.commit()
        threading.Event().wait(0.8)
        assert ctx.cancelled and ctx.should_stop()


def test_release_without_counting_the_attempt(
    factory: sessionmaker[Session], submit_job: Callable[..., str]
) -> None:
    job_id = submit_job(max_attempts=1)
    claim(factory, job_id, "w")
    assert release_job(factory, job_id, "w", "shutdown", count_attempt=False) == "requeued"
    job = _get(factory, job_id)
    assert job.status == JobStatus.queued.value and job.attempts == 0


def test_reaper_sends_again_queued_jobs_without_a_live_message(
    factory: sessionmaker[Session], settings: Settings, submit_job: Callable[..., str]
) -> None:
    from app.db.models import utcnow

    never_sent, overdue, recent, fresh = (submit_job() for _ in range(4))
    now = utcnow()
    with factory() as s:
        s.execute(update(Job).where(Job.id.in_([never_sent, overdue, recent]))
                  .values(created_at=now - dt.timedelta(hours=2)))
        s.execute(update(Job).where(Job.id == overdue)
                  .values(dispatched_at=now - dt.timedelta(seconds=settings.redispatch_after_s + 5)))
        s.execute(update(Job).where(Job.id == recent).values(dispatched_at=now))
        s.commit()
    sent: list[tuple[str, str]] = []
    out = reap(factory, settings, requeue=lambda j, q: sent.append((j, q)))
    # `fresh` was inserted a moment ago: its own submit is still sending it.
    assert sorted(out) == sorted([(never_sent, "sent"), (overdue, "resent")])
    assert sorted(sent) == sorted([(never_sent, "gpu"), (overdue, "gpu")])
    assert _get(factory, never_sent).dispatched_at is not None
    assert reap(factory, settings, requeue=lambda j, q: sent.append((j, q))) == []  # sent now
    # Without a requeue (embedded executor, which polls the DB) nothing is sent.
    with factory() as s:
        s.execute(update(Job).where(Job.id == never_sent).values(dispatched_at=None))
        s.commit()
    assert reap(factory, settings) == []

    def broken(job_id: str, queue: str) -> None:
        raise ConnectionError("broker down")

    assert reap(factory, settings, requeue=broken) == []  # a failed send leaves the job queued
    job = _get(factory, never_sent)
    assert job.status == "queued" and job.dispatched_at is None


@pytest.mark.slow
def test_stall_watchdog_hands_back_a_job_that_stops_reporting(
    factory: sessionmaker[Session], settings: Settings, submit_job: Callable[..., str]
) -> None:
    job_id = submit_job()
    job = claim(factory, job_id, "w1")
    assert job is not None
    stalled: list[bool] = []
    cfg = settings.model_copy(update={"stall_after_s": 1.0})
    with JobContext(factory, cfg, job, "w1", on_stall=lambda: stalled.append(True)) as ctx:
        for _ in range(8):  # reporting keeps it alive well past stall_after_s
            ctx.report({"step": 1})
            threading.Event().wait(0.25)
        assert not ctx.lost and _get(factory, job_id).status == "running"
        threading.Event().wait(1.8)  # then silence
        assert ctx.lost and stalled == [True]
    job = _get(factory, job_id)
    assert job.status == "queued" and job.worker is None and "no progress for" in (job.error or "")
