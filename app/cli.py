"""``mwt``: mwt_core's commands (train, modularize, extract, ...) plus the service's.

Service:  serve (embedded: API + executor + SQLite), api, worker, migrate, reap, key
Client:   submit, watch, jobs, cancel, models, modules, download, compose
Client commands talk to ``--url`` (MWT_URL, default http://127.0.0.1:8000) with ``--key``
(MWT_API_KEY).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="mwt",
    help="MwT Hub: modular training (MwT), per-class modules and composition, as a library CLI and a service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

SERVICE_COMMANDS = {
    "serve", "api", "worker", "migrate", "reap", "key",
    "submit", "watch", "jobs", "cancel", "models", "modules", "download", "compose",
}  # fmt: skip


def _mount_core() -> None:
    """Add mwt_core's commands and groups at the top level (a clash keeps ours, theirs gets '-local')."""
    try:
        from mwt_core.cli import app as core_app
    except ImportError as exc:  # pragma: no cover - the core CLI is part of the project
        logging.getLogger(__name__).debug("mwt_core.cli not importable: %s", exc)
        return
    # Copies: renaming must not change mwt_core's own CLI (`python -m mwt_core.cli compose`).
    for info in core_app.registered_commands:
        name = info.name or (info.callback.__name__.replace("_", "-") if info.callback else None)
        if name in SERVICE_COMMANDS:
            info = copy.copy(info)
            info.name = f"{name}-local"
        app.registered_commands.append(info)
    for group in core_app.registered_groups:
        if group.name in SERVICE_COMMANDS:
            group = copy.copy(group)
            group.name = f"{group.name}-local"
        app.registered_groups.append(group)


# ---------------------------------------------------------------------------- helpers

