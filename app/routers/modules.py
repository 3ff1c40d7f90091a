"""Per-class modules across all ready models: query, show, download (ETag = sha256, Range resume)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy import select

from app import storage
from app.auth import ReadKey
from app.capacity import HeavyWork
from app.db.models import Model, ModelStatus, Module
from app.deps import DbDep, SettingsDep
from app.files import artifact_response
from app.paths import API_PREFIX
from app.routers._common import PagingDep, not_found, page, sort_pattern, sorted_by
from app.routers._export import EXPORT_DESCRIPTION, EXPORT_RESPONSES, FormatQuery, export_response
from app.schemas.common import Page, PathId, QueryId, QueryIndex
from app.schemas.modules import ModuleOut

router = APIRouter(prefix="/modules", tags=["modules"])

SORTS = {
    "krr": Module.krr,
    "accuracy": Module.accuracy,
    "created": Module.created_at,
    "id": Module.id,
}


def module_out(m: Module) -> ModuleOut:
    out = ModuleOut.model_validate(m)
    out.download_url = f"{API_PREFIX}/modules/{m.id}/download"
    return out


@router.get("", response_model=Page[ModuleOut], summary="Query modules across models")
def query(
    db: DbDep,
    _: ReadKey,
    p: PagingDep,
    dataset: str | None = None,
    arch: str | None = None,
    model_id: QueryId = None,
    class_name: str | None = None,
    class_index: QueryIndex = None,
    max_krr: Annotated[
        float | None, Query(ge=0, le=1, description="kernel retention rate at most")
    ] = None,
    min_accuracy: Annotated[
        float | None,
        Query(ge=0, le=1, description="the model's test accuracy on this class at least"),
    ] = None,
    sort: Annotated[
        str,
        Query(
            description="krr|accuracy|created|id, '-' prefix for descending",
            pattern=sort_pattern(SORTS),
        ),
    ] = "id",
) -> Page[ModuleOut]:
    stmt = (
        select(Module)
        .join(Model, Module.model_id == Model.id)
        .where(Model.status == ModelStatus.ready.value)
    )
    if dataset:
        stmt = stmt.where(Module.dataset == dataset)
    if arch:
        stmt = stmt.where(Module.arch == arch)
    if model_id is not None:
        stmt = stmt.where(Module.model_id == model_id)
    if class_name is not None:
        stmt = stmt.where(Module.class_name == class_name)
    if class_index is not None:
        stmt = stmt.where(Module.class_index == class_index)
    if max_krr is not None:
        stmt = stmt.where(Module.krr <= max_krr)
    if min_accuracy is not None:
        stmt = stmt.where(Module.accuracy >= min_accuracy)
    stmt = sorted_by(stmt, sort, SORTS, Module.id)
    return page(db, stmt, p, module_out)


def _get(db: DbDep, module_id: int) -> Module:
    m = db.get(Module, module_id)
    if m is None:
        raise not_found("module", module_id)
    return m


@router.get("/{module_id}", response_model=ModuleOut, summary="One module")
def show(module_id: PathId, db: DbDep, _: ReadKey) -> ModuleOut:
    return module_out(_get(db, module_id))


@router.get(
    "/{module_id}/manifest",
    summary="The module's manifest (structure, classes, input spec, metrics)",
)
def manifest(module_id: PathId, db: DbDep, settings: SettingsDep, _: ReadKey) -> dict[str, Any]:
    m = _get(db, module_id)
    path = storage.resolve(settings.artifacts, m.artifact_path) / "manifest.json"
    if not path.is_file():
        raise HTTPException(
            status.HTTP_410_GONE, f"module {module_id}'s manifest is missing from the store"
        )
    return json.loads(path.read_text())


@router.head("/{module_id}/download", include_in_schema=False)
@router.get(
    "/{module_id}/download",
    summary="Download a module (tar: weights.safetensors + manifest.json)",
    description="`ETag` is the archive's sha256 (also in `X-Checksum-Sha256`); send `If-None-Match` for 304 and "
    "`Range: bytes=N-` to resume (206).",
    response_class=Response,
)
def download(
    module_id: PathId, request: Request, db: DbDep, settings: SettingsDep, _: ReadKey
) -> Response:
    row = db.execute(
        select(
            Module.sha256,
            Module.artifact_path,
            Module.class_index,
            Module.class_name,
            Model.name,
            Model.version,
        )
        .join(Model, Module.model_id == Model.id)
        .where(Module.id == module_id)
    ).first()
    if row is None:
        raise not_found("module", module_id)
    sha, rel, idx, cname, mname, version = row
    tar = storage.tar_path(storage.resolve(settings.artifacts, rel))
    return artifact_response(request, tar, sha, f"{mname}-v{version}-class{idx}.tar")


@router.head("/{module_id}/export", include_in_schema=False)
@router.get(
    "/{module_id}/export",
    summary="Download a module as TorchScript or ONNX (runs without this project)",
    description=EXPORT_DESCRIPTION,
    response_class=Response,
    responses=EXPORT_RESPONSES,
)
def export(
    module_id: PathId,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    _: ReadKey,
    _work: HeavyWork,
    fmt: FormatQuery = "torchscript",
) -> Response:
    row = db.execute(
        select(Module.sha256, Module.artifact_path, Module.class_index, Model.name, Model.version)
        .join(Model, Module.model_id == Model.id)
        .where(Module.id == module_id)
    ).first()
    if row is None:
        raise not_found("module", module_id)
    sha, rel, idx, mname, version = row
    return export_response(
        request, settings, f"module {module_id}", rel, sha, fmt, f"{mname}-v{version}-class{idx}"
    )
