"""Compositions: a classifier for chosen classes of one model or several, built from their modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy import select

from app import storage
from app.auth import Principal, ReadKey, WriteKey, ensure_owner, visible_to
from app.capacity import HeavyWork
from app.db.models import Composition, JobKind, Model, ModelStatus, Module
from app.deps import DbDep, DispatcherDep, SettingsDep
from app.files import artifact_response
from app.paths import API_PREFIX
from app.routers._common import PagingDep, not_found, page
from app.routers._export import EXPORT_DESCRIPTION, EXPORT_RESPONSES, FormatQuery, export_response
from app.schemas.common import Page, PathId, QueryId
from app.schemas.compositions import CompositionCreate, CompositionOut
from app.services import compose as svc
from app.services import jobs as jobs_svc
from app.settings import Settings
from mwt_core.config import AUTO_TAU, validation_fraction

router = APIRouter(prefix="/compositions", tags=["compositions"])


def composition_out(c: Composition) -> CompositionOut:
    out = CompositionOut.model_validate(c)
    metrics = c.metrics or {}
    out.tau, out.margin_pp = metrics.get("tau"), metrics.get("margin_pp")
    if c.accuracy is not None and c.baseline_accuracy is not None:
        out.accuracy_loss = c.baseline_accuracy - c.accuracy
    if c.artifact_path:
        out.download_url = f"{API_PREFIX}/compositions/{c.id}/download"
    return out


@router.post(
    "",
    response_model=CompositionOut,
    status_code=status.HTTP_201_CREATED,
    summary="Compose a classifier for some classes of one model or several",
    description="`model_id` + `classes`: the module of those classes is cut from the model (no training). "
    "`sources`: one module per model, side by side, their outputs combined by `combine` (default: "
    "the best method measured; models that learned different classes need an open-set method), the "
    "labelled methods fitted on `calibration_per_class` training images per class (the models must "
    "take images of one shape). One model's classes: `tau` \"auto\" (the default for a model trained "
    "with a validation slice) cuts the smallest module whose validation accuracy stays within "
    "`margin_pp` points of the full model's on those classes; a number cuts at that threshold "
    "(the default without a slice: the model's own). `modules`: stored per-class modules (ids from GET /modules, of one "
    "model or several, in output order) become the parts themselves, combined and fitted the same "
    "way; a client that downloads the same modules rebuilds this classifier to 1e-5 "
    "(`mwt compose-local DIR...`). Where the registry holds a standard model of the same dataset and "
    "architecture, `metrics.standard_accuracy_loss` is the accuracy lost against it. Either way the classifier is "
    "measured on the test split(s) at once: 201 (200 if the same composition exists). With `finetune` "
    "(one model only), or with more sources or modules than the server composes within a request "
    "(MWT_COMPOSE_INLINE_MAX_PARTS), a job is started: 202 with the job; its `composition_id` names "
    "the result once it has succeeded.",
    responses={
        200: {"description": "the same composition already existed"},
        202: {"description": "a job: fine-tuning, or a composition of more parts than "
              "MWT_COMPOSE_INLINE_MAX_PARTS"},
    },
)
def create(
    body: CompositionCreate,
    request: Request,
    response: Response,
    db: DbDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    principal: WriteKey,
    _work: HeavyWork,
) -> CompositionOut | JSONResponse:
    if body.modules is not None:
        return _create_from_modules(body, body.modules, request, response, db, settings, dispatcher,
                                    principal)
    chosen = [_resolve(db, src.model_id, src.classes) for src in body.source_list()]
    tau = _module_tau(body, chosen[0][0]) if len(chosen) == 1 else None
    if body.finetune is not None:
        model, classes = chosen[0]  # the schema allows finetune with one source only
        return _start_finetune(db, settings, dispatcher, principal, model, classes, body, tau)

    key = svc.sources_key([(m.id, c) for m, c in chosen], body.calibration_per_class, body.combine,
                          svc.tau_suffix(tau, body.margin_pp, chosen[0][0].tau))
    existing = db.scalar(
        select(Composition).where(
            Composition.model_id == chosen[0][0].id,
            Composition.classes_key == key,
            Composition.finetuned.is_(False),
        )
    )
    if existing is not None:
        response.status_code = status.HTTP_200_OK
        return composition_out(existing)
    if len(chosen) > settings.compose_inline_max_parts:
        params = {"sources": [[m.id, c] for m, c in chosen]}
        return _start_compose(db, settings, dispatcher, principal, body, params, key, chosen[0][0])
    with _composing():
        comp = svc.compose_sources(db, settings, _inputs(request, settings, db), chosen,
                                   body.calibration_per_class, body.combine, key, tau=tau,
                                   margin_pp=body.margin_pp)
    return _created(db, settings, response, principal, comp)


def _module_tau(body: CompositionCreate, model: Model) -> float | str | None:
    """The threshold of one model's module as the request decides it: "auto" or a number;
    by default "auto" where the model was trained with a validation slice, else its own tau.
    "auto" asked of a model without a slice is refused (422) before anything is loaded."""
    has_slice = validation_fraction(model.config) > 0
    if body.tau is None:
        return AUTO_TAU if has_slice else model.tau
    if body.tau == AUTO_TAU and not has_slice:
        own = f" (the model's own is {model.tau:g})" if model.tau is not None else ""
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"tau {AUTO_TAU!r}: model {model.id} was trained without a validation slice "
            "(val_fraction 0, or trained before the slice existed), so there is nothing to "
            f"choose tau on: give tau as a number in (0, 1]{own} or train the model again "
            "with val_fraction > 0",
        )
    return body.tau


def _resolve(db: DbDep, model_id: int, wanted: list[int | str]) -> tuple[Model, list[int]]:
    """A ready MwT model and the indices of the wanted classes, or the 4xx that says why not."""
    model = db.get(Model, model_id)
    if model is None:
        raise not_found("model", model_id)
    if model.status != ModelStatus.ready.value:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"model {model.id} is {model.status}, not ready"
        )
    if not model.modular:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"model {model.id} was trained without MwT (modular=false): it has no modules to compose",
        )
    try:
        return model, svc.resolve_classes(model, wanted)
    except svc.CompositionError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def _create_from_modules(
    body: CompositionCreate,
    module_ids: list[int],
    request: Request,
    response: Response,
    db: DbDep,
    settings: Settings,
    dispatcher: DispatcherDep,
    principal: Principal,
) -> CompositionOut | JSONResponse:
    """The ``modules`` form: the stored per-class modules themselves as the parts."""
    rows = [_ready_module(db, i) for i in module_ids]
    key = svc.modules_key(module_ids, body.calibration_per_class, body.combine)
    existing = db.scalar(
        select(Composition).where(
            Composition.model_id == rows[0].model_id,
            Composition.classes_key == key,
            Composition.finetuned.is_(False),
        )
    )
    if existing is not None:
        response.status_code = status.HTTP_200_OK
        return composition_out(existing)
    if len(rows) > settings.compose_inline_max_parts:
        return _start_compose(db, settings, dispatcher, principal, body, {"modules": module_ids},
                              key, rows[0].model)
    with _composing():
        comp = svc.compose_modules(db, settings, _inputs(request, settings, db), rows,
                                   body.calibration_per_class, body.combine, key)
    return _created(db, settings, response, principal, comp)


def _ready_module(db: DbDep, module_id: int) -> Module:
    """A stored module whose model is ready, or the 4xx that says why not."""
    module = db.get(Module, module_id)
    if module is None:
        raise not_found("module", module_id)
    if module.model.status != ModelStatus.ready.value:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"module {module_id}'s model {module.model_id} is {module.model.status}, not ready",
        )
    return module


@contextmanager
def _composing() -> Iterator[None]:
    """How composing fails over HTTP: what a composition refuses is 422, an artifact or
    dataset that cannot be read is 409."""
    try:
        yield
    except svc.CompositionError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except svc.SourceUnavailable as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None


def _inputs(request: Request, settings: Settings, db: DbDep) -> svc.Inputs:
    """The sources through this process's caches of loaded models and datasets."""
    models, bundles = request.app.state.model_cache, request.app.state.bundle_cache
    return svc.Inputs(
        model=lambda m: models.load(settings, m),
        bundle=lambda name, size: bundles.load(settings, db, name, size),
    )


