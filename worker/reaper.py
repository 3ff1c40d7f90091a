"""The stale-job reaper: a job never stays "running" after its worker is gone.

A running job whose heartbeat is older than ``stale_after_s`` lost its worker. If it may
start again (attempts < max_attempts) it goes back to ``queued`` and is dispatched again:
training resumes from its last checkpoint. Otherwise it is marked failed with the reason.
Every transition is a compare-and-set on (status, worker), so several reapers (API
replicas, workers starting up) can run at once.

A queued job can be stranded too: its send failed (broker down at submit) or the broker
lost the message (Redis restarted without persistence, queue purged). The DB is the source
of truth, so the reaper sends again every queued job that was never sent, or whose last
send is older than ``redispatch_after_s``. A duplicate message is harmless: the worker's
claim is a compare-and-set on ``queued``, so only one delivery runs the job.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, JobStatus, Model, ModelStatus, utcnow
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

Requeue = Callable[[str, str], None]  # (job_id, queue) -> dispatch again


def release_job(
    factory: sessionmaker[Session],
    job_id: str,
    worker: str | None,
    reason: str,
    *,
    count_attempt: bool = True,
) -> str | None:
    """Take a running job away from ``worker`` (gone). Returns "requeued", "failed", "cancelled" or None."""
    now = utcnow()
    with factory() as s:
        job = s.get(Job, job_id)
        if (
            job is None
            or job.status != JobStatus.running.value
            or (worker is not None and job.worker != worker)
        ):
            return None
        attempts = job.attempts if count_attempt else max(0, job.attempts - 1)
        cond = [Job.id == job_id, Job.status == JobStatus.running.value, Job.worker == job.worker]
        values: dict[str, Any]
        if job.cancel_requested:
            action, values = (
                "cancelled",
                {"status": JobStatus.cancelled.value, "error": "cancelled by user"},
            )
        elif attempts >= job.max_attempts:
            action = "failed"
            values = {
                "status": JobStatus.failed.value,
                "error": f"{reason}; gave up after {attempts} attempt(s) (max_attempts={job.max_attempts})",
            }
        else:
            action = "requeued"
            values = {
                "status": JobStatus.queued.value,
                "error": f"{reason}; requeued to resume from the last checkpoint "
                f"(attempt {attempts + 1} of {job.max_attempts})",
            }
        values.update(worker=None, attempts=attempts)
        if action == "requeued":
            values["dispatched_at"] = None  # not sent for this attempt yet
        else:
            values["finished_at"] = now
            if job.started_at is not None:
                values["duration_s"] = (now - job.started_at).total_seconds()
        if job.progress is not None:
            values["progress"] = {**job.progress, "phase": action}
        res = s.execute(update(Job).where(*cond).values(**values))
        if res.rowcount != 1:
            s.rollback()
            return None
        if action != "requeued" and job.model_id is not None:
            s.execute(
                update(Model)
                .where(Model.id == job.model_id, Model.status == ModelStatus.pending.value)
                .values(status=ModelStatus.failed.value)
            )
        s.commit()
        log.warning("job %s %s: %s", job_id, action, reason)
        return action


def find_stale(
    factory: sessionmaker[Session], stale_after_s: float, now: dt.datetime | None = None
) -> list[Job]:
    cutoff = (now or utcnow()) - dt.timedelta(seconds=stale_after_s)
    with factory() as s:
        return list(
            s.scalars(
                select(Job).where(
                    Job.status == JobStatus.running.value,
                    or_(
                        Job.heartbeat_at < cutoff,
                        and_(Job.heartbeat_at.is_(None), Job.started_at < cutoff),
                    ),
                )
            )
        )


def reap(
    factory: sessionmaker[Session],
    settings: Settings,
    requeue: Requeue | None = None,
    now: dt.datetime | None = None,
) -> list[tuple[str, str]]:
    """One pass: release every stale running job, then send again the queued jobs whose
    message is missing or overdue (only with a ``requeue``; the embedded executor polls the
    DB and needs none)."""
    out = []
    for job in find_stale(factory, settings.stale_after_s, now):
        age = ((now or utcnow()) - (job.heartbeat_at or job.started_at or utcnow())).total_seconds()
        action = release_job(
            factory, job.id, job.worker, f"worker {job.worker} lost (no heartbeat for {age:.0f} s)"
        )
        if action is None:
            continue
        out.append((job.id, action))
        if action == "requeued" and requeue is not None:
            send_again(factory, job, requeue)
    if requeue is not None:
        for job in find_unsent(factory, settings.redispatch_after_s, now):
            if send_again(factory, job, requeue):
                action = "sent" if job.dispatched_at is None else "resent"
                log.warning("queued job %s had no live message (%s by the reaper)", job.id, action)
                out.append((job.id, action))
    return out


# A job is inserted, then sent: give that moment this long before calling the send lost.
SEND_GRACE_S = 30.0


def find_unsent(
    factory: sessionmaker[Session], redispatch_after_s: float, now: dt.datetime | None = None
) -> list[Job]:
    """Queued jobs never sent (past a short grace) or last sent over ``redispatch_after_s`` ago."""
    now = now or utcnow()
    grace = now - dt.timedelta(seconds=min(SEND_GRACE_S, redispatch_after_s))
    overdue = now - dt.timedelta(seconds=redispatch_after_s)
    with factory() as s:
        return list(
            s.scalars(
                select(Job)
                .where(
                    # Cancel-requested ones too: the claim that the message triggers ends them.
                    Job.status == JobStatus.queued.value,
                    or_(
                        and_(Job.dispatched_at.is_(None), Job.created_at < grace),
                        Job.dispatched_at < overdue,
                    ),
                )
                .order_by(Job.created_at)
            )
        )


def send_again(factory: sessionmaker[Session], job: Job, requeue: Requeue) -> bool:
    """Send ``job`` to its queue and record it; False (job left as it is) if the send fails."""
    from app.services.jobs import send

    with factory() as s:
        return send(s, requeue, job)


def reap_once(settings: Settings, requeue: Requeue | None = None) -> list[tuple[str, str]]:
    engine = make_engine(settings, pool_size=1, max_overflow=1)
    try:
        return reap(make_sessionmaker(engine), settings, requeue)
    finally:
        engine.dispose()


def celery_requeue(celery: Celery) -> Requeue:
    from worker.celery_app import TASK_RUN_JOB

    def send(job_id: str, queue: str) -> None:
        celery.send_task(TASK_RUN_JOB, args=[job_id], queue=queue)

    return send
