from __future__ import annotations

import datetime as dt

from pydantic import Field

from app.schemas.common import OrmModel


class ModuleOut(OrmModel):
    id: int
    model_id: int
    class_index: int
    class_name: str
    dataset: str
    arch: str
    krr: float
    accuracy: float | None = None
    cohesion: float | None = None
    kept_kernels: int
    total_kernels: int
    params: int | None = None
    flops: int | None = None
    latency_ms: float | None = Field(
        None, description="CPU milliseconds per image (batch of 64), timed at export beside the full model"
    )
    full_latency_ms: float | None = Field(None, description="the full model's, in the same rounds")
    sha256: str
    size_bytes: int
    created_at: dt.datetime
    download_url: str | None = None
