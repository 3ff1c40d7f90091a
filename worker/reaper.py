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

The state changes themselves (the hand-back, the send) are the job store's
(``app.services.jobs``); this module finds the jobs and decides when.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, JobStatus, utcnow
from app.db.session import make_engine, make_sessionmaker
from app.dispatch import Requeue
from app.services.jobs import release_job, send
from app.settings import Settings

log = logging.getLogger(__name__)


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
    with factory() as s:
        return send(s, requeue, job)


def reap_once(settings: Settings, requeue: Requeue | None = None) -> list[tuple[str, str]]:
    """One pass with an engine of its own (``mwt reap``, a worker starting up)."""
    engine = make_engine(settings, pool_size=1, max_overflow=1)
    try:
        return reap(make_sessionmaker(engine), settings, requeue)
    finally:
        engine.dispose()


def reap_until(
    stop: threading.Event,
    factory: sessionmaker[Session],
    settings: Settings,
    requeue: Requeue | None = None,
) -> None:
    """A pass every ``settings.reaper_interval_s`` until ``stop`` is set (the API's reaper thread).

    A failed pass (the DB briefly away) is logged and the next one tries again.
    """
    while not stop.wait(settings.reaper_interval_s):
        try:
            reaped = reap(factory, settings, requeue=requeue)
            if reaped:
                log.warning("reaper: %s", reaped)
        except Exception:
            log.exception("reaper pass failed")