def _created(db: DbDep, settings: Settings, response: Response, principal: Principal,
             comp: Composition) -> CompositionOut:
    comp.api_key_id = principal.key_id
    _commit(db, settings, comp)
    response.headers["Location"] = f"{API_PREFIX}/compositions/{comp.id}"
    return composition_out(comp)


def _start_compose(db: DbDep, settings: Settings, dispatcher: DispatcherDep, principal: Principal,
                   body: CompositionCreate, params: dict[str, Any], key: str, first: Model
                   ) -> JSONResponse:
    """A composition of more parts than MWT_COMPOSE_INLINE_MAX_PARTS runs as a job: 202 with
    the job (the same request while it is queued or running answers that job)."""
    params = {**params, "model_id": first.id, "calibration_per_class": body.calibration_per_class,
              "combine": body.combine, "key": key}
    job = jobs_svc.active_job_like(db, JobKind.compose, params)
    if job is None:
        job, _ = jobs_svc.create_job(
            db, kind=JobKind.compose, params=params, queue=settings.queue_for("light"),
            max_attempts=settings.max_job_attempts, max_starts=settings.max_job_starts,
            dataset=first.dataset, arch=first.arch, api_key_id=principal.key_id,
        )
        jobs_svc.send(db, dispatcher.dispatch, job)
    return JSONResponse(
        jobs_svc.job_out(job).model_dump(mode="json"),
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Location": f"{API_PREFIX}/jobs/{job.id}"},
    )


