"""Registry database: ORM models, engine/session factories, migrations runner."""

from app.db.models import (
    ApiKey,
    Base,
    Composition,
    Dataset,
    Job,
    JobKind,
    JobStatus,
    Model,
    ModelStatus,
    Module,
    Scope,
)
from app.db.session import make_engine, make_sessionmaker, session_scope

__all__ = [
    "ApiKey",
    "Base",
    "Composition",
    "Dataset",
    "Job",
    "JobKind",
    "JobStatus",
    "Model",
    "ModelStatus",
    "Module",
    "Scope",
    "make_engine",
    "make_sessionmaker",
    "session_scope",
]
