from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from app.paths import API_PREFIX
from mwt_core.config import (
    DEFAULT_DATASET,
    LIMITS,
    PAPER_SETTINGS,
    ModularizeConfig,
    TrainConfig,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


_T = TrainConfig  # defaults: mwt_core.config, the one place they are written
_L = LIMITS


def _paper(key: str) -> str:
    value = PAPER_SETTINGS[key]
    return "same as lr" if value is None else f"{value:g}"


class JobCreate(BaseModel):
    """A training job. Every setting defaults to mwt_core's ``TrainConfig`` (docs/defaults.md),
    whatever the data set and whether the job starts from weights; bounds are mwt_core's
    ``LIMITS`` and ``TrainConfig``'s checks."""

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as declared: no 0 for false

    dataset: str = Field(
        DEFAULT_DATASET, min_length=1, max_length=64, description="built-in or uploaded dataset name"
    )
    arch: str = Field(
        _T.arch, min_length=1, max_length=32, description=f"see GET {API_PREFIX}/architectures"
    )
    width: float | None = Field(
        _T.width, gt=0, le=_L.width,
        description="channel width multiplier; null or not given: the architecture's "
        f"default_width (GET {API_PREFIX}/architectures)",
    )
    epochs: int = Field(_T.epochs, ge=1, le=_L.epochs)
    batch_size: int = Field(_T.batch_size, ge=2, le=_L.batch_size)
    lr: float = Field(_T.lr, gt=0, le=_L.lr)
    momentum: float = Field(_T.momentum, ge=0, lt=1)
    weight_decay: float = Field(
        _T.weight_decay, ge=0, le=_L.weight_decay, description="SGD weight decay (the paper: none)"
    )
    mask_lr: float | None = Field(
        _T.mask_lr, gt=0, le=_L.lr,
        description=f"learning rate of the mask generators (null: same as lr; the paper: {_paper('mask_lr')})",
    )
    alpha: float = Field(
        _T.alpha, ge=0, le=_L.loss_weight, description=f"cohesion loss weight (the paper: {_paper('alpha')})"
    )
    beta: float = Field(
        _T.beta, ge=0, le=_L.loss_weight, description=f"coupling loss weight (the paper: {_paper('beta')})"
    )
    gamma: float = Field(
        _T.gamma, ge=0, le=_L.loss_weight,
        description=f"weight of the cross-class mask-overlap term (the paper: {_paper('gamma')})",
    )
    target_krr: float | None = Field(
        _T.target_krr, gt=0, le=1,
        description="kernel budget of MwT training: the share of the masked kernels a sample "
        "may keep switched on, on average, held by a Lagrange multiplier during training; in "
        "(0, 1]; null or 1: no budget (the paper's loss alone)",
    )
    budget_rate: float = Field(
        _T.budget_rate, ge=0, le=_L.loss_weight,
        description="how fast the budget's multiplier may grow over the run (its step is "
        "budget_rate / the run's optimiser steps)",
    )
    budget_warmup: float = Field(
        _T.budget_warmup, ge=0, le=1,
        description="share of the run over which the budget tightens from every kernel to "
        "target_krr",
    )
    val_fraction: float = Field(
        _T.val_fraction, ge=0, le=_L.val_fraction,
        description="stratified share of the training split held out for validation (fixed by "
        "the seed): the per-epoch val_acc and the accuracy guard read it; 0: no validation slice",
    )
    guard_pp: float = Field(
        _T.guard_pp, ge=0, le=_L.guard_pp,
        description="accuracy guard, in percentage points: an epoch whose validation accuracy "
        "falls more than this below the run's best loosens the kernel budget",
    )
    outlier_weight: float = Field(
        _T.outlier_weight, ge=0, le=_L.loss_weight,
        description="weight of the outlier-exposure term on quadrant-mixed images (0: off, the paper's loss)",
    )
    tau: float = Field(ModularizeConfig.tau, gt=0, le=1, description="modularization threshold")
    seed: int = Field(_T.seed, ge=0, le=_L.seed)
    # Strict: JSON true/false only ("amp": 0 or "yes" is a mistake to report, not to guess).
    modular: StrictBool = Field(_T.modular, description="MwT training (false = standard training, no modules)")
    augment: StrictBool = _T.augment
    amp: StrictBool = _T.amp
    compile: StrictBool = Field(
        _T.compile, description="torch.compile the training step (opt-in; compiling takes a while up front)"
    )
    init_from: str | None = Field(
        _T.init_from, pattern=NAME_PATTERN,
        description=f"start from weights uploaded with PUT {API_PREFIX}/weights/{{name}} (fresh mask "
        "generators); null: random initialisation",
    )
    init_from_model: int | None = Field(
        None, ge=1, le=2**31 - 1,
        description="start from the weights of this ready registry model (same architecture, "
        "width and classes; fresh mask generators), e.g. one trained with modular=false; "
        "null: see init_from",
    )
    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="model name; default '<dataset>-<arch>'"
    )
    tags: dict[str, str] = Field(default_factory=dict, max_length=32)

    @model_validator(mode="after")
    def _one_start(self) -> JobCreate:
        if self.init_from is not None and self.init_from_model is not None:
            raise ValueError("give init_from (uploaded weights) or init_from_model (a registry model), not both")
        return self

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
    cohesion_loss: float | None = Field(None, description="the cohesion loss term (not the model's cohesion metric)")
    coupling_loss: float | None = Field(None, description="the coupling loss term (not the model's coupling metric)")
    train_acc: float | None = None
    test_acc: float | None = None
    kernel_rate: float | None = None
    val_acc: float | None = Field(
        None, description="accuracy on the validation slice of the training split (epoch ends)"
    )
    kernel_budget: float | None = Field(
        None, description="the kernel budget in force (the accuracy guard may have loosened it); null: none"
    )
    elapsed_s: float | None = None
    eta_s: float | None = None
    # Declared so that every progress answer has the same keys (null until known), however
    # far the job has got when it is read.
    resumed_from_epoch: int | None = Field(None, description="the epoch this attempt resumed from")
    checkpoint_epoch: int | None = Field(None, description="the last epoch with a saved checkpoint")


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
