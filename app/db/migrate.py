"""Run the Alembic migrations in ``migrations/`` programmatically (``mwt migrate``, ``mwt serve``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from app.settings import Settings


def _migrations_dir() -> Path:
    """``migrations/`` beside the ``app`` package (source tree or editable install), else in the cwd."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "migrations",
        Path.cwd() / "migrations",
    ):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError("cannot find the migrations/ directory; run from the project root")


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(settings: Settings | str, revision: str = "head") -> None:
    url = settings if isinstance(settings, str) else settings.database_url
    if not isinstance(settings, str):
        settings.ensure_dirs()
    command.upgrade(alembic_config(url), revision)


def downgrade(settings: Settings | str, revision: str) -> None:
    url = settings if isinstance(settings, str) else settings.database_url
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_up_to_date(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()
