from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import OrmModel
from app.schemas.modules import ModuleOut


class ModelOut(OrmModel):
    id: int
    name: str
    version: int | None = Field(
        None, description="null for a model that ended failed or cancelled (its number was given back)"
    )
    status: str
    dataset: str
    arch: str
    width: float
    modular: bool
    tau: float | None = None
    num_classes: int
    class_names: list[str]
    tags: dict[str, str]
    accuracy: float | None = None
    krr: float | None = None
    cohesion: float | None = None
    coupling: float | None = None
    params: int | None = None
    flops: int | None = None
    train_seconds: float | None = None
    epochs: int | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    job_id: str | None = None
    created_at: dt.datetime
    ready_at: dt.datetime | None = None
    download_url: str | None = None


class ModelDetail(ModelOut):
    config: dict[str, Any]
    input_spec: dict[str, Any]
    metrics: dict[str, Any]
    modules: list[ModuleOut]
    compositions: list[int] = Field(
        default_factory=list, description="ids of compositions built from it"
    )


class ModelPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tags: dict[str, str | None] = Field(description="set tags; a null value removes the tag")