UrlOpt = Annotated[str, typer.Option("--url", envvar="MWT_URL", help="API base URL.")]
KeyOpt = Annotated[
    str | None, typer.Option("--key", envvar="MWT_API_KEY", help="API key.", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


def _client(url: str, key: str | None) -> Any:
    from app.client import MwtClient

    return MwtClient(url, key)


def _call(fn: Any, *args: Any, **kw: Any) -> Any:
    import httpx

    from app.client import ApiError, ChecksumError

    try:
        return fn(*args, **kw)
    except ApiError as exc:
        _fail(f"{exc.detail} (HTTP {exc.status})")
    except ChecksumError as exc:
        _fail(str(exc), code=2)
    except httpx.TransportError as exc:
        _fail(f"cannot reach the API: {exc}; is `mwt serve` running (MWT_URL)?")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")  # narrow terminals wrap cells rather than cut them
    for r in rows:
        t.add_row(*["-" if v is None else str(v) for v in r])
    return t


def _print_page(
    page: dict[str, Any], as_json: bool, title: str, columns: dict[str, Callable[[dict], Any]]
) -> None:
    """A list endpoint's page: raw JSON, or a table with one column per ``columns`` entry."""
    if as_json:
        out.print_json(json.dumps(page))
        return
    rows = [[cell(item) for cell in columns.values()] for item in page["items"]]
    out.print(_table(f"{title} ({page['total']})", list(columns), rows))


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
    err.print(
        "\n[bold yellow]Admin API key (shown once, only its hash is stored):[/]\n"
        f"  export MWT_API_KEY={token}\n"
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
        err.print(
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
    err.print(
        f"MwT Hub on http://{settings.api_host}:{settings.api_port}  (docs: /docs, data: {settings.data_dir}, "
        f"db: {settings.database_url.split('@')[-1]})"
    )
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
        out.print(
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
        out.print(f"{job_id}: {action}")


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
            out.print(f"key {k.id} ({', '.join(k.scopes)}): {token}")
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------- client


@app.command()
def submit(
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "digits",
    arch: Annotated[str, typer.Option(help="Architecture.")] = "simcnn",
    width: Annotated[float, typer.Option(help="Width multiplier.")] = 0.25,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 0.05,
    alpha: Annotated[float, typer.Option(help="Cohesion loss weight.")] = 0.5,
    beta: Annotated[float, typer.Option(help="Coupling loss weight.")] = 1.5,
    mask_lr: Annotated[
        float | None, typer.Option(help="Mask-generator learning rate (default: --lr).")
    ] = None,
    gamma: Annotated[
        float | None, typer.Option(help="Cross-class mask-overlap weight (default 0: the paper's loss).")
    ] = None,
    tau: Annotated[float, typer.Option(help="Modularization threshold.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    standard: Annotated[
        bool, typer.Option("--standard", help="Standard training (no modules).")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Model name (default <dataset>-<arch>).")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Retry-safe submit key.")] = None,
    watch_it: Annotated[
        bool, typer.Option("--watch", help="Follow the job until it ends.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Submit a training job."""
    with _client(url, key) as hub:
        job = _call(
            hub.submit_job,
            idempotency_key=idempotency_key,
            dataset=dataset,
            arch=arch,
            width=width,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            alpha=alpha,
            beta=beta,
            mask_lr=mask_lr,
            gamma=gamma,
            tau=tau,
            seed=seed,
            modular=not standard,
            name=name,
        )
        if as_json and not watch_it:
            out.print_json(json.dumps(job))
            return
        err.print(f"job [bold]{job['id']}[/] {job['status']}")
        if watch_it:
            _watch(hub, job["id"], as_json)
        elif not as_json:
            out.print(job["id"])


def _watch(hub: Any, job_id: str, as_json: bool) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task("queued", total=100)

        def update(job: dict[str, Any]) -> None:
            p = job.get("progress") or {}
            phase = p.get("phase") or job["status"]
            desc = f"{job['status']}: {phase}"
            if p.get("epoch") is not None and p.get("epochs"):
                desc += f" epoch {p['epoch']}/{p['epochs']}"
            if p.get("loss") is not None:
                desc += f" loss {p['loss']:.3f}"
            if p.get("test_acc") is not None:
                desc += f" test {_pct(p['test_acc'])}"
            bar.update(task, completed=job.get("percent") or 0, description=desc)

        job = _call(hub.wait, job_id, on_update=update)
        bar.update(task, completed=100 if job["status"] == "succeeded" else job.get("percent") or 0)
    if as_json:
        out.print_json(json.dumps(job))
    else:
        r = job.get("result") or {}
        line = f"job {job_id} {job['status']}"
        if job["status"] == "succeeded" and job["kind"] == "train":
            line += (
                f": model {r.get('model_id')} ({r.get('model_name')} v{r.get('model_version')}), "
                f"accuracy {_pct(r.get('accuracy'))}, KRR {_pct(r.get('krr'))}, {r.get('modules')} modules"
            )
        elif job["status"] == "succeeded":
            line += f": composition {r.get('composition_id')}, accuracy {_pct(r.get('accuracy'))}"
        elif job.get("error"):
            line += f": {job['error']}"
        out.print(line)
    if job["status"] != "succeeded":
        raise typer.Exit(1)
    return job


@app.command()
def watch(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow a job's progress (live, Server-Sent Events) until it ends."""
    with _client(url, key) as hub:
        _watch(hub, job_id, as_json)


@app.command()
def jobs(
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    status: Annotated[list[str] | None, typer.Option(help="Filter by status (repeatable).")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    with _client(url, key) as hub:
        page = _call(hub.jobs, status=status, limit=limit)
    _print_page(
        page,
        as_json,
        "jobs",
        {
            "id": lambda j: j["id"],
            "kind": lambda j: j["kind"],
            "status": lambda j: j["status"],
            "dataset": lambda j: j["dataset"],
            "arch": lambda j: j["arch"],
            "done": lambda j: None if j.get("percent") is None else f"{j['percent']:.0f}%",
            "attempts": lambda j: j["attempts"],
            "model": lambda j: j.get("model_id"),
            "error": lambda j: (j.get("error") or "")[:60],
        },
    )


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument()],
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
) -> None:
    """Cancel a job."""
    with _client(url, key) as hub:
        job = _call(hub.cancel, job_id)
    out.print(f"job {job_id}: {job['status']}{' (stopping)' if job['cancel_requested'] else ''}")


@app.command()
def models(
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    dataset: Annotated[str | None, typer.Option()] = None,
    arch: Annotated[str | None, typer.Option()] = None,
    min_accuracy: Annotated[float | None, typer.Option()] = None,
    max_krr: Annotated[float | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List ready models."""
    with _client(url, key) as hub:
        page = _call(
            hub.models,
            dataset=dataset,
            arch=arch,
            min_accuracy=min_accuracy,
            max_krr=max_krr,
            limit=limit,
        )
    _print_page(
        page,
        as_json,
        "models",
        {
            "id": lambda m: m["id"],
            "name": lambda m: m["name"],
            "v": lambda m: m["version"],
            "dataset": lambda m: m["dataset"],
            "arch": lambda m: m["arch"],
            "width": lambda m: m["width"],
            "accuracy": lambda m: _pct(m["accuracy"]),
            "KRR": lambda m: _pct(m["krr"]),
            "cohesion": lambda m: None if m["cohesion"] is None else f"{m['cohesion']:.3f}",
            "coupling": lambda m: None if m["coupling"] is None else f"{m['coupling']:.3f}",
            "params": lambda m: m["params"],
        },
    )


@app.command()
def modules(
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    dataset: Annotated[str | None, typer.Option()] = None,
    model_id: Annotated[int | None, typer.Option()] = None,
    class_name: Annotated[str | None, typer.Option()] = None,
    class_index: Annotated[int | None, typer.Option()] = None,
    max_krr: Annotated[float | None, typer.Option()] = None,
    min_accuracy: Annotated[float | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Query modules across models."""
    with _client(url, key) as hub:
        page = _call(
            hub.modules,
            dataset=dataset,
            model_id=model_id,
            class_name=class_name,
            class_index=class_index,
            max_krr=max_krr,
            min_accuracy=min_accuracy,
            limit=limit,
        )
    _print_page(
        page,
        as_json,
        "modules",
        {
            "id": lambda m: m["id"],
            "model": lambda m: m["model_id"],
            "class": lambda m: m["class_index"],
            "name": lambda m: m["class_name"],
            "dataset": lambda m: m["dataset"],
            "KRR": lambda m: _pct(m["krr"]),
            "accuracy": lambda m: _pct(m["accuracy"]),
            "params": lambda m: m["params"],
            "bytes": lambda m: m["size_bytes"],
            "sha256": lambda m: m["sha256"][:12],
        },
    )


@app.command()
def download(
    module_id: Annotated[
        int, typer.Argument(help="Module id (or composition/model id with --what).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Destination directory.")] = Path("."),
    what: Annotated[str, typer.Option(help="module | composition | model")] = "module",
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    extract: Annotated[bool, typer.Option(help="Unpack the archive.")] = True,
) -> None:
    """Download an artifact; the archive's sha256 is verified (resumes a partial download)."""
    with _client(url, key) as hub:
        fn = {
            "module": hub.download_module,
            "composition": hub.download_composition,
            "model": hub.download_model,
        }.get(what)
        if fn is None:
            _fail("--what must be module, composition or model")
        d = _call(fn, module_id, out_dir, extract=extract)
    out.print(
        f"{d.path} ({d.size} bytes) sha256 {d.sha256} verified"
        + (f", resumed at byte {d.resumed_from}" if d.resumed_from else "")
    )
    for f in d.files:
        out.print(f"  {f}")


def _class_items(text: str) -> list[int | str]:
    return [int(c) if c.strip().isdigit() else c.strip() for c in text.split(",") if c.strip()]


@app.command()
def compose(
    model_id: Annotated[int, typer.Argument(help="Model id.")],
    classes: Annotated[
        str, typer.Argument(help="Comma-separated class indices or names, e.g. 3,5,8.")
    ],
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    also: Annotated[
        list[str] | None,
        typer.Option(
            "--with",
            help="Classes of another model, MODEL_ID:CLASSES (e.g. 7:0,1); repeat for more models.",
        ),
    ] = None,
    calibration: Annotated[
        int, typer.Option(help="Training images per class to calibrate a cross-model composition.")
    ] = 20,
    finetune_epochs: Annotated[
        int | None, typer.Option(help="Fine-tune a head for N epochs (runs as a job).")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Also download the classifier here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compose a classifier for some classes of a model (or several) and show its test accuracy."""
    sources = [(model_id, _class_items(classes))]
    for spec in also or []:
        mid, sep, rest = spec.partition(":")
        if not sep or not mid.strip().isdigit():
            _fail(f"--with {spec!r}: write MODEL_ID:CLASSES, e.g. 7:0,1")
        sources.append((int(mid), _class_items(rest)))
    with _client(url, key) as hub:
        finetune = {"epochs": finetune_epochs} if finetune_epochs else None
        if len(sources) > 1:
            if finetune:
                _fail("--finetune-epochs works on one model's classes; drop --with or the option")
            comp = _call(hub.compose_across, sources, calibration)
        else:
            comp = _call(hub.compose, model_id, sources[0][1], finetune)
        if finetune:
            job = _watch(hub, comp["id"], as_json=False)
            comp = _call(hub.composition, job["composition_id"])
        if out_dir is not None:
            d = _call(hub.download_composition, comp["id"], out_dir)
            err.print(f"downloaded {d.path} (sha256 verified)")
    if as_json:
        out.print_json(json.dumps(comp))
        return
    out.print(
        _table(
            f"composition {comp['id']} of model(s) "
            + ", ".join(str(src["model_id"]) for src in comp["sources"]),
            ["classes", "accuracy", "full model", "loss", "KRR", "params", "FLOPs", "sha256"],
            [
                [
                    ",".join(comp["class_names"]),
                    _pct(comp["accuracy"]),
                    _pct(comp["baseline_accuracy"]),
                    _pct(comp["accuracy_loss"]),
                    _pct(comp["krr"]),
                    comp["params"],
                    comp["flops"],
                    comp["sha256"][:12],
                ]
            ],
        )
    )


_mount_core()


def main() -> None:
    """Console-script entry point (``mwt = app.cli:main``)."""
    app(prog_name="mwt")


if __name__ == "__main__":
    sys.exit(main())
