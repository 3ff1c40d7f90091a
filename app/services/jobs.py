"""Job rows: creation (with idempotency keys), cancellation, presentation."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Job, JobKind, JobStatus, Model, ModelStatus, utcnow
from app.schemas.jobs import JobOut, ProgressOut

log = logging.getLogger(__name__)


class IdempotencyConflict(ValueError):
    pass


class JobStateConflict(ValueError):
    pass


def send(session: Session, dispatch: Callable[[str, str], None], job: Job) -> bool:
    """Hand a committed, queued job to ``dispatch(job_id, queue)`` and record when.

    A failed send (broker down) is logged, not raised: the job is already in the registry,
    stays queued, and the reaper sends it again (``redispatch_after_s``), so a submit
    never answers 500 for a job it has stored and never strands it. The API and the
    reaper both send through here.
    """
    try:
        dispatch(job.id, job.queue)
    except Exception as exc:
        log.warning(
            "job %s stays queued: could not hand it to the broker (%s); the reaper will send it again",
            job.id,
            exc,
        )
        return False
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.queued.value)
        .values(dispatched_at=utcnow())
    )
    session.commit()
    return True


def new_job_id() -> str:
    return uuid.uuid4().hex


def params_fingerprint(kind: str, params: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps([kind, params], sort_keys=True, default=str).encode()
    ).hexdigest()


def create_job(
    session: Session,
    *,
    kind: JobKind,
    params: dict[str, Any],
    queue: str,
    max_attempts: int,
    dataset: str | None = None,
    arch: str | None = None,
    idempotency_key: str | None = None,
    api_key_id: int | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job and commit. Returns ``(job, created)``.

    With an idempotency key already used for the same request the existing job is returned
    (``created`` False); used for a different request -> IdempotencyConflict.
    """
    fingerprint = params_fingerprint(kind.value, params)
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
        if existing is not None:
            return _same_request(existing, kind, fingerprint), False
    job = Job(
        id=new_job_id(),
        kind=kind.value,
        status=JobStatus.queued.value,
        queue=queue,
        dataset=dataset,
        arch=arch,
        params={**params, "_fingerprint": fingerprint},
        attempts=0,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key or None,
        api_key_id=api_key_id,
        created_at=utcnow(),
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Two retries of one submit raced: the other insert won.
        session.rollback()
        existing = session.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
        if existing is None:
            raise
        return _same_request(existing, kind, fingerprint), False
    return job, True


def _same_request(existing: Job, kind: JobKind, fingerprint: str) -> Job:
    if existing.kind != kind.value or existing.params.get("_fingerprint") != fingerprint:
        raise IdempotencyConflict(
            f"Idempotency-Key was already used for job {existing.id} with different parameters; "
            "use a new key for a different request"
        )
    return existing


def cancel_job(session: Session, job_id: str) -> Job:
    """Cancel a queued job at once; ask a running one to stop (it checks the flag every few steps)."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(job_id)
    if JobStatus(job.status).terminal:
        raise JobStateConflict(f"job {job_id} already {job.status}; nothing to cancel")
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(
            status=JobStatus.cancelled.value,
            cancel_requested=True,
            finished_at=now,
            error="cancelled by user",
        )
    )
    if res.rowcount == 0:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running.value)
            .values(cancel_requested=True)
        )
    elif job.model_id is not None:
        session.execute(
            update(Model)
            .where(Model.id == job.model_id, Model.status == ModelStatus.pending.value)
            .values(status=ModelStatus.failed.value)
        )
    session.commit()
    session.refresh(job)
    return job


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else None


def percent_done(job: Job) -> float | None:
    if job.status == JobStatus.succeeded.value:
        return 100.0
    p = job.progress or {}
    epochs, epoch, step, steps = p.get("epochs"), p.get("epoch"), p.get("step"), p.get("steps")
    if not epochs or epoch is None:
        return 0.0 if job.status == JobStatus.queued.value else None
    frac = ((epoch - 1) + ((step or 0) / steps if steps else 1.0)) / epochs
    if p.get("phase") not in (None, "training"):
        frac = 1.0
    # Training is most of a job; modularization and saving take the last few percent.
    return round(
        min(99.0, 95.0 * max(0.0, min(1.0, frac)) + (4.0 if p.get("phase") == "saving" else 0.0)), 2
    )


def job_out(job: Job, base: str = "/api/v1") -> JobOut:
    progress = None
    eta_s = eta_at = None
    if job.progress:
        clean = {k: _finite(v) for k, v in job.progress.items()}
        progress = ProgressOut(**clean)
        if job.status == JobStatus.running.value and progress.eta_s is not None:
            eta_s = progress.eta_s
            ref = job.heartbeat_at or utcnow()
            eta_at = ref + dt.timedelta(seconds=eta_s)
    params = {k: v for k, v in job.params.items() if not k.startswith("_")}
    links = {"self": f"{base}/jobs/{job.id}", "events": f"{base}/jobs/{job.id}/events"}
    if job.model_id is not None:
        links["model"] = f"{base}/models/{job.model_id}"
    if job.composition_id is not None:
        links["composition"] = f"{base}/compositions/{job.composition_id}"
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job.status,  # type: ignore[arg-type]
        queue=job.queue,
        dataset=job.dataset,
        arch=job.arch,
        params=params,
        progress=progress,
        percent=percent_done(job),
        eta_s=eta_s,
        eta_at=eta_at,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        cancel_requested=job.cancel_requested,
        error=job.error,
        result=job.result,
        model_id=job.model_id,
        composition_id=job.composition_id,
        created_at=job.created_at,
        started_at=job.started_at,
        heartbeat_at=job.heartbeat_at,
        dispatched_at=job.dispatched_at,
        finished_at=job.finished_at,
        duration_s=job.duration_s,
        links=links,
    )
