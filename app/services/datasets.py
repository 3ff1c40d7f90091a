"""Datasets as the service sees them: mwt_core's built-ins plus validated uploads (rows in ``datasets``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Dataset
from app.lru import Lru
from app.settings import Settings

if TYPE_CHECKING:
    from mwt_core.data.datasets import DatasetBundle

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
UPLOAD_SUBDIR = "uploads"


class DatasetNotFound(LookupError):
    pass


class DatasetUnavailable(ValueError):
    pass


class DatasetTooLarge(ValueError):
    """The arrays of an upload would take more memory than allowed once inflated."""


def check_npz_sizes(path: Path, limit_bytes: int) -> int:
    """Sum of the decoded sizes of an ``.npz``'s arrays, read from the ``.npy`` headers only.

    ``np.load`` inflates a compressed member whole when it is accessed, so a few MB of
    zeros can become gigabytes. Each member's header (magic, shape, dtype) sits in its first
    bytes: reading it inflates a few hundred bytes, and the data is never touched.
    Raises DatasetTooLarge past ``limit_bytes`` and ValueError for what is not an ``.npz``
    of plain arrays. Returns the total.
    """
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = npy.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = npy.read_array_header_1_0(member)
                    elif version in ((2, 0), (3, 0)):
                        shape, _, dtype = npy.read_array_header_2_0(member)
                    else:
                        raise ValueError(f"{info.filename}: unsupported .npy version {version}")
                if dtype.hasobject:
                    raise ValueError(
                        f"{info.filename[:-4]} holds Python objects, which need pickle; "
                        "store plain numeric arrays (and a unicode string array for class_names)"
                    )
                total += int(np.prod(shape, dtype=object)) * dtype.itemsize
                if total > limit_bytes:
                    raise DatasetTooLarge(
                        f"its arrays would take more than {limit_bytes // (1024 * 1024)} MiB "
                        f"once decompressed ({info.filename[:-4]} has shape {tuple(shape)}, "
                        f"{dtype}); the limit is MWT_MAX_DATASET_MB"
                    )
    except zipfile.BadZipFile:
        # Not a zip: a plain .npy (not compressed, so bounded by the upload limit) or junk;
        # load_npz says which.
        return 0
    return total


def builtin_infos(settings: Settings) -> dict[str, object]:
    from mwt_core.data.datasets import list_datasets

    return {info.name: info for info in list_datasets(settings.datasets)}


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(
            f"invalid dataset name {name!r}: use 1-64 lower-case letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def resolve(session: Session, settings: Settings, name: str) -> tuple[str, Dataset | None]:
    """Check that ``name`` can be trained on. Returns ``(source, upload_row)``.

    Raises DatasetNotFound (unknown name) or DatasetUnavailable (built-in whose files are missing).
    """
    infos = builtin_infos(settings)
    info = infos.get(name)
    if info is not None:
        if not info.available:  # type: ignore[attr-defined]
            raise DatasetUnavailable(
                f"dataset {name!r} is built in but its files are not in the server's data "
                "directory (MWT_DATASET_DIR); download them there (e.g. with torchvision) or "
                "pick another dataset"
            )
        return info.source, None  # type: ignore[attr-defined]
    row = session.scalar(select(Dataset).where(Dataset.name == name, Dataset.source == "upload"))
    if row is None:
        uploads = session.scalars(select(Dataset.name).where(Dataset.source == "upload")).all()
        raise DatasetNotFound(
            f"unknown dataset {name!r}; built in: {', '.join(sorted(infos))}"
            + (
                f"; uploaded: {', '.join(sorted(uploads))}"
                if uploads
                else "; or upload a .npz to /api/v1/datasets"
            )
        )
    return "upload", row


def upload_path(settings: Settings, name: str) -> Path:
    return settings.datasets / UPLOAD_SUBDIR / f"{name}.npz"


def load_bundle(
    settings: Settings, session: Session, name: str, min_input_size: int = 0
) -> DatasetBundle:
    """Load a dataset for training or evaluation (resized as the architecture needs)."""
    from mwt_core.data.datasets import load_dataset

    _, row = resolve(session, settings, name)
    if row is not None:
        assert row.path is not None
        path = settings.datasets / row.path
        return load_dataset(str(path), min_input_size=min_input_size, display_name=name)
    return load_dataset(name, data_dir=settings.datasets, min_input_size=min_input_size)


def record_builtin(
    factory_session: Session,
    bundle: DatasetBundle,
    source: str,
    native: DatasetBundle | None = None,
) -> None:
    """Remember a built-in dataset once it has been used (idempotent, best effort)."""
    b = native or bundle
    if factory_session.scalar(select(Dataset.id).where(Dataset.name == bundle.name)) is not None:
        return
    factory_session.add(
        Dataset(
            name=bundle.name,
            source=source,
            num_classes=b.num_classes,
            class_names=list(b.class_names),
            channels=b.spec.channels,
            input_size=b.spec.size,
            train_size=int(b.train_y.shape[0]),
            test_size=int(b.test_y.shape[0]),
        )
    )
    try:
        factory_session.commit()
    except IntegrityError:
        factory_session.rollback()


class BundleCache(Lru[tuple[str, int], "DatasetBundle"]):
    """A few loaded datasets kept in memory (compositions evaluate on the test split)."""

    def __init__(self, size: int = 4) -> None:
        super().__init__(max(1, size))

    def load(
        self, settings: Settings, session: Session, name: str, min_input_size: int
    ) -> DatasetBundle:
        return self.get(
            (name, min_input_size), lambda: load_bundle(settings, session, name, min_input_size)
        )
