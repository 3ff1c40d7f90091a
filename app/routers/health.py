"""Liveness, readiness and Prometheus metrics (no API key needed)."""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.db.migrate import current_revision, head_revision

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: the process answers")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Readiness: DB reachable and migrated, artifact store writable, broker reachable",
)
def ready(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    checks: dict[str, str] = {}
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        rev, head = current_revision(request.app.state.engine), head_revision()
        checks["database"] = (
            "ok" if rev == head else f"schema at {rev}, expected {head}: run `mwt migrate`"
        )
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        settings.artifacts.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=settings.artifacts, prefix=".ready")
        os.close(fd)
        os.unlink(path)
        checks["artifact_store"] = "ok"
    except OSError as exc:
        checks["artifact_store"] = f"not writable: {exc.strerror}"
    problem = request.app.state.dispatcher.check()
    checks["jobs"] = problem or "ok"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {
            "status": "ready" if ok else "not ready",
            "mode": "embedded" if settings.embedded else "distributed",
            "checks": checks,
        },
        status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
