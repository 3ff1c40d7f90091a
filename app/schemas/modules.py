from __future__ import annotations

import datetime as dt

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
    sha256: str
    size_bytes: int
    created_at: dt.datetime
    download_url: str | None = None
