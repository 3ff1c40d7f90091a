"""Predict: ``POST /{compositions,modules,models}/{id}/predict`` with images, answered with the
most probable class names. Read scope is enough (nothing in the registry changes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth import ReadKey
from app.capacity import HeavyWork
from app.db.models import Composition, Model, ModelStatus, Module
from app.deps import DbDep, SettingsDep
from app.routers._common import not_found
from app.schemas.common import PathId
from app.schemas.predict import PredictOut
from app.services import predict as svc
from app.settings import Settings

TopK = Annotated[
    int | None,
    Query(ge=1, le=100_000, description="classes answered per image (default: the server's "
          "predict_top_k; at most the classifier's classes)"),
]


def _openapi(settings: Settings) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                        },
                        "required": ["files"],
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "array",
                        "description": "images, each C x H x W as the input spec (values in [0, 1])",
                        "items": {"type": "array"},
                        "maxItems": settings.predict_max_images,
                    }
                },
            },
        }
    }


def _description(settings: Settings, what: str) -> str:
    return (
        f"Classify images with {what}. Send PNG or JPEG files as `multipart/form-data` (one or "
        f"several `files` parts; at most {settings.predict_max_images} images of at most "
        f"{settings.predict_max_image_kb} KiB and {settings.predict_max_pixels} pixels each), or a "
        "JSON array of images already in the input spec's shape (C x H x W, values in [0, 1]). "
        "Files are converted to the spec's channels, resized bilinearly to its square size and "
        "scaled to [0, 1]; the network applies its own normalisation. Answers the `top_k` classes "
        "of each image, most probable first: softmax over the classifier's classes, or, for a "
        "one-class module, sigmoid of its single logit (see `scoring`)."
    )


async def _read_inputs(request: Request, settings: Settings) -> tuple[str, Any]:
    """``("files", [(name, bytes), ...])`` or ``("json", raw bytes)`` from the request body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = settings.predict_max_image_kb * 1024
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.predict_max_images, max_fields=16)
        except StarletteHTTPException as exc:
            if "files" in str(exc.detail).lower():
                raise HTTPException(
                    status.HTTP_413_CONTENT_TOO_LARGE,
                    f"too many files; at most {settings.predict_max_images} images per request",
                ) from None
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"bad multipart body: {exc.detail}") from None
        try:
            files: list[tuple[str, bytes]] = []
            for _, value in form.multi_items():
                if not isinstance(value, UploadFile):
                    continue  # plain form fields carry nothing for predict
                name = value.filename or f"#{len(files)}"
                data = await value.read(limit + 1)
                if len(data) > limit:
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE,
                        f"{name}: larger than the {settings.predict_max_image_kb} KiB allowed per image",
                    )
                files.append((name, data))
        finally:
            await form.close()
        if not files:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "no image files in the form; send them as `files` parts",
            )
        return "files", files
    if ctype == "application/json":
        return "json", await request.body()
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        "send PNG/JPEG files as multipart/form-data, or a JSON array of images (application/json)",
    )


