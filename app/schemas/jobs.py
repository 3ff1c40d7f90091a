from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class JobCreate(BaseModel):
    """A training job. Defaults are the paper's (200 epochs); use a few epochs to try things out."""

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as declared: no 0 for false

    dataset: str = Field(
        "digits", min_length=1, max_length=64, description="built-in or uploaded dataset name"
    )
    arch: str = Field(
        "simcnn", min_length=1, max_length=32, description="see GET /api/v1/architectures"
    )
    width: float = Field(1.0, gt=0, le=4, description="channel width multiplier")
    epochs: int = Field(200, ge=1, le=2000)
    batch_size: int = Field(128, ge=2, le=8192)
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1, description="SGD weight decay (the paper: none)")
    mask_lr: float | None = Field(
        None, gt=0, le=10, description="learning rate of the mask generators (default: lr)"
    )
    alpha: float = Field(0.5, ge=0, le=100, description="cohesion loss weight")
    beta: float = Field(1.5, ge=0, le=100, description="coupling loss weight")
    gamma: float = Field(
        0.0, ge=0, le=100, description="weight of the cross-class mask-overlap term (0: the paper's loss)"
    )
    tau: float = Field(0.9, gt=0, le=1, description="modularization threshold")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    # Strict: JSON true/false only ("amp": 0 or "yes" is a mistake to report, not to guess).
    modular: StrictBool = Field(True, description="MwT training (false = standard training, no modules)")
    augment: StrictBool = True
    amp: StrictBool = True
    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="model name; default '<dataset>-<arch>'"
    )
    tags: dict[str, str] = Field(default_factory=dict, max_length=32)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if not k or len(k) > 64 or len(val) > 256:
                raise ValueError("tag keys must be 1-64 characters and values at most 256")
        return v


class ProgressOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    phase: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    ce: float | None = None
    cohesion: float | None = None
    coupling: float | None = None
    train_acc: float | None = None
    test_acc: float | None = None
    kernel_rate: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    queue: str
    dataset: str | None
    arch: str | None
    params: dict[str, Any]
    progress: ProgressOut | None = None
    percent: float | None = Field(None, description="0-100, from epochs and steps done")
    eta_s: float | None = None
    eta_at: dt.datetime | None = None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    error: str | None = None
    result: dict[str, Any] | None = None
    model_id: int | None = None
    composition_id: int | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    heartbeat_at: dt.datetime | None = None
    dispatched_at: dt.datetime | None = Field(
        None, description="last hand-over to the broker; null while a queued job awaits (re)sending"
    )
    finished_at: dt.datetime | None = None
    duration_s: float | None = None
    links: dict[str, str] = Field(default_factory=dict)
