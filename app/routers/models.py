"""Registered models: immutable numbered versions with metrics, tags and their modules."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import StringConstraints
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from app import storage
from app.auth import ReadKey, WriteKey, ensure_owner, visible_to
from app.capacity import HeavyWork
from app.db.models import Composition, Job, Model
from app.deps import DbDep, SettingsDep
from app.files import artifact_response
from app.paths import API_PREFIX
from app.routers._common import PagingDep, not_found, page, sort_pattern, sorted_by
from app.routers._export import EXPORT_DESCRIPTION, EXPORT_RESPONSES, FormatQuery, export_response
from app.routers.modules import module_out
from app.schemas.common import Page, PathId
from app.schemas.models import ModelDetail, ModelOut, ModelPatch
from app.services import compose as compose_svc
from app.services import jobs as jobs_svc

router = APIRouter(prefix="/models", tags=["models"])

SORTS = {
    "created": Model.created_at,
    "accuracy": Model.accuracy,
    "krr": Model.krr,
    "version": Model.version,
}


def model_out(m: Model) -> ModelOut:
    out = ModelOut.model_validate(m)
    if m.artifact_path:
        out.download_url = f"{API_PREFIX}/models/{m.id}/download"
    return out


@router.get("", response_model=Page[ModelOut], summary="List and filter models")
def list_models(
    db: DbDep,
    settings: SettingsDep,
    principal: ReadKey,
    p: PagingDep,
    dataset: str | None = None,
    arch: str | None = None,
    name: str | None = None,
    status_: Annotated[
        Literal["ready", "pending", "failed", "cancelled", "any"],
        Query(alias="status", description="default: ready"),
    ] = "ready",
    min_accuracy: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_krr: Annotated[float | None, Query(ge=0, le=1)] = None,
    tag: Annotated[
        list[Annotated[str, StringConstraints(pattern=r"^[^=]+=")]] | None,
        Query(description="key=value, repeatable"),
    ] = None,
    sort: Annotated[
        str,
        Query(
            description="created|accuracy|krr|version, '-' prefix for descending",
            pattern=sort_pattern(SORTS),
        ),
    ] = "-created",
) -> Page[ModelOut]:
    stmt = visible_to(select(Model), Model.api_key_id, principal, settings)
    if status_ != "any":
        stmt = stmt.where(Model.status == status_)
    if dataset:
        stmt = stmt.where(Model.dataset == dataset)
    if arch:
        stmt = stmt.where(Model.arch == arch)
    if name:
        stmt = stmt.where(Model.name == name)
    if min_accuracy is not None:
        stmt = stmt.where(Model.accuracy >= min_accuracy)
    if max_krr is not None:
        stmt = stmt.where(Model.krr <= max_krr)
    for t in tag or []:
        key, sep, value = t.partition("=")
        if not sep or not key:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"tag filter {t!r} must look like key=value"
            )
        stmt = stmt.where(Model.tags[key].as_string() == value)
    stmt = sorted_by(stmt, sort, SORTS, Model.id)
    return page(db, stmt, p, model_out)


def _get(db: DbDep, model_id: int) -> Model:
    model = db.get(
        Model, model_id, options=[selectinload(Model.modules), selectinload(Model.compositions)]
    )
    if model is None:
        raise not_found("model", model_id)
    return model


@router.get(
    "/{model_id}", response_model=ModelDetail, summary="One model with its modules and metrics"
)
def show(model_id: PathId, db: DbDep, _: ReadKey) -> ModelDetail:
    m = _get(db, model_id)
    base = model_out(m).model_dump()
    return ModelDetail(
        **base,
        config=m.config,
        input_spec=m.input_spec,
        metrics=m.metrics,
        modules=[module_out(x) for x in m.modules],
        compositions=[c.id for c in m.compositions],
    )


@router.patch("/{model_id}", response_model=ModelOut, summary="Set or remove tags")
def patch(model_id: PathId, body: ModelPatch, db: DbDep, principal: WriteKey) -> ModelOut:
    m = _get(db, model_id)
    ensure_owner(principal, m.api_key_id, f"model {model_id}")
    tags = dict(m.tags)
    for k, v in body.tags.items():
        if not k or len(k) > 64 or (v is not None and len(v) > 256):
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "tag keys: 1-64 characters; values: at most 256",
            )
        if v is None:
            tags.pop(k, None)
        else:
            tags[k] = v
    m.tags = tags
    db.commit()
    return model_out(m)


@router.head("/{model_id}/download", include_in_schema=False)  # the client's resume check
@router.get(
    "/{model_id}/download",
    summary="Download the full model (tar: weights.safetensors + manifest.json, which holds the "
    "modularization)",
    response_class=Response,
)
def download(
    model_id: PathId, request: Request, db: DbDep, settings: SettingsDep, _: ReadKey
) -> Response:
    m = db.get(Model, model_id)
    if m is None:
        raise not_found("model", model_id)
    if m.artifact_path is None or m.sha256 is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"model {model_id} is {m.status}; nothing to download yet"
        )
    path = storage.tar_path(storage.resolve(settings.artifacts, m.artifact_path))
    return artifact_response(request, path, m.sha256, f"{m.name}-v{m.version}.tar")


@router.head("/{model_id}/export", include_in_schema=False)
@router.get(
    "/{model_id}/export",
    summary="Download the full model as TorchScript or ONNX (runs without this project)",
    description=EXPORT_DESCRIPTION,
    response_class=Response,
    responses=EXPORT_RESPONSES,
)
def export(
    model_id: PathId,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    _: ReadKey,
    _work: HeavyWork,
    fmt: FormatQuery = "torchscript",
) -> Response:
    m = db.get(Model, model_id)
    if m is None:
        raise not_found("model", model_id)
    return export_response(
        request, settings, f"model {model_id}", m.artifact_path, m.sha256, fmt,
        f"{m.name}-v{m.version}",
    )


@router.delete(
    "/{model_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a model and its modules"
)
def delete(
    model_id: PathId,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    principal: WriteKey,
    force: Annotated[
        bool, Query(description="also delete what depends on it and cancel its jobs")
    ] = False,
) -> None:
    m = _get(db, model_id)
    ensure_owner(principal, m.api_key_id, f"model {model_id}")
    active = db.scalars(
        select(Job.id).where(
            Job.status.in_(jobs_svc.ACTIVE),
            (Job.model_id == model_id) | (Job.params["model_id"].as_integer() == model_id)
            | (Job.params["init_from_model"].as_integer() == model_id),
        )
    ).all()
    dependents = db.scalars(
        select(Composition).where(compose_svc.uses_model(model_id)).order_by(Composition.id)
    ).all()
    comps = [c.id for c in dependents]
    if (active or comps) and not force:
        parts = []
        if active:
            parts.append(f"active job(s) {', '.join(active)}")
        if comps:
            parts.append(f"composition(s) {', '.join(map(str, comps))}")
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"model {model_id} is used by {' and '.join(parts)}; delete those first or pass force=true",
        )
    # force reaches what depends on the model: it must be the caller's too (or the caller admin).
    for c in dependents:
        ensure_owner(principal, c.api_key_id, f"composition {c.id} (built on model {model_id})")
    for job in db.scalars(select(Job).where(Job.id.in_(active))):
        ensure_owner(principal, job.api_key_id, f"job {job.id} (using model {model_id})")
    jobs_svc.request_cancel(db, active)
    comp_paths = [c.artifact_path for c in dependents if c.artifact_path]
    for c in dependents:
        db.delete(c)
    db.delete(m)
    db.commit()
    request.app.state.model_cache.forget_model(model_id)
    storage.remove_tree(storage.model_dir(settings.artifacts, model_id))
    for rel in comp_paths:
        storage.remove_tree(storage.resolve(settings.artifacts, rel).parent)
