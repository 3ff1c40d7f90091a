"""The FastAPI application factory: ``create_app(settings)``.

``uvicorn --factory app.main:create_app`` builds it from the environment (MWT_* variables).
This is a composition root: it picks the job dispatcher and starts the reaper from ``worker/``;
the rest of ``app/`` only sees the ``Dispatcher`` protocol.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app import __doc__ as app_doc
from app.auth import KeyCache, KeyFirstMiddleware
from app.capacity import WorkPool
from app.db.session import make_engine, make_sessionmaker
from app.observability import Metrics, MetricsMiddleware
from app.paths import API_PREFIX
from app.redact import path_scrubber
from app.response_cache import ResponseCacheMiddleware
from app.services.compose import ModelCache
from app.services.datasets import BundleCache
from app.settings import Settings, get_settings
from worker.dispatch import make_dispatcher
from worker.reaper import reap_until

log = logging.getLogger(__name__)
# Read-only registry resources whose answers the response cache may replay (app.response_cache).
REGISTRY_READS = ("models", "modules", "compositions", "datasets", "architectures")


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",)) or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        probe = {**scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in app.router.routes):
            methods.add(method)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    scrub = path_scrubber(settings)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            headers["Allow"] = ", ".join(_allowed_methods(app, dict(request.scope)))
        if exc.status_code in (status.HTTP_204_NO_CONTENT, status.HTTP_304_NOT_MODIFIED):
            return Response(status_code=exc.status_code, headers=headers)
        detail = exc.detail
        if isinstance(detail, str):
            detail = scrub(detail)
        return JSONResponse(status_code=exc.status_code, content={"detail": detail}, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            content={"detail": scrub(_describe_validation(exc)), "errors": errors},
        )

    @app.exception_handler(IntegrityError)
    async def integrity_error(_: Request, exc: IntegrityError) -> JSONResponse:
        log.warning("integrity error: %s", exc.orig)
        return JSONResponse(
            status_code=status.HTTP_409_CONFLICT,
            content={"detail": "conflict with the current state of the registry; reload and retry"},
        )

    @app.exception_handler(DataError)
    @app.exception_handler(OverflowError)
    async def out_of_range(_: Request, exc: Exception) -> JSONResponse:
        log.warning("value rejected by the database: %s", exc)
        return JSONResponse(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            content={
                "detail": "the request holds a value the registry cannot store "
                "(a number out of range or a NUL character)"
            },
        )

    @app.exception_handler(OperationalError)
    async def db_unavailable(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc.orig)
        return JSONResponse(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            content={"detail": "the registry database is unavailable; retry shortly"},
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
            content={"detail": "internal error; the server log has the details"},
        )


_BODY_METHODS = {"post", "put", "patch"}
_WRITE_METHODS = _BODY_METHODS | {"delete"}


def _document_errors(app: FastAPI, settings: Settings) -> None:
    """Make the OpenAPI document say what the API answers.

    Errors come from shared machinery rather than each route (the key check, request
    validation, the database handlers, the body limit, artifact downloads), so they are
    documented by the same rules that raise them: every error body is ``ErrorOut``, and
    ``limit`` carries the bound ``paging`` enforces (a setting, so not known to the routers).
    """
    from fastapi.openapi.utils import get_openapi

    from app.schemas.common import ErrorOut, error_responses

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        err_schema = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in err_schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components["ErrorOut"] = err_schema
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        ref = {"$ref": "#/components/schemas/ErrorOut"}
        for path, ops in doc.get("paths", {}).items():
            if not path.startswith(API_PREFIX + "/"):
                continue
            for method, op in ops.items():
                codes = {401, 403, 422, 503}
                if "{" in path:
                    codes.add(404)
                if method in _WRITE_METHODS:
                    codes.add(409)  # a concurrent change of the same rows (IntegrityError)
                if method in _BODY_METHODS:
                    codes.add(413)  # the body limit (MWT_MAX_JSON_KB / MWT_MAX_UPLOAD_MB)
                if "requestBody" in op:
                    codes.add(400)  # a body that cannot be parsed at all (not UTF-8, not multipart)
                    body_ref = (
                        op["requestBody"].get("content", {}).get("application/json", {})
                        .get("schema", {}).get("$ref", "")
                    )
                    body = components.get(body_ref.rsplit("/", 1)[-1], {})
                    if "model_id" in body.get("properties", {}):
                        codes.add(404)  # the body names a model that may not exist
                if path.endswith(("/download", "/torchscript", "/manifest")):
                    codes |= {409, 410}
                responses = op.setdefault("responses", {})
                for code, spec in error_responses(*sorted(codes)).items():
                    responses.setdefault(str(code), {"description": spec["description"]})
                for code, spec in responses.items():
                    if code[0] in "45":
                        spec["content"] = {"application/json": {"schema": ref}}
                if path.endswith(("/download", "/torchscript")):
                    responses.setdefault("206", {"description": "the requested byte range"})
                    responses.setdefault("304", {"description": "not modified (If-None-Match)"})
                    responses.setdefault(
                        "416", {"description": "the requested range is not satisfiable"}
                    )
                for param in op.get("parameters", []):
                    if param.get("name") == "limit" and param.get("in") == "query":
                        param["schema"]["maximum"] = settings.page_size_max
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, *, run_executor: bool | None = None) -> FastAPI:
    """Build the API. ``run_executor`` (default: embedded mode) starts the in-process job executor."""
    settings = settings or get_settings()
    settings.ensure_dirs()
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    run_executor = settings.embedded if run_executor is None else run_executor
    dispatcher = make_dispatcher(settings, factory, run_executor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from app.auth import ensure_admin_key
        from app.db.migrate import is_up_to_date

        if not is_up_to_date(engine):
            log.warning("the database schema is not at the latest migration; run `mwt migrate`")
        elif settings.bootstrap_admin_key:
            ensure_admin_key(factory, settings)
        dispatcher.start()
        stop = threading.Event()
        reaper = None
        if settings.reaper_interval_s > 0 and not run_executor:  # the executor reaps on its own
            reaper = threading.Thread(
                target=reap_until,
                args=(stop, factory, settings, dispatcher.requeue),
                name="mwt-reaper",
                daemon=True,
            )
            reaper.start()
        try:
            yield
        finally:
            stop.set()
            if reaper is not None:
                reaper.join(timeout=5)
            dispatcher.stop()
            engine.dispose()

    app = FastAPI(
        title="MwT Hub",
        version="0.1.0",
        description=(app_doc or "")
        + "\n\nTrain CNNs with Modularizing-while-Training, browse per-class modules, download them and "
        "compose classifiers for any subset of classes. Authenticate with `Authorization: Bearer <key>`.",
        lifespan=lifespan,
        docs_url=None,  # served offline by app.routers.ui
        redoc_url=None,
        max_body_size=settings.max_json_kb * 1024,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = factory
    app.state.dispatcher = dispatcher
    app.state.key_cache = KeyCache(settings.key_cache_s)
    app.state.model_cache = ModelCache(settings.compose_cache_models)
    app.state.bundle_cache = BundleCache()
    app.state.metrics = Metrics(factory)
    from app.routers.jobs import StreamSlots

    app.state.stream_slots = StreamSlots(settings.sse_max_streams, settings.sse_max_streams_per_key)
    app.state.work_pool = WorkPool(settings.heavy_workers, settings.heavy_queue, settings.heavy_wait_s)

    from app.routers import (
        compositions,
        datasets,
        health,
        jobs,
        keys,
        meta,
        models,
        modules,
        weights,
    )
    from app.routers.predict import build_router as predict_router

    app.include_router(health.router)
    app.include_router(health.router, prefix=API_PREFIX, include_in_schema=False)
    for module in (meta, keys, jobs, models, modules, compositions, weights):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(datasets.build_router(settings), prefix=API_PREFIX)
    app.include_router(predict_router(settings), prefix=API_PREFIX)
    from app.routers.ui import install as install_ui

    install_ui(app, API_PREFIX)  # dashboard at /, offline /docs, the dashboard's read-only views
    _install_error_handlers(app, settings)
    _document_errors(app, settings)
    # Inside the key check (added first = innermost): every replayed answer was authorised.
    app.add_middleware(
        ResponseCacheMiddleware,
        prefixes=[f"{API_PREFIX}/{r}" for r in REGISTRY_READS],
        ttl_s=settings.response_cache_s,
    )
    app.add_middleware(
        KeyFirstMiddleware,
        prefix=API_PREFIX,
        open_paths=[API_PREFIX + getattr(r, "path", "") for r in health.router.routes],
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
