"""Datasets as the service sees them: mwt_core's built-ins plus validated uploads (rows in ``datasets``)."""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Dataset
from app.lru import Lru
from app.paths import API_PREFIX
from app.settings import Settings

if TYPE_CHECKING:
    from mwt_core.data.datasets import DatasetBundle

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
UPLOAD_SUBDIR = "uploads"


class DatasetNotFound(LookupError):
    pass


class DatasetUnavailable(ValueError):
    pass


class DatasetGone(DatasetUnavailable):
    """An uploaded dataset whose registry row is there but whose file is not."""


# Narrows a query of ``Dataset`` rows to those the caller may list (see app.auth.visible_to).
Visible = Callable[[Select[Any]], Select[Any]]


class DatasetTooLarge(ValueError):
    """The arrays of an upload would take more memory than allowed once inflated."""


# Largest zip central directory (the list of members) of an upload. ``zipfile`` reads it
# whole and builds an object per member before anything else can be checked, so a file of
# empty members would cost far more memory than its size; ``np.savez`` writes four or five.
NPZ_MAX_DIRECTORY_BYTES = 1 << 20
_EOCD, _EOCD64_LOCATOR, _EOCD64 = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"


def zip_directory_bytes(path: Path) -> int | None:
    """Size of a zip's central directory as its end record declares it, found as ``zipfile``
    finds it (the last 22 bytes, else the last signature within a maximal comment), or None
    when there is no end record (not a zip)."""
    with path.open("rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        tail_len = min(size, 22 + 0xFFFF)
        fh.seek(size - tail_len)
        tail = fh.read()
        at = len(tail) - 22 if tail[-22:-18] == _EOCD else tail.rfind(_EOCD)
        if at < 0 or len(tail) - at < 22:
            return None
        (directory,) = struct.unpack("<I", tail[at + 12 : at + 16])
        locator = tail[at - 20 : at] if at >= 20 else b""
        if locator[:4] == _EOCD64_LOCATOR:  # zip64: the sizes sit in a record of their own
            (offset,) = struct.unpack("<Q", locator[8:16])
            if offset < size:
                fh.seek(offset)
                record = fh.read(56)
                if record[:4] == _EOCD64 and len(record) == 56:
                    (directory,) = struct.unpack("<Q", record[40:48])
    return int(directory)


# Longest .npy header read: numpy's own default cap. numpy reads a header whole before it
# checks its length, and a version 2 header may claim 4 GiB, so the length is checked first.
NPY_MAX_HEADER_BYTES = 10_000


def _member_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[int, str]:
    """What numpy would hold in memory for one member of an ``.npz``, from its first bytes
    only: ``(bytes, description)``.

    ``np.load(...)[key]`` opens the member named ``key`` or ``key.npy``, whatever its name;
    a member starting with the ``.npy`` magic becomes an array of its header's shape, any
    other is read whole as bytes (as many as the zip entry says it inflates to).
    """
    import numpy as np
    from numpy.lib import format as npy

    label = info.filename.removesuffix(".npy")
    with archive.open(info) as member:
        magic = member.read(len(npy.MAGIC_PREFIX) + 2)
        if magic[: len(npy.MAGIC_PREFIX)] != npy.MAGIC_PREFIX:
            return info.file_size, f"{label} is {info.file_size} bytes that are not a .npy array"
        version = (magic[-2], magic[-1])
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"{label}: unsupported .npy version {version}")
        size_format = "<H" if version == (1, 0) else "<I"
        (header_len,) = struct.unpack(size_format, member.read(struct.calcsize(size_format)))
        if header_len > NPY_MAX_HEADER_BYTES:
            raise ValueError(f"{label}: its .npy header claims {header_len} bytes; not a plain array")
    with archive.open(info) as member:
        npy.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = npy.read_array_header_1_0(member)
        else:
            shape, _, dtype = npy.read_array_header_2_0(member)
    if dtype.hasobject:
        raise ValueError(
            f"{label} holds Python objects, which need pickle; "
            "store plain numeric arrays (and a unicode string array for class_names)"
        )
    return int(np.prod(shape, dtype=object)) * dtype.itemsize, f"{label} has shape {tuple(shape)}, {dtype}"


