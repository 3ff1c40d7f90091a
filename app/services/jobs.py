"""The job aggregate's store: every change of a job's state goes through this module.

- API: create (with idempotency keys), hand to the broker (``send`` records when), cancel.
- Worker: ``claim`` (compare-and-set queued -> running), ``heartbeat`` (progress + cancel flag),
  ``reserve_model``, ``mark_succeeded`` and ``finish`` (failed / cancelled).
- Reaper, stall watchdog and executor: ``release_job`` hands a running job back (requeued,
  failed or cancelled).

Every write of a running attempt is fenced on its worker id (``status == running and
worker == <this attempt>``), so an attempt that was given up on can never overwrite the job's
new owner; a fenced write that matches no row raises ``JobLost``. A job that ends without
succeeding takes its pending model with it (``end_pending_model``).
Also here: the job as the API shows it (``job_out``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Iterable
from typing import Any, cast

from sqlalchemy import CursorResult, Update, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, JobKind, JobStatus, Model, ModelStatus, utcnow
from app.paths import API_PREFIX
from app.schemas.jobs import JobOut, ProgressOut
from app.settings import Settings
from mwt_core.config import ModularizeConfig
from mwt_core.progress import progress_record

log = logging.getLogger(__name__)

ACTIVE = (JobStatus.queued.value, JobStatus.running.value)  # not yet terminal
# jobs.stalled_losses while an attempt runs: it wrote a checkpoint (so its loss does not
# count); otherwise the column counts the losses in a row of attempts that wrote none.
CHECKPOINTED = -1


class IdempotencyConflict(ValueError):
    pass


class JobStateConflict(ValueError):
    pass


class JobLost(RuntimeError):
    """This attempt no longer owns the job (the reaper requeued or failed it)."""


def _matched(s: Session, stmt: Update) -> int:
    """Run an UPDATE and return how many rows it matched: the outcome of a compare-and-set."""
    return cast("CursorResult[Any]", s.execute(stmt)).rowcount


def end_pending_model(s: Session, model_id: int | None, job_status: JobStatus | str) -> None:
    """The model a job reserved and never finished ends with it (uncommitted): ``cancelled``
    or ``failed``, and its version number is given back for the next run of that name."""
    if model_id is None:
        return
    cancelled = JobStatus(job_status) == JobStatus.cancelled
    s.execute(
        update(Model)
        .where(Model.id == model_id, Model.status == ModelStatus.pending.value)
        .values(
            status=(ModelStatus.cancelled if cancelled else ModelStatus.failed).value, version=None
        )
    )


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


def active_job_like(session: Session, kind: JobKind, params: dict[str, Any]) -> Job | None:
    """A queued or running job of ``kind`` for the same ``params``, if there is one (a repeated
    request joins it rather than doing the same work twice)."""
    fingerprint = params_fingerprint(kind.value, params)
    candidates = session.scalars(
        select(Job).where(
            Job.kind == kind.value,
            Job.status.in_([JobStatus.queued.value, JobStatus.running.value]),
        )
    )
    return next((j for j in candidates if j.params.get("_fingerprint") == fingerprint), None)


def create_job(
    session: Session,
    *,
    kind: JobKind,
    params: dict[str, Any],
    queue: str,
    max_attempts: int,
    max_starts: int | None = None,
    dataset: str | None = None,
    arch: str | None = None,
    idempotency_key: str | None = None,
    api_key_id: int | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job and commit. Returns ``(job, created)``.

    ``max_attempts`` bounds losses without progress, ``max_starts`` (default: the setting's
    default) all starts. With an idempotency key already used for the same request the existing job is returned
    (``created`` False); used for a different request -> IdempotencyConflict.
    """
    fingerprint = params_fingerprint(kind.value, params)
    # An Idempotency-Key is scoped to the API key that sent it.
    same_key = (Job.idempotency_key == idempotency_key, Job.api_key_id.is_not_distinct_from(api_key_id))
    if idempotency_key:
        existing = session.scalar(select(Job).where(*same_key))
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
        max_starts=max(
            max_starts if max_starts is not None else Settings.model_fields["max_job_starts"].default,
            max_attempts,
        ),
        stalled_losses=0,
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
        existing = session.scalar(select(Job).where(*same_key))
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
    matched = _matched(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(
            status=JobStatus.cancelled.value,
            cancel_requested=True,
            finished_at=now,
            error="cancelled by user",
        ),
    )
    if matched == 0:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running.value)
            .values(cancel_requested=True)
        )
    else:
        end_pending_model(session, job.model_id, JobStatus.cancelled)
    session.commit()
    session.refresh(job)
    return job


