"""Registry tables (SQLAlchemy 2 typed ORM). The schema itself only changes through ``migrations/``."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        dt.datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
    }


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


TERMINAL_STATUSES = tuple(s.value for s in JobStatus if s.terminal)


class JobKind(enum.StrEnum):
    train = "train"
    finetune = "finetune"
    compose = "compose"  # a composition too large to build within a request


class ModelStatus(enum.StrEnum):
    pending = "pending"  # version reserved, job still running
    ready = "ready"  # artifacts written and their checksums verified
    failed = "failed"  # the job that would have produced it failed (its version is given back)
    cancelled = "cancelled"  # the job was cancelled (its version is given back)


class Scope(enum.StrEnum):
    read = "read"
    write = "write"
    admin = "admin"


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(
        String(16), doc="first characters of the token, to recognise it"
    )
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, doc="sha256 hex of the token")
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]


class Dataset(Base):
    """Uploaded datasets, and built-in ones once a job has used them."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(16), doc="builtin | upload")
    path: Mapped[str | None] = mapped_column(
        String(512), doc="upload: path relative to the dataset dir"
    )
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    num_classes: Mapped[int]
    class_names: Mapped[list[Any]] = mapped_column(default=list)
    channels: Mapped[int]
    input_size: Mapped[int]
    train_size: Mapped[int]
    test_size: Mapped[int]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    api_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), doc="the key that created it (its owner)"
    )


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_created", "status", "created_at"),
        # An Idempotency-Key belongs to the API key that sent it: another key's submit with
        # the same header is its own request.
        UniqueConstraint("api_key_id", "idempotency_key", name="uq_jobs_key_idempotency"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.train.value)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value, index=True)
    queue: Mapped[str] = mapped_column(String(32), default="gpu")
    dataset: Mapped[str | None] = mapped_column(String(64), index=True)
    arch: Mapped[str | None] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any] | None]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(
        default=3, doc="losses in a row without a new checkpoint before the job is failed"
    )
    stalled_losses: Mapped[int] = mapped_column(
        default=0, server_default="0", doc="losses in a row of attempts that wrote no checkpoint (-1: the running attempt wrote one)"
    )
    max_starts: Mapped[int] = mapped_column(
        default=20, server_default="20", doc="hard ceiling on starts, progress or not"
    )
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    checkpoint_path: Mapped[str | None] = mapped_column(String(512))
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[dt.datetime | None]
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(
        doc="when the job was last handed to the broker (None: never, or the send failed)"
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    composition_id: Mapped[int | None] = mapped_column(
        ForeignKey("compositions.id", ondelete="SET NULL")
    )
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_models_name_version"),
        Index("ix_models_dataset_arch", "dataset", "arch"),
        {"sqlite_autoincrement": True},  # ids are never reused, even after deletes
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    # NULL once a model ends without being made (failed, cancelled): a version number
    # names a model that exists or is being trained, so the next run takes the number back.
    version: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.pending.value, index=True)
    dataset: Mapped[str] = mapped_column(String(64))
    arch: Mapped[str] = mapped_column(String(32))
    width: Mapped[float] = mapped_column(Float)
    modular: Mapped[bool] = mapped_column(Boolean, default=True)
    tau: Mapped[float | None] = mapped_column(Float)
    num_classes: Mapped[int]
    class_names: Mapped[list[Any]] = mapped_column(default=list)
    input_spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="training config")
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    accuracy: Mapped[float | None] = mapped_column(Float)
    krr: Mapped[float | None] = mapped_column(Float)
    cohesion: Mapped[float | None] = mapped_column(Float)
    coupling: Mapped[float | None] = mapped_column(Float)
    params: Mapped[int | None] = mapped_column(BigInteger)
    flops: Mapped[int | None] = mapped_column(BigInteger)
    train_seconds: Mapped[float | None] = mapped_column(Float)
    epochs: Mapped[int | None]
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="everything else measured")
    artifact_path: Mapped[str | None] = mapped_column(String(512))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[dt.datetime | None]
    api_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), doc="the key that created it (its owner)"
    )

    modules: Mapped[list[Module]] = relationship(
        back_populates="model",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Module.class_index",
    )
    compositions: Mapped[list[Composition]] = relationship(
        back_populates="model", cascade="all, delete-orphan", passive_deletes=True
    )


