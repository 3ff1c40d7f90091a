from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import MAX_ID, DbId, OrmModel


class FinetuneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(5, ge=1, le=200)
    lr: float = Field(0.01, gt=0, le=10)
    batch_size: int = Field(64, ge=2, le=8192)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class CompositionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: DbId
    classes: list[
        Annotated[int, Field(ge=0, le=MAX_ID)] | Annotated[str, Field(max_length=200)]
    ] = Field(
        min_length=1,
        max_length=1000,
        description="class indices or class names, in the output order wanted",
    )
    finetune: FinetuneOptions | None = Field(
        None, description="fine-tune a head on the sub-task (runs as a job)"
    )


class CompositionOut(OrmModel):
    id: int
    model_id: int
    classes: list[int]
    class_names: list[str]
    finetuned: bool
    status: str
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    accuracy_loss: float | None = None
    krr: float | None = None
    params: int | None = None
    flops: int | None = None
    metrics: dict[str, Any]
    sha256: str | None = None
    size_bytes: int | None = None
    job_id: str | None = None
    created_at: dt.datetime
    download_url: str | None = None