def request_cancel(session: Session, job_ids: Iterable[str]) -> None:
    """Ask active jobs to stop (uncommitted); each ends at its next check or claim."""
    ids = list(job_ids)
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(cancel_requested=True))


# ------------------------------------------------------------------- a worker's attempt


def claim(factory: sessionmaker[Session], job_id: str, worker: str) -> Job | None:
    """Take the job if it is queued. Returns the claimed row, or None when there is nothing to do."""
    now = utcnow()
    with factory() as s:
        matched = _matched(
            s,
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.queued.value,
                Job.cancel_requested.is_(False),
            )
            .values(
                status=JobStatus.running.value,
                attempts=Job.attempts + 1,
                worker=worker,
                heartbeat_at=now,
            ),
        )
        if matched != 1:
            s.rollback()
            job = s.get(Job, job_id)
            if job is None:
                log.warning("job %s does not exist; dropping the message", job_id)
            elif job.status == JobStatus.queued.value and job.cancel_requested:
                finish(s, job_id, None, JobStatus.cancelled, error="cancelled before it started")
            else:
                log.info("job %s is %s; not claiming it (duplicate delivery?)", job_id, job.status)
            return None
        s.execute(
            update(Job).where(Job.id == job_id, Job.started_at.is_(None)).values(started_at=now)
        )
        s.commit()
        job = s.get(Job, job_id)
        assert job is not None
        if job.attempts > job.max_starts:
            finish(
                s,
                job_id,
                worker,
                JobStatus.failed,
                error=f"gave up: the job was started {job.attempts - 1} time(s), the hard ceiling "
                f"is max_starts={job.max_starts}",
            )
            return None
        return job


def heartbeat(
    factory: sessionmaker[Session], job_id: str, worker: str, progress: dict[str, Any] | None
) -> bool | None:
    """Fenced: record that the attempt is alive (and its ``progress`` when given).

    Returns the job's cancel flag, or None when this attempt no longer owns the job.
    """
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
        if progress.get("checkpoint_epoch") is not None:
            values["stalled_losses"] = CHECKPOINTED  # this attempt made progress
    with factory() as s:
        matched = _matched(
            s,
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running.value, Job.worker == worker)
            .values(**values),
        )
        if matched != 1:
            s.rollback()
            return None
        flag = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
        s.commit()
    return bool(flag)


def fenced(s: Session, job_id: str, worker: str, **values: Any) -> None:
    """Update the running job only while ``worker`` holds it (uncommitted); else JobLost."""
    matched = _matched(
        s,
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running.value, Job.worker == worker)
        .values(**values),
    )
    if matched != 1:
        s.rollback()
        raise JobLost(job_id)


def mark_succeeded(
    s: Session,
    job_id: str,
    worker: str,
    now: dt.datetime,
    progress: dict[str, Any],
    result: dict[str, Any],
    **values: Any,
) -> None:
    """Fenced: the job succeeded (only if this worker still holds it); uncommitted, so the
    caller publishes what the job made in the same transaction."""
    job_row = s.get(Job, job_id)
    assert job_row is not None
    started = job_row.started_at or now
    fenced(
        s,
        job_id,
        worker,
        status=JobStatus.succeeded.value,
        finished_at=now,
        duration_s=(now - started).total_seconds(),
        progress=progress,
        result=result,
        error=None,
        **values,
    )


