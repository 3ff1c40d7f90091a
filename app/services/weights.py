"""Weights that training jobs start from: uploaded state dicts (``init_from``) or a
registry model's own weights (``init_from_model``).

Uploads live under ``<data_dir>/weights/<name>.safetensors``; the API writes them, the
worker reads them. Either source is checked against the job's architecture and dataset at
submit time from the file's header only (no tensor is read in the API process). What each
upload's header said is recorded in the ``weights`` table when it is stored, so that
listing them reads the database only.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import storage
from app.db.models import Model, ModelStatus, UploadedWeights
from app.files import StagedUpload
from app.paths import API_PREFIX
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
        raise WeightsNotFound(f"no model {model_id} in the registry; GET {API_PREFIX}/models lists them")
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
        raise WeightsNotFound(f"no {what} in the store; PUT weights to {API_PREFIX}/weights/{{name}}")
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


class WeightsExist(ValueError):
    """Weights are already stored under that name."""


def _row(name: str, path: Path, size: int, sha256: str) -> UploadedWeights:
    """The registry row of the weights file at ``path`` (``WeightsError`` if its header does
    not parse, ``ValueError`` if it holds no tensor)."""
    from mwt_core.models.weights import read_header

    header = read_header(path)  # the header only; never unpickled
    if not header.shapes:
        raise ValueError("the state dict holds no tensor")
    return UploadedWeights(name=name, size_bytes=size, sha256=sha256, tensors=len(header.shapes),
                           params=header.params, dtypes=header.dtype_names)


def store_upload(db: Session, name: str, upload: StagedUpload) -> UploadedWeights:
    """Record a received upload and move it into place, both or neither.

    Raises ``WeightsError``/``ValueError`` for a body that is no safetensors state dict and
    :class:`WeightsExist` when the name is taken (by a row, or by a file stored before the
    table existed). The row is written first and committed after the file is in place, so
    a concurrent upload of the same name waits on it and then fails, never the other way.
    """
    row = _row(name, upload.received(), upload.size, upload.sha256)
    db.add(row)
    try:
        db.flush()
    except IntegrityError:
        db.rollback()
        raise WeightsExist(f"weights {name!r} already exist") from None
    if upload.final.exists():
        db.rollback()
        raise WeightsExist(f"weights {name!r} already exist")
    try:
        upload.commit()
    except BaseException:
        db.rollback()
        raise
    try:
        db.commit()
    except BaseException:
        upload.final.unlink(missing_ok=True)  # ours: the row that claimed the name is gone
        raise
    return row


# Data directories (with their database) whose files stored before the ``weights`` table
# existed have been recorded by this process: that is done once, at the first listing.
_recorded: set[tuple[str, str]] = set()
_recorded_lock = threading.Lock()


def _record_files_without_rows(db: Session, settings: Settings) -> None:
    """Give every stored file without a row its row (read from its header once); a file
    whose header does not parse is left out, as listings always did."""
    known = set(db.scalars(select(UploadedWeights.name)))
    unrecorded = [(name, path) for name, path in list_uploads(settings) if name not in known]
    if not unrecorded:
        return
    from mwt_core.checksums import sha256_file

    for name, path in unrecorded:
        try:
            row = _row(name, path, path.stat().st_size, sha256_file(path))
        except (ValueError, OSError):  # WeightsError included: an unreadable header
            continue
        db.add(row)
        try:
            db.commit()
        except IntegrityError:
            db.rollback()  # recorded meanwhile (an upload, another process)


def list_weights(db: Session, settings: Settings) -> list[UploadedWeights]:
    """Every uploaded weights' row, by name, from the database only (after this process has
    recorded, once, the files stored before the table existed)."""
    key = (settings.database_url, str(settings.data_dir.resolve()))
    if key not in _recorded:
        with _recorded_lock:
            if key not in _recorded:
                _record_files_without_rows(db, settings)
                _recorded.add(key)
    return list(db.scalars(select(UploadedWeights).order_by(UploadedWeights.name)))