def check_npz_sizes(path: Path, limit_bytes: int) -> int:
    """Sum of what an ``.npz``'s members take once loaded, read from their first bytes only.

    ``np.load`` inflates a compressed member whole when it is accessed, so a few MB of
    zeros can become gigabytes. Each member's header (magic, shape, dtype) sits in its first
    bytes: reading it inflates a few hundred bytes, and the data is never touched. Every
    member counts, whatever its name: numpy loads ``x_train`` as readily as ``x_train.npy``.
    Raises DatasetTooLarge past ``limit_bytes`` and ValueError for what is not an ``.npz``
    of plain arrays. Returns the total.
    """
    directory = zip_directory_bytes(path)
    if directory is not None and directory > NPZ_MAX_DIRECTORY_BYTES:
        raise ValueError(
            f"its zip directory is {directory} bytes, more than the "
            f"{NPZ_MAX_DIRECTORY_BYTES} an .npz of a few arrays needs; save it with np.savez"
        )
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        # Not a zip: a plain .npy (not compressed, so bounded by the upload limit) or junk;
        # load_npz says which.
        return 0
    total = 0
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            try:
                size, what = _member_bytes(archive, info)
            except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, NotImplementedError,
                    zlib.error, struct.error) as exc:
                # A broken member anywhere refuses the file: numpy may load the others.
                raise ValueError(
                    f"not a readable .npz archive ({type(exc).__name__}: {exc})"
                ) from None
            total += size
            if total > limit_bytes:
                raise DatasetTooLarge(
                    f"its arrays would take more than {limit_bytes // (1024 * 1024)} MiB "
                    f"once decompressed ({what}); the limit is MWT_MAX_DATASET_MB"
                )
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


def resolve(
    session: Session, settings: Settings, name: str, visible: Visible | None = None
) -> tuple[str, Dataset | None]:
    """Check that ``name`` can be trained on. Returns ``(source, upload_row)``.

    Raises DatasetNotFound (unknown name; its message names the uploads ``visible`` lets the
    caller list, all of them without it) or DatasetUnavailable (built-in whose files are
    missing).
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
        query = select(Dataset.name).where(Dataset.source == "upload")
        uploads = session.scalars(visible(query) if visible is not None else query).all()
        raise DatasetNotFound(
            f"unknown dataset {name!r}; built in: {', '.join(sorted(infos))}"
            + (
                f"; uploaded: {', '.join(sorted(uploads))}"
                if uploads
                else f"; or upload a .npz to {API_PREFIX}/datasets"
            )
        )
    return "upload", row


def upload_path(settings: Settings, name: str) -> Path:
    return settings.datasets / UPLOAD_SUBDIR / f"{name}.npz"


def upload_file(settings: Settings, row: Dataset) -> tuple[Path, int]:
    """The file of an uploaded dataset and its mtime (ns); DatasetGone when it is not on disk."""
    try:
        if row.path is None:
            raise FileNotFoundError(row.name)
        path = settings.datasets / row.path
        return path, path.stat().st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):
        raise DatasetGone(
            f"dataset {row.name!r} is registered but its file is missing from the server's "
            "dataset directory (MWT_DATASET_DIR); delete the dataset and upload it again"
        ) from None


def load_bundle(
    settings: Settings,
    session: Session,
    name: str,
    min_input_size: int = 0,
    visible: Visible | None = None,
) -> DatasetBundle:
    """Load a dataset for training or evaluation (resized as the architecture needs)."""
    _, row = resolve(session, settings, name, visible)
    return _load(settings, name, row, min_input_size)


def _load(settings: Settings, name: str, row: Dataset | None, min_input_size: int) -> DatasetBundle:
    from mwt_core.data.datasets import load_dataset

    if row is not None:
        path, _ = upload_file(settings, row)
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


# An uploaded dataset's content (its sha256 and its file's mtime; None for a built-in),
# so a dataset deleted and uploaded again under the same name is never answered from the
# cache: (name, content, min_input_size).
BundleKey = tuple[str, tuple[str | None, int] | None, int]


class BundleCache(Lru[BundleKey, "DatasetBundle"]):
    """A few loaded datasets kept in memory (compositions evaluate on the test split).

    Keyed by what the dataset holds, not only its name; :meth:`evict` drops a name's
    entries when the dataset is deleted, so its arrays do not outlive it.
    """

    def __init__(self, size: int = 4) -> None:
        super().__init__(max(1, size))

    def load(
        self,
        settings: Settings,
        session: Session,
        name: str,
        min_input_size: int,
        visible: Visible | None = None,
    ) -> DatasetBundle:
        """The dataset ``name`` (as :func:`load_bundle`), loaded or reused."""
        _, row = resolve(session, settings, name, visible)
        content = None if row is None else (row.sha256, upload_file(settings, row)[1])
        return self.get(
            (name, content, min_input_size), lambda: _load(settings, name, row, min_input_size)
        )

    def evict(self, name: str) -> None:
        """Forget every loaded version of ``name`` (the dataset was deleted or replaced)."""
        self.forget(lambda key: key[0] == name)