def _commit(db: DbDep, settings: Settings, comp: Composition) -> None:
    """Record the stored composition; on failure remove its files so nothing is orphaned."""
    rel = comp.artifact_path
    db.add(comp)
    try:
        db.commit()
    except Exception:
        db.rollback()
        if rel:
            storage.remove_tree(storage.resolve(settings.artifacts, rel).parent)
        raise


def _start_finetune(
    db: DbDep,
    settings: Settings,
    dispatcher: DispatcherDep,
    principal: Principal,
    model: Model,
    classes: list[int],
    body: CompositionCreate,
    tau: float | str | None,
) -> JSONResponse:
    assert body.finetune is not None
    params = {"model_id": model.id, "classes": classes, "finetune": body.finetune.model_dump(),
              "tau": tau, "margin_pp": body.margin_pp}
    job, created = jobs_svc.create_job(
        db,
        kind=JobKind.finetune,
        params=params,
        queue=settings.queue_for("light"),
        max_attempts=settings.max_job_attempts,
        max_starts=settings.max_job_starts,
        dataset=model.dataset,
        arch=model.arch,
        api_key_id=principal.key_id,
    )
    jobs_svc.send(db, dispatcher.dispatch, job)
    return JSONResponse(
        jobs_svc.job_out(job).model_dump(mode="json"),
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Location": f"{API_PREFIX}/jobs/{job.id}"},
    )


@router.get("", response_model=Page[CompositionOut], summary="List compositions")
def list_compositions(
    db: DbDep,
    settings: SettingsDep,
    principal: ReadKey,
    p: PagingDep,
    model_id: QueryId = None,
    finetuned: bool | None = None,
    min_accuracy: Annotated[float | None, Query(ge=0, le=1)] = None,
) -> Page[CompositionOut]:
    stmt = visible_to(
        select(Composition).order_by(Composition.id.desc()), Composition.api_key_id, principal, settings
    )
    if model_id is not None:
        stmt = stmt.where(svc.uses_model(model_id))
    if finetuned is not None:
        stmt = stmt.where(Composition.finetuned.is_(finetuned))
    if min_accuracy is not None:
        stmt = stmt.where(Composition.accuracy >= min_accuracy)
    return page(db, stmt, p, composition_out)


@router.get(
    "/{composition_id}", response_model=CompositionOut, summary="One composition with its metrics"
)
def show(composition_id: PathId, db: DbDep, _: ReadKey) -> CompositionOut:
    return composition_out(_get(db, composition_id))


def _get(db: DbDep, composition_id: int, with_artifact: bool = False) -> Composition:
    c = db.get(Composition, composition_id)
    if c is None:
        raise not_found("composition", composition_id)
    if with_artifact and (c.artifact_path is None or c.sha256 is None):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"composition {composition_id} has no artifact yet"
        )
    return c


@router.head("/{composition_id}/download", include_in_schema=False)
@router.get(
    "/{composition_id}/download",
    summary="Download the composed classifier (tar: weights.safetensors + manifest.json)",
    response_class=Response,
)
def download(
    composition_id: PathId, request: Request, db: DbDep, settings: SettingsDep, _: ReadKey
) -> Response:
    c = _get(db, composition_id, with_artifact=True)
    assert c.artifact_path is not None and c.sha256 is not None  # checked by _get
    return artifact_response(
        request,
        svc.tar_of(settings, c.artifact_path),
        c.sha256,
        f"composition-{c.id}-model{c.model_id}.tar",
    )


@router.head("/{composition_id}/export", include_in_schema=False)
@router.get(
    "/{composition_id}/export",
    summary="Download the composed classifier as TorchScript or ONNX (runs without this project)",
    description=EXPORT_DESCRIPTION,
    response_class=Response,
    responses=EXPORT_RESPONSES,
)
def export(
    composition_id: PathId,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    _: ReadKey,
    _work: HeavyWork,
    fmt: FormatQuery = "torchscript",
) -> Response:
    c = _get(db, composition_id)
    return export_response(
        request, settings, f"composition {composition_id}", c.artifact_path, c.sha256, fmt,
        f"composition-{c.id}-model{c.model_id}",
    )


@router.head("/{composition_id}/torchscript", include_in_schema=False)
@router.get(
    "/{composition_id}/torchscript",
    summary="Download the composed classifier as TorchScript (same as export?format=torchscript)",
    description=EXPORT_DESCRIPTION,
    response_class=Response,
    responses=EXPORT_RESPONSES,
)
def torchscript(
    composition_id: PathId, request: Request, db: DbDep, settings: SettingsDep, _: ReadKey,
    _work: HeavyWork,
) -> Response:
    return export(composition_id, request, db, settings, _, _work, "torchscript")


@router.delete(
    "/{composition_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a composition"
)
def delete(composition_id: PathId, db: DbDep, settings: SettingsDep, principal: WriteKey) -> None:
    c = _get(db, composition_id)
    ensure_owner(principal, c.api_key_id, f"composition {composition_id}")
    rel = c.artifact_path
    db.delete(c)
    db.commit()
    if rel:
        storage.remove_tree(storage.resolve(settings.artifacts, rel).parent)
