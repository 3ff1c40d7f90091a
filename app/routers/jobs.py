"""Training jobs: submit (202), list, show with progress and ETA, cancel, live progress (SSE)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.background import BackgroundTask

from app.auth import ReadKey, WriteKey, can_see, ensure_owner, visible_to
from app.db.models import Dataset, Job, JobKind, JobStatus, Model
from app.deps import DbDep, DispatcherDep, SettingsDep
from app.paths import API_PREFIX
from app.routers._common import PagingDep, not_found, page
from app.schemas.common import Page, QueryId, error_responses
from app.schemas.jobs import JobCreate, JobOut
from app.services import datasets as datasets_svc
from app.services import jobs as svc
from app.services import weights as weights_svc

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
    from mwt_core.models import (
        UnknownArchitecture,
        check_architecture,
        default_width,
        list_architectures,
    )

    try:
        if body.width is None:  # the architecture's own default, valid for it by construction
            body.width = default_width(body.arch)
        arch = check_architecture(body.arch, body.width).name
    except UnknownArchitecture:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"unknown architecture {body.arch!r}; choose one of {', '.join(list_architectures())}",
        ) from None
    except ValueError as exc:  # a fixed-width or refused architecture
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    try:
        _, upload = datasets_svc.resolve(
            db, settings, body.dataset,
            lambda q: visible_to(q, Dataset.api_key_id, principal, settings),
        )
    except (datasets_svc.DatasetNotFound, datasets_svc.DatasetUnavailable) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    if body.init_from is not None or body.init_from_model is not None:
        info = upload if upload is not None else datasets_svc.builtin_infos(settings)[body.dataset]
        try:  # the first mismatched tensor is named here, not when a worker picks the job up
            if body.init_from is not None:
                path, what = weights_svc.weights_path(settings, body.init_from), weights_svc.upload_label(body.init_from)
            else:
                assert body.init_from_model is not None
                base = db.get(Model, body.init_from_model)
                if base is not None and not can_see(principal, base.api_key_id, settings):
                    base = None  # a private registry's other models are not there for this key
                path = weights_svc.model_weights_path(settings, base, body.init_from_model)
                what = weights_svc.model_label(body.init_from_model)
            weights_svc.check_for_job(
                path, what, arch, body.width, body.modular,
                num_classes=info.num_classes,  # type: ignore[attr-defined]
                channels=info.channels,  # type: ignore[attr-defined]
                input_size=upload.input_size if upload is not None else info.size,  # type: ignore[attr-defined]
            )
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    params = body.model_dump()
    params["arch"] = arch
    try:
        job, created = svc.create_job(
            db,
            kind=JobKind.train,
            params=params,
            queue=settings.queue_for("train"),
            max_attempts=settings.max_job_attempts,
            max_starts=settings.max_job_starts,
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
    response.headers["Location"] = f"{API_PREFIX}/jobs/{job.id}"
    return svc.job_out(job)


@router.get("", response_model=Page[JobOut], summary="List jobs, newest first")
def list_jobs(
    db: DbDep,
    settings: SettingsDep,
    principal: ReadKey,
    p: PagingDep,
    status_: Annotated[
        list[JobStatus] | None, Query(alias="status", description="repeatable")
    ] = None,
    kind: JobKind | None = None,
    dataset: str | None = None,
    arch: str | None = None,
    model_id: QueryId = None,
) -> Page[JobOut]:
    stmt = visible_to(select(Job).order_by(Job.created_at.desc(), Job.id), Job.api_key_id, principal, settings)
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
def cancel(job_id: str, db: DbDep, principal: WriteKey) -> JobOut:
    job = db.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    ensure_owner(principal, job.api_key_id, f"job {job_id}")
    try:
        job = svc.cancel_job(db, job_id)
    except LookupError:
        raise not_found("job", job_id) from None
    except svc.JobStateConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return svc.job_out(job)


class StreamSlots:
    """Counts the progress streams open in this process, in all and per key.

    Each stream holds a connection and polls the registry: without a cap a single read key
    could open hundreds and starve every other request of threads and DB connections.
    """

    def __init__(self, total: int, per_key: int) -> None:
        self.total = total
        self.per_key = per_key
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}

    def acquire(self, key_id: int) -> Callable[[], None]:
        """Take a slot for ``key_id`` (HTTP 429 when full); returns its (idempotent) release."""
        with self._lock:
            if sum(self._open.values()) >= self.total:
                raise HTTPException(
                    status.HTTP_429_TOO_MANY_REQUESTS,
                    f"{self.total} progress streams are open on this server (MWT_SSE_MAX_STREAMS); "
                    "retry later or poll GET /jobs/{id}",
                    headers={"Retry-After": "5"},
                )
            if self._open.get(key_id, 0) >= self.per_key:
                raise HTTPException(
                    status.HTTP_429_TOO_MANY_REQUESTS,
                    f"this API key already has {self.per_key} progress streams open "
                    "(MWT_SSE_MAX_STREAMS_PER_KEY); close one or poll GET /jobs/{id}",
                    headers={"Retry-After": "5"},
                )
            self._open[key_id] = self._open.get(key_id, 0) + 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                left = self._open.get(key_id, 0) - 1
                if left > 0:
                    self._open[key_id] = left
                else:
                    self._open.pop(key_id, None)

        return release

    def open_streams(self) -> int:
        with self._lock:
            return sum(self._open.values())


@router.get(
    "/{job_id}/events",
    summary="Live progress as Server-Sent Events",
    description="Events: `progress` (the job as JSON, whenever it changes) and a final `end` "
    "(the job's last state; `ended` says why the stream stopped: `finished`, `deleted`, "
    "`queued_too_long` or `max_duration`). Comments (`: keep-alive`) are sent every 15 s. "
    "Streams are capped per key and per server (429 past the cap); a stream lasts at most "
    "MWT_SSE_MAX_DURATION_S and ends when the job stays queued past MWT_SSE_QUEUED_TIMEOUT_S.",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        **error_responses(404, 429),
    },
)
async def events(
    job_id: str, request: Request, settings: SettingsDep, principal: ReadKey
) -> StreamingResponse:
    # No DbDep here: a dependency's session would stay checked out until the stream ends.
    factory = request.app.state.sessionmaker

    def snapshot() -> JobOut | None:
        with factory() as s:
            job = s.get(Job, job_id)
            return svc.job_out(job) if job is not None else None

    if await anyio.to_thread.run_sync(snapshot) is None:
        raise not_found("job", job_id)
    release = request.app.state.stream_slots.acquire(principal.key_id)

    def end(out: JobOut, why: str) -> bytes:
        data = json.loads(out.model_dump_json(exclude={"links"}))
        return f"event: end\ndata: {json.dumps({**data, 'ended': why}, separators=(',', ':'))}\n\n".encode()

    async def stream() -> AsyncIterator[bytes]:
        try:
            last = None
            started = last_sent = time.monotonic()
            yield b"retry: 2000\n\n"
            while True:
                out = await anyio.to_thread.run_sync(snapshot)
                if out is None:
                    yield b'event: end\ndata: {"status":"deleted","ended":"deleted"}\n\n'
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
                    yield end(out, "finished")
                    return
                now = time.monotonic()
                if (
                    out.status == JobStatus.queued.value
                    and now - started > settings.sse_queued_timeout_s
                ):
                    yield end(out, "queued_too_long")
                    return
                if now - started > settings.sse_max_duration_s:
                    yield end(out, "max_duration")
                    return
                if now - last_sent > 15:
                    last_sent = now
                    yield b": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                await anyio.sleep(settings.sse_poll_s)
        finally:
            release()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(release),  # also when the stream never started
    )
