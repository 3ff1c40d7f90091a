"""Uploaded weights (safetensors state dicts) that training jobs start from (``init_from``).

Files live under ``<data_dir>/weights/<name>.safetensors``; the API writes them, the
worker reads them. A name is checked against the job's architecture and dataset at
submit time from the file's header only (no tensor is read in the API process).
"""

from __future__ import annotations

import re
from pathlib import Path

from app.schemas.jobs import NAME_PATTERN
from app.settings import Settings

WEIGHTS_SUBDIR = "weights"


class WeightsNotFound(ValueError):
    """No weights were uploaded under that name."""


def weights_path(settings: Settings, name: str) -> Path:
    """Where the weights named ``name`` are stored (``name`` must match NAME_PATTERN)."""
    if not re.fullmatch(NAME_PATTERN, name) or ".." in name:
        raise ValueError(f"weights name {name!r} must match {NAME_PATTERN} (no '..')")
    return settings.data_dir / WEIGHTS_SUBDIR / f"{name}.safetensors"


def check_for_job(
    settings: Settings, name: str, arch: str, width: float, modular: bool,
    num_classes: int, channels: int, input_size: int,
) -> None:
    """Raise ``ValueError`` (naming the first bad tensor) unless ``name``'s weights fit the job."""
    from mwt_core.data.bundle import model_input_shape
    from mwt_core.models import architecture_info, create_model
    from mwt_core.models.weights import WeightsError, match_weights, read_shapes

    path = weights_path(settings, name)
    if not path.is_file():
        raise WeightsNotFound(f"no weights uploaded as {name!r}; PUT them to /api/v1/weights/{name}")
    try:
        shapes = read_shapes(path)
    except WeightsError:  # checked at upload: the stored file changed; say so without its path
        raise WeightsError(f"the weights stored as {name!r} are unreadable; upload them again") from None
    channels, size = model_input_shape(channels, input_size, architecture_info(arch).min_input_size)
    model = create_model(arch, num_classes, in_channels=channels, input_size=size, width=width,
                         masked=modular)
    match_weights(model, shapes)
