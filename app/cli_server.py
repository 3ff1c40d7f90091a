"""``mwt`` service commands: serve (embedded: API + executor + SQLite), api, worker, migrate,
reap, key."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from app import cli_common as common
from app.cli_common import (
    _fail,
    app,
)


def _settings(**overrides: Any) -> Any:
    from pydantic import ValidationError

    from app.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:  # one line per bad setting, no traceback
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _announce_key(token: str | None, key_file: Path | None = None) -> None:
    if token is None:
        return
    if key_file is not None:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(token + "\n")
        key_file.chmod(0o600)
    common.err.print(
        "\n[bold yellow]Admin API key (shown once, only its hash is stored):[/]\n"
        f"  export MWT_API_KEY={token}\n"
    )


def _banner(settings: Any) -> str:
    """`mwt serve`'s start-up lines: one value a line so 80 columns never split a URL mid-way."""
    return (
        f"MwT Hub on http://{settings.api_host}:{settings.api_port}  (docs: /docs)\n"
        f"  data: {settings.data_dir}\n"
        f"  db:   {settings.database_url.split('@')[-1]}"
    )


# ---------------------------------------------------------------------------- service


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (MWT_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (MWT_API_PORT).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="State directory (MWT_DATA_DIR).")] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Jobs run at once (MWT_EXECUTOR_CONCURRENCY).")
    ] = None,
    key_file: Annotated[
        Path | None,
        typer.Option(help="Also write a newly created admin key to this file (mode 600)."),
    ] = None,
) -> None:
    """Embedded service: API + in-process job executor + SQLite, no Redis. Migrates first."""
    import uvicorn

    from app.auth import ensure_admin_key
    from app.db import migrate
    from app.db.session import make_engine, make_sessionmaker
    from app.main import create_app

    settings = _settings(
        api_host=host, api_port=port, data_dir=data_dir, executor_concurrency=concurrency
    )
    if not settings.embedded:
        common.err.print(
            "[yellow]MWT_BROKER_URL is set: jobs go to Celery workers; no in-process executor.[/]"
        )
    _logging(settings.log_level)
    migrate.upgrade(settings)
    engine = make_engine(settings)
    try:
        _announce_key(ensure_admin_key(make_sessionmaker(engine), settings), key_file)
    finally:
        engine.dispose()
    api = create_app(settings)
    common.err.print(_banner(settings), soft_wrap=True)  # soft: a long path wraps whole, never split by rich
    uvicorn.run(api, host=settings.api_host, port=settings.api_port, log_level=settings.log_level)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (MWT_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (MWT_API_PORT).")] = None,
    workers: Annotated[int, typer.Option(help="Uvicorn worker processes.")] = 1,
) -> None:
    """API server only (distributed mode: jobs go to Celery workers). Run `mwt migrate` first."""
    import uvicorn

    settings = _settings(api_host=host, api_port=port)
    _logging(settings.log_level)
    if workers > 1:
        # Each process builds its own app from the environment.
        os.environ["MWT_API_HOST"], os.environ["MWT_API_PORT"] = (
            settings.api_host,
            str(settings.api_port),
        )
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=settings.api_host,
            port=settings.api_port,
            workers=workers,
            log_level=settings.log_level,
        )
        return
    from app.main import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level,
    )


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = "gpu,cpu",
    pool: Annotated[
        str, typer.Option(help="Celery pool: solo for GPU workers (CUDA-safe), prefork for CPU.")
    ] = "solo",
    concurrency: Annotated[int, typer.Option(help="Processes (prefork); solo is always 1.")] = 1,
    hostname: Annotated[str | None, typer.Option(help="Worker name (default: mwt@<host>).")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
) -> None:
    """A Celery worker (distributed mode; needs MWT_BROKER_URL)."""
    settings = _settings()
    if settings.embedded:
        _fail(
            "MWT_BROKER_URL is not set; workers need a broker (the embedded `mwt serve` runs jobs itself)"
        )
    from worker.celery_app import app as celery_app

    argv = [
        "worker",
        "-Q",
        queues,
        "-P",
        pool,
        "-c",
        str(1 if pool == "solo" else concurrency),
        "-l",
        loglevel,
        "-n",
        hostname or "mwt@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    celery_app.worker_main(argv)


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    downgrade: Annotated[bool, typer.Option(help="Downgrade to REVISION instead.")] = False,
    key_file: Annotated[
        Path | None, typer.Option(help="Also write a newly created admin key here.")
    ] = None,
) -> None:
    """Apply the database migrations; on an empty key table create the admin key and print it once."""
    from app.auth import ensure_admin_key
    from app.db import migrate as mig
    from app.db.session import make_engine, make_sessionmaker

    settings = _settings()
    _logging("warning")
    if downgrade:
        mig.downgrade(settings, revision)
    else:
        mig.upgrade(settings, revision)
    engine = make_engine(settings)
    try:
        common.out.print(
            f"database at revision {mig.current_revision(engine)} ({settings.database_url.split('@')[-1]})"
        )
        if not downgrade:
            _announce_key(ensure_admin_key(make_sessionmaker(engine), settings), key_file)
    finally:
        engine.dispose()


@app.command()
def reap() -> None:
    """One pass of the stale-job reaper (requeue or fail jobs whose worker is gone)."""
    from worker.reaper import reap_once

    settings = _settings()
    requeue = None
    if not settings.embedded:
        from worker.dispatch import CeleryDispatcher

        requeue = CeleryDispatcher(settings).requeue
    for job_id, action in reap_once(settings, requeue=requeue):
        common.out.print(f"{job_id}: {action}")


@app.command()
def key(
    name: Annotated[str, typer.Option(help="Label of the key.")] = "cli",
    scope: Annotated[list[str], typer.Option(help="read, write or admin (repeatable).")] = ["read"],  # noqa: B006
) -> None:
    """Create an API key directly in the database (operator access, e.g. a lost admin key)."""
    from app.auth import create_key
    from app.db.session import make_engine, make_sessionmaker

    settings = _settings()
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as s:
            try:
                k, token = create_key(s, name, scope)
            except ValueError as exc:
                _fail(str(exc))
            s.commit()
            common.out.print(f"key {k.id} ({', '.join(k.scopes)}): {token}")
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------- client
