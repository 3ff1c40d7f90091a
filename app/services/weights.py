"""Weights that training jobs start from: uploaded state dicts (``init_from``) or a
registry model's own weights (``init_from_model``).

Uploads live under ``<data_dir>/weights/<name>.safetensors``; the API writes them, the
worker reads them. Either source is checked against the job's architecture and dataset at
submit time from the file's header only (no tensor is read in the API process).
"""

from __future__ import annotations

import re
from pathlib import Path

from app import storage
from app.db.models import Model, ModelStatus
from app.schemas.jobs import NAME_PATTERN
from app.settings import Settings

WEIGHTS_SUBDIR = "weights"


class WeightsNotFound(ValueError):
    """No weights were uploaded under that name, or no ready model has that id."""


def weights_path(settings: Settings, name: str) -> Path:
    """Where the weights named ``name`` are stored (``name`` must match NAME_PATTERN)."""
    if not re.fullmatch(NAME_PATTERN, name) or ".." in name:
        raise ValueError(f"weights name {name!r} must match {NAME_PATTERN} (no '..')")
    return settings.data_dir / WEIGHTS_SUBDIR / f"{name}.safetensors"


def model_weights_path(settings: Settings, model: Model | None, model_id: int) -> Path:
    """The weights file of registry model ``model_id`` (``model``: its row, None if absent),
    if the model is ready to start a job from; else :class:`WeightsNotFound` saying why."""
    from mwt_core.artifacts import WEIGHTS_FILE

    if model is None:
        raise WeightsNotFound(f"no model {model_id} in the registry; GET /api/v1/models lists them")
    if model.status != ModelStatus.ready.value or model.artifact_path is None:
        raise WeightsNotFound(f"model {model_id} is {model.status}; only a ready model's weights can start a job")
    return storage.resolve(settings.artifacts, model.artifact_path) / WEIGHTS_FILE


def upload_label(name: str) -> str:
    """How messages name uploaded weights."""
    return f"weights uploaded as {name!r}"


def model_label(model_id: int) -> str:
    """How messages name a registry model's weights."""
    return f"weights of model {model_id}"


def list_uploads(settings: Settings) -> list[tuple[str, Path]]:
    """``(name, path)`` of every uploaded weights file, by name."""
    root = settings.data_dir / WEIGHTS_SUBDIR
    if not root.is_dir():
        return []
    return sorted((p.name.removesuffix(".safetensors"), p) for p in root.glob("*.safetensors")
                  if re.fullmatch(NAME_PATTERN, p.name.removesuffix(".safetensors")))


def check_for_job(
    path: Path, what: str, arch: str, width: float, modular: bool,
    num_classes: int, channels: int, input_size: int,
) -> None:
    """Raise ``ValueError`` (naming the first bad tensor) unless the weights at ``path``
    (``what``: how the caller named them, e.g. "weights 'r18'") fit the job."""
    from mwt_core.data.bundle import model_input_shape
    from mwt_core.models import architecture_info, create_model
    from mwt_core.models.weights import WeightsError, match_weights, read_shapes

    if not path.is_file():
        raise WeightsNotFound(f"no {what} in the store; PUT weights to /api/v1/weights/{{name}}")
    try:
        shapes = read_shapes(path)
    except WeightsError:  # checked when stored: the file changed since; say so without its path
        raise WeightsError(f"the {what} are unreadable; store them again") from None
    channels, size = model_input_shape(channels, input_size, architecture_info(arch).min_input_size)
    model = create_model(arch, num_classes, in_channels=channels, input_size=size, width=width,
                         masked=modular)
    try:
        match_weights(model, shapes)
    except WeightsError as exc:
        raise WeightsError(f"{what}: {exc}") from None
