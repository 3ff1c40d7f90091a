"""Training jobs: submit (202), list, show with progress and ETA, cancel, live progress (SSE)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from app.auth import ReadKey, WriteKey
from app.db.models import Job, JobKind, JobStatus
from app.deps import DbDep, DispatcherDep, SettingsDep
from app.routers._common import PagingDep, not_found, page
from app.schemas.common import Page, QueryId
from app.schemas.jobs import JobCreate, JobOut
from app.services import datasets as datasets_svc
from app.services import jobs as svc

router = APIRouter(prefix="/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="retrying a submit with the same key returns the first job instead of starting another",
    ),
]


@router.post(
    "",
    response_model=JobOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Submit a training job",
    responses={200: {"description": "an earlier submit with the same Idempotency-Key"}},
)
def submit(
    body: JobCreate,
    response: Response,
    db: DbDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    from mwt_core.models import UnknownArchitecture, architecture_info, list_architectures

    try:
        arch = architecture_info(body.arch).name
    except UnknownArchitecture:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"unknown architecture {body.arch!r}; choose one of {', '.join(list_architectures())}",
        ) from None
    try:
        datasets_svc.resolve(db, settings, body.dataset)
    except (datasets_svc.DatasetNotFound, datasets_svc.DatasetUnavailable) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    params = body.model_dump()
    params["arch"] = arch
    try:
        job, created = svc.create_job(
            db,
            kind=JobKind.train,
            params=params,
            queue=settings.train_queue,
            max_attempts=settings.max_job_attempts,
            dataset=body.dataset,
            arch=arch,
            idempotency_key=idempotency_key,
            api_key_id=principal.key_id,
        )
    except svc.IdempotencyConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    if created or (job.status == JobStatus.queued.value and job.dispatched_at is None):
        # A retried submit also retries a send that failed the first time.
        svc.send(db, dispatcher.dispatch, job)
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    return svc.job_out(job)


@router.get("", response_model=Page[JobOut], summary="List jobs, newest first")
def list_jobs(
    db: DbDep,
    _: ReadKey,
    p: PagingDep,
    status_: Annotated[
        list[JobStatus] | None, Query(alias="status", description="repeatable")
    ] = None,
    kind: JobKind | None = None,
    dataset: str | None = None,
    arch: str | None = None,
    model_id: QueryId = None,
) -> Page[JobOut]:
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id)
    if status_:
        stmt = stmt.where(Job.status.in_([s.value for s in status_]))
    if kind:
        stmt = stmt.where(Job.kind == kind.value)
    if dataset:
        stmt = stmt.where(Job.dataset == dataset)
    if arch:
        stmt = stmt.where(Job.arch == arch)
    if model_id is not None:
        stmt = stmt.where(Job.model_id == model_id)
    return page(db, stmt, p, svc.job_out)


@router.get("/{job_id}", response_model=JobOut, summary="One job: status, progress, ETA, metrics")
def show(job_id: str, db: DbDep, _: ReadKey) -> JobOut:
    job = db.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return svc.job_out(job)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel a job",
)
def cancel(job_id: str, db: DbDep, _: WriteKey) -> JobOut:
    try:
        job = svc.cancel_job(db, job_id)
    except LookupError:
        raise not_found("job", job_id) from None
    except svc.JobStateConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return svc.job_out(job)


@router.get(
    "/{job_id}/events",
    summary="Live progress as Server-Sent Events",
    description="Events: `progress` (the job as JSON, whenever it changes) and a final `end`. "
    "Comments (`: keep-alive`) are sent every 15 s.",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def events(
    job_id: str, request: Request, db: DbDep, settings: SettingsDep, _: ReadKey
) -> StreamingResponse:
    if db.get(Job, job_id) is None:
        raise not_found("job", job_id)
    factory = request.app.state.sessionmaker

    def snapshot() -> JobOut | None:
        with factory() as s:
            job = s.get(Job, job_id)
            return svc.job_out(job) if job is not None else None

    async def stream() -> AsyncIterator[bytes]:
        last = None
        last_sent = time.monotonic()
        yield b"retry: 2000\n\n"
        while True:
            out = await anyio.to_thread.run_sync(snapshot)
            if out is None:
                yield b'event: end\ndata: {"status": "deleted"}\n\n'
                return
            data = out.model_dump_json(exclude={"links"})
            key = json.dumps(
                [out.status, out.progress.model_dump() if out.progress else None, out.attempts]
            )
            if key != last:
                last = key
                last_sent = time.monotonic()
                yield f"event: progress\ndata: {data}\n\n".encode()
            if JobStatus(out.status).terminal:
                yield f"event: end\ndata: {data}\n\n".encode()
                return
            if time.monotonic() - last_sent > 15:
                last_sent = time.monotonic()
                yield b": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await anyio.sleep(settings.sse_poll_s)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
