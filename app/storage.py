"""The artifact store: a local directory (a shared volume in the distributed setup).

Paths in the DB are relative to ``Settings.artifact_dir`` so the store can be
mounted at different places by the API and the workers. Every downloadable
artifact is one deterministic, uncompressed tar (weights + manifest) whose
sha256 is recorded in the DB and served as the ETag.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from mwt_core.checksums import sha256_file


class StorageError(RuntimeError):
    pass


def resolve(root: Path, relative: str) -> Path:
    """``root / relative``, refusing anything that escapes ``root``."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise StorageError(f"artifact path {relative!r} is not inside the store")
    return root / Path(*rel.parts)


def relative(root: Path, path: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


# The store's layout (relative to its root):
#   models/<model id>/model/              the full model's artifact   -> models/<id>/model.tar
#   models/<model id>/modules/<class>/    one module per class        -> models/<id>/modules/<class>.tar
#   compositions/<token>/artifact/        a composed classifier       -> compositions/<token>/composition.tar
#   jobs/<job id>/checkpoint/             a running job's checkpoint (removed when it succeeds)
COMPOSITION_ARTIFACT = "artifact"
COMPOSITION_TAR = "composition.tar"


def model_dir(root: Path, model_id: int) -> Path:
    """Everything stored for one model: its artifact, its modules and their tars."""
    return root / "models" / str(model_id)


def model_artifact_dir(root: Path, model_id: int) -> Path:
    return model_dir(root, model_id) / "model"


def module_artifact_dir(root: Path, model_id: int, class_index: int) -> Path:
    return model_dir(root, model_id) / "modules" / str(class_index)


def job_dir(root: Path, job_id: str) -> Path:
    return root / "jobs" / job_id


def tar_path(artifact_dir: Path) -> Path:
    """The downloadable tar of an artifact directory: ``<dir>.tar`` beside it (a composition's
    ``artifact/`` is packed as ``composition.tar``)."""
    if artifact_dir.name == COMPOSITION_ARTIFACT:
        return artifact_dir.parent / COMPOSITION_TAR
    return artifact_dir.parent / f"{artifact_dir.name}.tar"


def pack(artifact_dir: Path) -> tuple[str, int]:
    """Pack an artifact directory into its tar (``tar_path``). Returns ``(sha256, size)``."""
    return write_tar(artifact_dir, tar_path(artifact_dir))


def write_tar(src_dir: Path, dest: Path) -> tuple[str, int]:
    """Pack the files of ``src_dir`` (flat, sorted, fixed metadata) into ``dest`` atomically.

    Returns ``(sha256, size)`` of the tar. The same files always give the same bytes.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    files = sorted(p for p in src_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise StorageError(f"nothing to pack in {src_dir}")
    with (
        open(tmp, "wb") as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for f in files:
            info = tarfile.TarInfo(f.name)
            info.size = f.stat().st_size
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(f, "rb") as fh:
                tar.addfile(info, fh)
    os.replace(tmp, dest)
    return sha256_file(dest), dest.stat().st_size


def safe_extract(tar_path: Path | io.BytesIO, dest: Path) -> list[Path]:
    """Extract a flat artifact tar (regular files only, no paths) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    kw: dict[str, object] = (
        {"fileobj": tar_path} if isinstance(tar_path, io.BytesIO) else {"name": tar_path}
    )
    with tarfile.open(mode="r", **kw) as tar:  # type: ignore[call-overload]
        for member in tar.getmembers():
            name = PurePosixPath(member.name)
            if not member.isfile() or len(name.parts) != 1 or name.name in ("", ".", ".."):
                raise StorageError(f"unexpected entry {member.name!r} in artifact archive")
            fh = tar.extractfile(member)
            assert fh is not None
            target = dest / name.name
            with open(target, "wb") as out_fh:
                shutil.copyfileobj(fh, out_fh)
            out.append(target)
    return out


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