class Module(Base):
    """The slim module of one class of one model."""

    __tablename__ = "modules"
    __table_args__ = (
        UniqueConstraint("model_id", "class_index", name="uq_modules_model_class"),
        Index("ix_modules_class_name", "class_name"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    class_index: Mapped[int]
    class_name: Mapped[str] = mapped_column(String(100))
    dataset: Mapped[str] = mapped_column(
        String(64), index=True, doc="copy of the model's, for queries"
    )
    arch: Mapped[str] = mapped_column(String(32))
    krr: Mapped[float] = mapped_column(Float, index=True)
    accuracy: Mapped[float | None] = mapped_column(
        Float, doc="model's recall of this class on the test split"
    )
    cohesion: Mapped[float | None] = mapped_column(Float)
    kept_kernels: Mapped[int]
    total_kernels: Mapped[int]
    params: Mapped[int | None] = mapped_column(BigInteger)
    flops: Mapped[int | None] = mapped_column(BigInteger)
    latency_ms: Mapped[float | None] = mapped_column(
        Float, doc="CPU ms per image at the export's latency batch, timed beside the full model"
    )
    full_latency_ms: Mapped[float | None] = mapped_column(
        Float, doc="the full model's CPU ms per image in the same rounds"
    )
    artifact_path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="modules")


class Composition(Base):
    """A classifier composed from the modules of some classes of one model or several.

    ``model_id`` is the first source's model (kept for filters and the download name);
    ``sources`` lists every model the composition takes classes from, in output order.
    """

    __tablename__ = "compositions"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    classes: Mapped[list[Any]] = mapped_column(doc="class indices, in output order")
    class_names: Mapped[list[Any]] = mapped_column(default=list)
    classes_key: Mapped[str] = mapped_column(
        String(400), doc="canonical 'i,j,k' for de-duplication"
    )
    finetuned: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.ready.value)
    accuracy: Mapped[float | None] = mapped_column(Float)
    baseline_accuracy: Mapped[float | None] = mapped_column(
        Float, doc="full model on the same sub-task"
    )
    krr: Mapped[float | None] = mapped_column(Float)
    params: Mapped[int | None] = mapped_column(BigInteger)
    flops: Mapped[int | None] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    artifact_path: Mapped[str | None] = mapped_column(String(512))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    api_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), doc="the key that created it (its owner)"
    )

    model: Mapped[Model] = relationship(back_populates="compositions")
    sources: Mapped[list[CompositionSource]] = relationship(
        back_populates="composition",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="CompositionSource.position",
    )


class CompositionSource(Base):
    """One model's classes inside a composition (its logits sit at this position)."""

    __tablename__ = "composition_sources"

    composition_id: Mapped[int] = mapped_column(
        ForeignKey("compositions.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    classes: Mapped[list[Any]] = mapped_column(doc="the model's class indices, in output order")
    class_names: Mapped[list[Any]] = mapped_column(default=list)

    composition: Mapped[Composition] = relationship(back_populates="sources")


class UploadedWeights(Base):
    """A safetensors state dict uploaded for jobs to start from (``init_from``).

    The file lives at ``<data_dir>/weights/<name>.safetensors``; this row holds what its
    header said when it was stored, so listings never open the files.
    """

    __tablename__ = "weights"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    tensors: Mapped[int]
    params: Mapped[int] = mapped_column(BigInteger, doc="elements of all tensors (buffers too)")
    dtypes: Mapped[list[Any]] = mapped_column(default=list, doc="the tensors' distinct dtypes")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