def finish(
    s: Session,
    job_id: str,
    worker: str | None,
    status: JobStatus,
    *,
    error: str | None = None,
    result: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Move a job to a terminal state (fenced on ``worker`` when given); mark its pending model failed."""
    now = utcnow()
    job = s.get(Job, job_id)
    if job is None:
        return False
    cond = [Job.id == job_id, Job.status.in_(ACTIVE)]
    if worker is not None:
        cond.append(Job.worker == worker)
    values: dict[str, Any] = {"status": status.value, "finished_at": now, "error": error}
    if job.started_at is not None:
        values["duration_s"] = (now - job.started_at).total_seconds()
    if result is not None:
        values["result"] = result
    if progress is not None:
        values["progress"] = progress
    matched = _matched(s, update(Job).where(*cond).values(**values))
    if matched != 1:
        s.rollback()
        return False
    if status != JobStatus.succeeded:
        end_pending_model(s, job.model_id, status)
    s.commit()
    return True


def reserve_model(
    factory: sessionmaker[Session], job: Job, worker: str, data: Any, cfg_json: dict[str, Any]
) -> int:
    """Reserve the next version of the model name (status pending) for this job, once per job."""
    p = job.params
    name = p.get("name") or f"{job.dataset}-{job.arch}"
    for _ in range(10):
        with factory() as s:
            current = s.scalar(select(Job.model_id).where(Job.id == job.id))
            if current is not None:
                return current
            version = (s.scalar(select(func.max(Model.version)).where(Model.name == name)) or 0) + 1
            model = Model(
                name=name,
                version=version,
                status=ModelStatus.pending.value,
                dataset=job.dataset or data.name,
                arch=job.arch or cfg_json["arch"],
                width=float(cfg_json["width"]),
                modular=bool(cfg_json["modular"]),
                tau=float(p.get("tau", ModularizeConfig.tau)) if cfg_json["modular"] else None,
                num_classes=data.num_classes,
                class_names=list(data.class_names),
                input_spec=data.spec.to_json(),
                config=cfg_json,
                tags=dict(p.get("tags") or {}),
                job_id=job.id,
                epochs=int(cfg_json["epochs"]),
                api_key_id=job.api_key_id,  # the model belongs to whoever submitted the job
            )
            s.add(model)
            try:
                s.flush()
                fenced(s, job.id, worker, model_id=model.id)
                s.commit()
                return model.id
            except IntegrityError:  # another job took this version number
                s.rollback()
    raise RuntimeError(f"could not reserve a version of model {name!r}")


def release_job(
    factory: sessionmaker[Session],
    job_id: str,
    worker: str | None,
    reason: str,
    *,
    count_attempt: bool = True,
) -> str | None:
    """Take a running job away from ``worker`` (gone, hung, or stopped with its executor).

    Returns "requeued", "failed", "cancelled", or None when the job is not running there.
    """
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
        # A loss counts against the job only when no checkpoint was written since the last
        # one (heartbeat() resets the count on each new checkpoint): a job that kills its
        # worker every time is stopped, one on unlucky machines resumes. max_starts caps both.
        if not count_attempt:
            stalled = max(job.stalled_losses, 0)
        elif job.stalled_losses == CHECKPOINTED:
            stalled = 0
        else:
            stalled = job.stalled_losses + 1
        cond = [Job.id == job_id, Job.status == JobStatus.running.value, Job.worker == job.worker]
        values: dict[str, Any]
        if job.cancel_requested:
            action, values = (
                "cancelled",
                {"status": JobStatus.cancelled.value, "error": "cancelled by user"},
            )
        elif stalled >= job.max_attempts:
            action = "failed"
            values = {
                "status": JobStatus.failed.value,
                "error": f"{reason}; gave up after {attempts} attempt(s): lost {stalled} time(s) "
                f"in a row without writing a new checkpoint (max_attempts={job.max_attempts})",
            }
        elif attempts >= job.max_starts:
            action = "failed"
            values = {
                "status": JobStatus.failed.value,
                "error": f"{reason}; gave up after {attempts} attempt(s): the hard ceiling on "
                f"starts (max_starts={job.max_starts}), although it was progressing",
            }
        else:
            action = "requeued"
            values = {
                "status": JobStatus.queued.value,
                "error": f"{reason}; requeued to resume from the last checkpoint (start "
                f"{attempts + 1} of at most {job.max_starts}; {stalled} of {job.max_attempts} "
                "losses without progress)",
            }
        values.update(worker=None, attempts=attempts, stalled_losses=stalled)
        if action == "requeued":
            values["dispatched_at"] = None  # not sent for this attempt yet
        else:
            values["finished_at"] = now
            if job.started_at is not None:
                values["duration_s"] = (now - job.started_at).total_seconds()
        if job.progress is not None:
            values["progress"] = {**job.progress, "phase": action}
        matched = _matched(s, update(Job).where(*cond).values(**values))
        if matched != 1:
            s.rollback()
            return None
        if action != "requeued":
            end_pending_model(s, job.model_id, action)
        s.commit()
        log.warning("job %s %s: %s", job_id, action, reason)
        return action


# ------------------------------------------------------------------------- presentation


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


def job_out(job: Job, base: str = API_PREFIX) -> JobOut:
    progress = None
    eta_s = eta_at = None
    if job.progress:
        clean = {k: _finite(v) for k, v in progress_record(job.progress).items()}
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
        status=job.status,
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
