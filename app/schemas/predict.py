"""Predict: class names with probabilities for uploaded images."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ClassScore(BaseModel):
    class_name: str
    index: int = Field(description="Position of the class in the classifier's output.")
    probability: float = Field(
        description="softmax over the classifier's classes; for a one-class module, sigmoid of "
        "its single logit (an uncalibrated score, see `scoring`)."
    )
    logit: float = Field(description="The raw score the probability was computed from.")


class Prediction(BaseModel):
    input: str = Field(description="The uploaded file's name, or `#i` for the i-th JSON item.")
    top: list[ClassScore] = Field(description="The `top_k` classes, most probable first.")


class PredictOut(BaseModel):
    kind: Literal["model", "module", "composition"]
    id: int
    sha256: str = Field(description="The artifact that answered (the download's sha256).")
    class_names: list[str]
    scoring: Literal["softmax", "sigmoid"] = Field(
        description="softmax: probabilities over these classes only (an image of a class outside "
        "them still gets one of them). sigmoid: a one-class module has a single logit, and a "
        "softmax of it would always be 1.0; sigmoid(logit) moves with the evidence but is not "
        "calibrated (the logit was trained inside a softmax over all the model's classes), so "
        "compare it between images rather than reading 0.5 as a threshold."
    )
    input_spec: dict[str, Any] = Field(
        description="What each image was turned into: channels, size (square), and the "
        "normalisation the network applies after scaling pixels to [0, 1]."
    )
    predictions: list[Prediction]