def _answer(
    settings: Settings,
    cache: svc.ClassifierCache,
    kind: str,
    ident: int,
    artifact_path: str,
    sha256: str,
    inputs: tuple[str, Any],
    top_k: int | None,
) -> PredictOut:
    """Load (or reuse) the classifier, prepare the inputs by its spec and rank its classes."""
    try:
        clf = cache.load(settings, (kind, ident, sha256), artifact_path)
    except (FileNotFoundError, ValueError) as exc:
        raise HTTPException(
            status.HTTP_410_GONE, f"{kind} {ident}'s artifact cannot be loaded: {exc}"
        ) from None
    how, payload = inputs
    try:
        if how == "files":
            x = svc.prepare_files(payload, clf.spec, settings)
            names = [name for name, _ in payload]
        else:
            try:
                items = json.loads(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                raise svc.PredictInputError(f"the body is not valid JSON: {exc}") from None
            x = svc.json_batch(items, clf.spec, settings)
            names = [f"#{i}" for i in range(len(x))]
        ranked = svc.rank(clf, x, names, top_k or settings.predict_top_k)
    except svc.PredictInputError as exc:
        raise HTTPException(exc.status_code, str(exc)) from None
    return PredictOut(
        kind=kind,
        id=ident,
        sha256=sha256,
        class_names=clf.class_names,
        scoring=clf.scoring,
        input_spec=clf.spec.to_json(),
        predictions=ranked,
    )


# Per kind: ``(artifact path, sha256, state)`` of an id, or None when there is no such row.
Found = tuple[str | None, str | None, str | None]


def _composition(db: Session, ident: int) -> Found | None:
    c = db.get(Composition, ident)
    return None if c is None else (c.artifact_path, c.sha256, c.status)


def _module(db: Session, ident: int) -> Found | None:
    row = db.execute(  # a module is ready when its model is
        select(Module.artifact_path, Module.sha256, Model.status)
        .join(Model, Module.model_id == Model.id)
        .where(Module.id == ident)
    ).first()
    return None if row is None else (row[0], row[1], row[2])


def _model(db: Session, ident: int) -> Found | None:
    m = db.get(Model, ident)
    return None if m is None else (m.artifact_path, m.sha256, m.status)


LOOKUPS: dict[str, Callable[[Session, int], Found | None]] = {
    "composition": _composition, "module": _module, "model": _model,
}


def _ready(kind: str, ident: int, path: str | None, sha: str | None, state: str | None = None
           ) -> tuple[str, str]:
    if state is not None and state != ModelStatus.ready.value:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{kind} {ident} is {state}, not ready")
    if path is None or sha is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{kind} {ident} has no artifact yet")
    return path, sha


def build_router(settings: Settings) -> APIRouter:
    """The predict routes; their body limit and the classifier cache come from ``settings``."""
    router = APIRouter(tags=["predict"])
    cache = svc.ClassifierCache(settings.predict_cache_size)
    common: dict[str, Any] = {
        "response_model": PredictOut,
        "max_body_size": settings.predict_body_limit_bytes,
        "openapi_extra": _openapi(settings),
        "responses": {
            413: {"description": "too many or too large images"},
            415: {"description": "neither multipart/form-data nor application/json"},
            422: {"description": "not an image, or a JSON item of the wrong shape"},
        },
    }

    async def predict(
        kind: str, ident: int, request: Request, db: Session, s: Settings, top_k: int | None
    ) -> PredictOut:
        """What every predict route does: read the images, then (off the event loop: a DB
        lookup and inference) check the artifact is ready and answer with its classifier."""
        inputs = await _read_inputs(request, s)

        def run() -> PredictOut:
            found = LOOKUPS[kind](db, ident)
            if found is None:
                raise not_found(kind, ident)
            path, sha = _ready(kind, ident, *found)
            return _answer(s, cache, kind, ident, path, sha, inputs, top_k)

        return await run_in_threadpool(run)

    @router.post(
        "/compositions/{composition_id}/predict",
        summary="Classify images with a composition",
        description=_description(settings, "a composition"),
        **common,
    )
    async def predict_composition(
        composition_id: PathId, request: Request, db: DbDep, s: SettingsDep, _: ReadKey,
        _work: HeavyWork, top_k: TopK = None,
    ) -> PredictOut:
        return await predict("composition", composition_id, request, db, s, top_k)

    @router.post(
        "/modules/{module_id}/predict",
        summary="Classify images with a module",
        description=_description(settings, "a module (its classes only)"),
        **common,
    )
    async def predict_module(
        module_id: PathId, request: Request, db: DbDep, s: SettingsDep, _: ReadKey,
        _work: HeavyWork, top_k: TopK = None,
    ) -> PredictOut:
        return await predict("module", module_id, request, db, s, top_k)

    @router.post(
        "/models/{model_id}/predict",
        summary="Classify images with a full model",
        description=_description(settings, "a full model"),
        **common,
    )
    async def predict_model(
        model_id: PathId, request: Request, db: DbDep, s: SettingsDep, _: ReadKey,
        _work: HeavyWork, top_k: TopK = None,
    ) -> PredictOut:
        return await predict("model", model_id, request, db, s, top_k)

    router.classifier_cache = cache  # type: ignore[attr-defined]  # for tests and metrics
    return router
