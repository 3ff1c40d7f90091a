"""Weights users already have (safetensors state dicts), uploaded to start jobs from."""

from __future__ import annotations

import datetime as dt

import anyio
from fastapi import APIRouter, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from app.auth import AdminKey, ReadKey, WriteKey
from app.db.models import Job, UploadedWeights
from app.deps import DbDep, SettingsDep
from app.files import StagedUpload
from app.schemas.common import error_responses
from app.services import weights as svc
from mwt_core.limits import LIMITS

router = APIRouter(prefix="/weights", tags=["weights"])


class WeightsOut(BaseModel):
    """Uploaded weights, as their header described them when they were stored."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    size_bytes: int
    sha256: str
    tensors: int
    params: int = Field(description="elements of all tensors together (buffers included)")
    dtypes: list[str] = Field(description="the tensors' distinct dtypes, e.g. float32")
    created_at: dt.datetime


@router.get("", response_model=list[WeightsOut], summary="List uploaded weights")
def list_weights(db: DbDep, settings: SettingsDep, _: ReadKey) -> list[WeightsOut]:
    return [WeightsOut.model_validate(row) for row in svc.list_weights(db, settings)]


@router.delete(
    "/{name}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
    summary="Delete uploaded weights (admin: uploads record no owner)",
    responses=error_responses(404, 409, 422),
)
def delete_weights(name: str, db: DbDep, settings: SettingsDep, _: AdminKey) -> Response:
    from app.services.jobs import ACTIVE

    try:
        path = svc.weights_path(settings, name)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    row = db.get(UploadedWeights, name)
    if row is None and not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no weights uploaded as {name!r}")
    active = db.scalars(select(Job.id).where(
        Job.status.in_(ACTIVE), Job.params["init_from"].as_string() == name)).all()
    if active:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"weights {name!r} are used by queued or running job(s) {', '.join(active)}")
    if row is not None:
        db.delete(row)
        db.commit()
    # The row first: a file whose unlink fails is recorded again, not listed without a file.
    path.unlink(missing_ok=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put(
    "/{name}", response_model=WeightsOut, status_code=status.HTTP_201_CREATED,
    summary="Upload a safetensors state dict (raw body) that jobs can start from (init_from)",
    max_body_size=LIMITS.init_weights_bytes,
    responses=error_responses(409, 413, 422),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def upload_weights(
    name: str, request: Request, db: DbDep, settings: SettingsDep, _: WriteKey
) -> WeightsOut:
    from mwt_core.models.weights import WeightsError

    try:
        final = svc.weights_path(settings, name)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    if final.exists():
        raise HTTPException(status.HTTP_409_CONFLICT, f"weights {name!r} already exist")
    limit = LIMITS.init_weights_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"weights exceed {limit} bytes")
    with StagedUpload(final, limit, f"weights exceed {limit} bytes") as up:
        async for chunk in request.stream():  # streamed: never the whole body in memory
            up.write(chunk)
        try:  # the header, the row and the move: file and database work, off the event loop
            row = await anyio.to_thread.run_sync(svc.store_upload, db, name, up)
        except svc.WeightsExist as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except WeightsError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                "the body must be a safetensors state dict: " + str(exc).split(": ", 1)[-1]
                                ) from None
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return WeightsOut.model_validate(row)
