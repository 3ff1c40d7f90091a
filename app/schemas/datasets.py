from __future__ import annotations

import datetime as dt

from pydantic import BaseModel


class DatasetOut(BaseModel):
    name: str
    source: str  # "scikit-learn", "generated", "torchvision", "upload"
    available: bool
    num_classes: int
    channels: int
    input_size: int
    class_names: list[str] | None = None
    train_size: int | None = None
    test_size: int | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    created_at: dt.datetime | None = None
    hint: str | None = None
