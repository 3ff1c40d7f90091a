from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.schemas.common import MAX_ID, DbId, OrmModel
from mwt_core.compose_options import CHOICES, DEFAULT_COMBINE, DEFAULT_PER_CLASS
from mwt_core.config import AUTO_TAU, ModularizeConfig

ClassRef = Annotated[int, Field(ge=0, le=MAX_ID)] | Annotated[str, Field(max_length=200)]
ClassList = Annotated[
    list[ClassRef],
    Field(
        min_length=1,
        max_length=1000,
        description="class indices or class names, in the output order wanted",
    ),
]
MAX_SOURCES = 16
# Each module is a part of its own (one forward pass per image), so the bound is on parts.
MAX_MODULES = 64


class FinetuneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    epochs: int = Field(5, ge=1, le=200)
    lr: float = Field(0.01, gt=0, le=10)
    batch_size: int = Field(64, ge=2, le=8192)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class SourceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model_id: DbId
    classes: ClassList


class CompositionCreate(BaseModel):
    """``model_id`` + ``classes`` (one model), ``sources`` (one or several models) or
    ``modules`` (stored per-class modules of one model or several, each a part of its own)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model_id: DbId | None = None
    classes: ClassList | None = None
    sources: list[SourceIn] | None = Field(
        None,
        min_length=1,
        max_length=MAX_SOURCES,
        description="classes of several models (same input shape), in output order",
    )
    modules: list[DbId] | None = Field(
        None,
        min_length=1,
        max_length=MAX_MODULES,
        description="per-class module ids (GET /modules) of one model or several (same input "
        "shape), in output order: the stored modules themselves become the parts, so a client "
        "that downloads the same modules rebuilds this classifier (`mwt compose-local DIR...`)",
    )
    calibration_per_class: int = Field(
        DEFAULT_PER_CLASS,
        ge=0,
        le=1000,
        description="labelled training images per class the labelled methods (scale_bias, head) "
        "fit on (sources and modules forms; drawn by a fixed seed from the training split, "
        "never the test split)",
    )
    combine: Literal[CHOICES] = Field(  # type: ignore[valid-type]
        DEFAULT_COMBINE,
        description="how the parts' outputs become one answer (sources and modules forms): raw "
        "logits; scale_bias (per-source scale and bias); log_softmax, energy, gauss, gauss_map "
        "(need no labels: each source's own training split); head, gauss_head (a linear "
        "correction fitted on calibration_per_class images per class); auto (the no-label "
        "method most accurate on the source models' validation slices; metrics.combine says "
        "which, metrics.combine_choice what each scored)",
    )
    finetune: FinetuneOptions | None = Field(
        None, description="fine-tune a head on the sub-task (runs as a job; one model only)"
    )
    tau: Literal[AUTO_TAU] | Annotated[float, Field(gt=0, le=1)] | None = Field(  # type: ignore[valid-type]
        None,
        description="threshold the module of one model's classes is cut at: \"auto\" (the "
        "smallest module whose accuracy on the model's validation slice is within margin_pp "
        "points of the full model's on the same classes; needs a model trained with a "
        "validation slice) or a number in (0, 1]. Default: auto where the model has a "
        "validation slice, else the model's own tau. One model only (model_id and classes, or "
        "one source).",
    )
    margin_pp: float = Field(
        ModularizeConfig.margin_pp,
        ge=0,
        le=100,
        description="with tau auto: the validation accuracy, in percentage points, the module "
        "may lose against the full model on its classes",
    )

    @model_validator(mode="after")
    def _one_form(self) -> CompositionCreate:
        single = self.model_id is not None or self.classes is not None
        forms = int(single) + int(self.sources is not None) + int(self.modules is not None)
        if forms > 1:
            raise ValueError(
                "give either model_id and classes, or sources, or modules: one form, not both"
            )
        if forms == 0 or (single and (self.model_id is None or self.classes is None)):
            raise ValueError(
                "give model_id and classes (one model), or sources (several models), or "
                "modules (per-class module ids)"
            )
        if self.sources is not None:
            ids = [s.model_id for s in self.sources]
            dup = next((i for i in ids if ids.count(i) > 1), None)
            if dup is not None:
                raise ValueError(
                    f"model {dup} appears in two sources; list all its classes in one source"
                )
            if len(self.sources) > 1 and self.finetune is not None:
                raise ValueError(
                    "finetune works on one model's classes; a cross-model composition is "
                    "calibrated instead (calibration_per_class)"
                )
        tau_given = {"tau", "margin_pp"} & self.model_fields_set
        if tau_given and (self.modules is not None or len(self.sources or []) > 1):
            raise ValueError(
                f"{' and '.join(sorted(tau_given))} choose the module of one model's classes "
                "(model_id and classes, or one source); several sources and stored modules "
                "keep their models' own tau"
            )
        if "margin_pp" in self.model_fields_set and isinstance(self.tau, float):
            raise ValueError(
                f"margin_pp applies to tau {AUTO_TAU!r}; a number tau is used as given"
            )
        if self.modules is not None:
            dup = next((i for i in self.modules if self.modules.count(i) > 1), None)
            if dup is not None:
                raise ValueError(f"module {dup} is listed twice; list each module once")
            if self.finetune is not None:
                raise ValueError(
                    "finetune works on one model's classes (model_id and classes); a "
                    "composition of modules is calibrated instead (calibration_per_class)"
                )
        return self

    def source_list(self) -> list[SourceIn]:
        """The request as a list of sources (one for the single-model form; none for modules)."""
        if self.modules is not None:
            return []
        if self.sources is not None:
            return list(self.sources)
        assert self.model_id is not None and self.classes is not None  # checked above
        return [SourceIn(model_id=self.model_id, classes=self.classes)]


class SourceOut(OrmModel):
    model_id: int
    classes: list[int]
    class_names: list[str]


class CompositionOut(OrmModel):
    id: int
    model_id: int = Field(description="the first source's model")
    classes: list[int] = Field(description="class indices in output order, each in its own model")
    class_names: list[str]
    sources: list[SourceOut] = Field(description="the models the classes come from, in order")
    finetuned: bool
    status: str
    tau: float | None = Field(
        None,
        description="the threshold the module was cut at (one model; metrics.tau_mode says "
        "whether it was chosen on the validation slice, given, or the model's own)",
    )
    margin_pp: float | None = Field(None, description="the accuracy margin tau auto was held to")
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
