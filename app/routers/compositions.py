"""Compositions: a classifier for chosen classes of one model or several, built from their modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy import select

from app import storage
from app.auth import Principal, ReadKey, WriteKey, ensure_owner, visible_to
from app.capacity import HeavyWork
from app.db.models import Composition, JobKind, Model, ModelStatus, Module
from app.deps import DbDep, DispatcherDep, SettingsDep
from app.files import artifact_response
from app.routers._common import PagingDep, not_found, page
from app.routers._export import EXPORT_DESCRIPTION, FormatQuery, export_response
from app.schemas.common import Page, PathId, QueryId
from app.schemas.compositions import CompositionCreate, CompositionOut
from app.services import compose as svc
from app.services import jobs as jobs_svc
from app.settings import Settings

if TYPE_CHECKING:
    from torch import nn

router = APIRouter(prefix="/compositions", tags=["compositions"])


def composition_out(c: Composition) -> CompositionOut:
    out = CompositionOut.model_validate(c)
    if c.accuracy is not None and c.baseline_accuracy is not None:
        out.accuracy_loss = c.baseline_accuracy - c.accuracy
    if c.artifact_path:
        out.download_url = f"/api/v1/compositions/{c.id}/download"
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
    "take images of one shape). `modules`: stored per-class modules (ids from GET /modules, of one "
    "model or several, in output order) become the parts themselves, combined and fitted the same "
    "way; a client that downloads the same modules rebuilds this classifier to 1e-5 "
    "(`mwt compose-local DIR...`). Where the registry holds a standard model of the same dataset and "
    "architecture, `metrics.standard_accuracy_loss` is the accuracy lost against it. Either way the classifier is "
    "measured on the test split(s) at once: 201 (200 if the same composition exists). With `finetune` "
    "(one model only) a job is started: 202 with the job.",
    responses={
        200: {"description": "the same composition already existed"},
        202: {"description": "fine-tune job"},
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
        return _create_from_modules(body, body.modules, request, response, db, settings, principal)
    chosen = [_resolve(db, src.model_id, src.classes) for src in body.source_list()]
    if body.finetune is not None:
        model, classes = chosen[0]  # the schema allows finetune with one source only
        return _start_finetune(db, settings, dispatcher, principal, model, classes, body)

    key = svc.sources_key([(m.id, c) for m, c in chosen], body.calibration_per_class, body.combine)
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
    picks = [_load(request, settings, db, m, c) for m, c in chosen]
    if len(picks) == 1:
        p = picks[0]
        module, metrics = svc.build(p.loaded, p.data, p.classes, device="cpu")
        manifest = svc.manifest_for(p.model, p.loaded, p.classes, metrics, finetuned=False)
        labels = None
    else:
        std = _standard(db, settings, picks)
        try:
            module, metrics = svc.build_across(
                picks, body.calibration_per_class, combine=body.combine, device="cpu",
                standard=std,
            )
        except svc.CompositionError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        manifest = svc.manifest_across(picks, metrics)
        labels = svc.output_labels(picks)
    comp = svc.composition_row(
        [(p.model.id, p.classes, p.names) for p in picks],
        metrics,
        svc.store(settings, module, manifest),
        finetuned=False,
        key=key,
        labels=labels,
    )
    comp.api_key_id = principal.key_id
    _commit(db, settings, comp)
    response.headers["Location"] = f"/api/v1/compositions/{comp.id}"
    return composition_out(comp)


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
    principal: Principal,
) -> CompositionOut:
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
    models = {m.model_id: _loaded_model(request, settings, m.model) for m in rows}
    picks = [_load_module(request, settings, db, m) for m in rows]
    std = _standard(db, settings, picks)
    try:
        composed, metrics = svc.build_from_modules(
            picks, body.calibration_per_class, combine=body.combine, models=models, standard=std
        )
    except svc.CompositionError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    comp = svc.composition_row(
        [(p.module.model_id, p.part.classes, p.part.class_names) for p in picks],
        metrics,
        svc.store(settings, composed, svc.manifest_modules(picks, metrics)),
        finetuned=False,
        key=key,
        labels=svc.module_labels(picks),
    )
    comp.api_key_id = principal.key_id
    _commit(db, settings, comp)
    response.headers["Location"] = f"/api/v1/compositions/{comp.id}"
    return composition_out(comp)


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
def _loading(what: str) -> Iterator[None]:
    """How loading a source fails over HTTP: what a composition refuses is 422, an artifact or
    dataset that cannot be read is 409 naming ``what``."""
    try:
        yield
    except svc.CompositionError as exc:  # before ValueError: it is one
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except (FileNotFoundError, ValueError) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{what} cannot be loaded: {exc}") from None


def _load_module(request: Request, settings: Settings, db: DbDep, module: Module) -> svc.ModulePick:
    from mwt_core.models import architecture_info

    with _loading(f"module {module.id}'s artifact or dataset"):
        data = request.app.state.bundle_cache.load(
            settings, db, module.dataset, architecture_info(module.arch).min_input_size
        )
        return svc.load_module_part(settings, module, data)


def _standard(
    db: DbDep, settings: Settings, picks: list[svc.Pick] | list[svc.ModulePick]
) -> tuple[Model, nn.Module] | None:
    """The registry's standard model for these sources, loaded; None where there is none or it
    cannot be read (an unreadable baseline leaves the figure out, not the composition)."""
    standard = svc.standard_model_for(db, picks)
    if standard is None:
        return None
    try:
        return standard, svc.load_standard(settings, standard)
    except (FileNotFoundError, ValueError):
        return None


def _loaded_model(request: Request, settings: Settings, model: Model) -> svc.LoadedModel:
    with _loading(f"model {model.id}'s artifact"):
        loaded: svc.LoadedModel = request.app.state.model_cache.load(settings, model)
    return loaded


def _load(
    request: Request, settings: Settings, db: DbDep, model: Model, classes: list[int]
) -> svc.Pick:
    from mwt_core.models import architecture_info

    loaded = _loaded_model(request, settings, model)
    with _loading(f"model {model.id}'s artifact or dataset"):
        data = request.app.state.bundle_cache.load(
            settings, db, model.dataset, architecture_info(model.arch).min_input_size
        )
    return svc.Pick(model, loaded, data, classes)


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
) -> JSONResponse:
    assert body.finetune is not None
    params = {"model_id": model.id, "classes": classes, "finetune": body.finetune.model_dump()}
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
        headers={"Location": f"/api/v1/jobs/{job.id}"},
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
