"""Datasets: the built-in ones and validated ``.npz`` uploads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.auth import ReadKey, WriteKey, ensure_owner, visible_to
from app.db.models import Dataset, Job, Model
from app.deps import DbDep, SettingsDep
from app.files import StagedUpload
from app.routers._common import not_found
from app.schemas.datasets import DatasetOut
from app.services import datasets as svc
from app.services import jobs as jobs_svc
from app.settings import MiB, Settings

if TYPE_CHECKING:
    from mwt_core.data.datasets import DatasetBundle

UPLOAD_HELP = (
    "np.savez file with uint8 x_train/x_test (N,H,W | N,H,W,C | N,C,H,W; C in 1 or 3), "
    "integer y_train/y_test in 0..K-1 and optional class_names"
)


def _builtin_out(info: object, row: Dataset | None) -> DatasetOut:
    hint = None
    if not info.available:  # type: ignore[attr-defined]
        hint = "files not found in the data directory; download them there to train on this dataset"
    return DatasetOut(
        name=info.name,  # type: ignore[attr-defined]
        source=info.source,  # type: ignore[attr-defined]
        available=info.available,  # type: ignore[attr-defined]
        num_classes=info.num_classes,  # type: ignore[attr-defined]
        channels=info.channels,  # type: ignore[attr-defined]
        input_size=info.size,  # type: ignore[attr-defined]
        class_names=row.class_names if row else None,
        train_size=row.train_size if row else None,
        test_size=row.test_size if row else None,
        hint=hint,
    )


def _upload_out(row: Dataset) -> DatasetOut:
    return DatasetOut(
        name=row.name,
        source="upload",
        available=True,
        num_classes=row.num_classes,
        channels=row.channels,
        input_size=row.input_size,
        class_names=list(row.class_names),
        train_size=row.train_size,
        test_size=row.test_size,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
    )


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/datasets", tags=["datasets"])

    @router.get("", response_model=list[DatasetOut], summary="Built-in and uploaded datasets")
    def list_datasets(db: DbDep, s: SettingsDep, principal: ReadKey) -> list[DatasetOut]:
        rows = {r.name: r for r in db.scalars(select(Dataset))}
        mine = {
            r.name
            for r in db.scalars(visible_to(select(Dataset), Dataset.api_key_id, principal, s))
        }
        out = [_builtin_out(info, rows.get(name)) for name, info in svc.builtin_infos(s).items()]
        out += [
            _upload_out(r)
            for r in sorted(rows.values(), key=lambda r: r.name)
            if r.source == "upload" and r.name in mine
        ]
        return out

    @router.get("/{name}", response_model=DatasetOut, summary="One dataset")
    def show(name: str, db: DbDep, s: SettingsDep, _: ReadKey) -> DatasetOut:
        infos = svc.builtin_infos(s)
        row = db.scalar(select(Dataset).where(Dataset.name == name))
        if name in infos:
            return _builtin_out(infos[name], row)
        if row is None:
            raise not_found("dataset", repr(name))
        return _upload_out(row)

    @router.post(
        "",
        response_model=DatasetOut,
        status_code=status.HTTP_201_CREATED,
        summary="Upload a .npz dataset",
        description=f"Multipart form: `file` ({UPLOAD_HELP}) and optional `name` (default: the file name). "
        f"At most {settings.max_upload_mb} MiB.",
        max_body_size=settings.upload_limit_bytes + 64 * 1024,
    )
    def upload(
        db: DbDep,
        s: SettingsDep,
        principal: WriteKey,
        file: Annotated[UploadFile, File(description=UPLOAD_HELP)],
        name: Annotated[str | None, Form(max_length=64)] = None,
    ) -> DatasetOut:
        stem = Path(file.filename or "").stem.lower()
        dataset_name = (name or stem or "").strip().lower()
        try:
            svc.check_name(dataset_name)
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        if dataset_name in svc.builtin_infos(s):
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"{dataset_name!r} is a built-in dataset; choose another name",
            )
        if db.scalar(select(Dataset.id).where(Dataset.name == dataset_name)) is not None:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"dataset {dataset_name!r} already exists"
            )
        final = svc.upload_path(s, dataset_name)
        too_large = f"upload exceeds {s.max_upload_mb} MiB (MWT_MAX_UPLOAD_MB)"
        with StagedUpload(final, s.upload_limit_bytes, too_large) as up:
            while chunk := file.file.read(1 << 20):
                up.write(chunk)
            if up.size == 0:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT, "the uploaded file is empty"
                )
            bundle = _validate(up.received(), dataset_name, file.filename or "upload", s)
            up.commit()
        row = Dataset(
            name=dataset_name,
            source="upload",
            path=final.relative_to(s.datasets).as_posix(),
            sha256=up.sha256,
            size_bytes=up.size,
            num_classes=bundle.num_classes,
            class_names=list(bundle.class_names),
            channels=bundle.spec.channels,
            input_size=bundle.spec.size,
            train_size=int(bundle.train_y.shape[0]),
            test_size=int(bundle.test_y.shape[0]),
            api_key_id=principal.key_id,
        )
        db.add(row)
        try:
            db.commit()
        except IntegrityError:
            db.rollback()
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"dataset {dataset_name!r} already exists"
            ) from None
        return _upload_out(row)

    @router.delete(
        "/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete an uploaded dataset"
    )
    def delete(
        name: str, request: Request, db: DbDep, s: SettingsDep, principal: WriteKey
    ) -> None:
        row = db.scalar(select(Dataset).where(Dataset.name == name))
        if name in svc.builtin_infos(s):
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"{name!r} is built in and cannot be deleted"
            )
        if row is None:
            raise not_found("dataset", repr(name))
        ensure_owner(principal, row.api_key_id, f"dataset {name!r}")
        active = db.scalars(
            select(Job.id).where(Job.dataset == name, Job.status.in_(jobs_svc.ACTIVE))
        ).all()
        if active:
            # The job would fail as an internal error when it opens the file.
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"dataset {name!r} is used by queued or running job(s) {', '.join(active)}; "
                "cancel them or wait for them to finish",
            )
        users = db.scalars(select(Model.id).where(Model.dataset == name)).all()
        if users:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"dataset {name!r} is used by model(s) {', '.join(map(str, users))}; delete them first",
            )
        if row.path:
            (s.datasets / row.path).unlink(missing_ok=True)
        db.delete(row)
        db.commit()
        # Its arrays must not outlive it (nor be served if the name is uploaded again).
        request.app.state.bundle_cache.evict(name)

    return router


def _validate(path: Path, name: str, filename: str, settings: Settings) -> DatasetBundle:
    from mwt_core.data.datasets import DatasetError, load_npz

    try:
        # Sizes from the member headers first: load_npz inflates whole arrays.
        svc.check_npz_sizes(path, settings.max_dataset_mb * MiB)
    except svc.DatasetTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"invalid dataset: {exc}") from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"invalid dataset: {exc}") from None
    try:
        return load_npz(path, name=name)
    except DatasetError as exc:
        message = str(exc).replace(str(path), filename)
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"invalid dataset: {message}"
        ) from None
    except Exception as exc:  # numpy/zip oddities on hostile input
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"invalid dataset: not a readable .npz archive ({type(exc).__name__})",
        ) from None
