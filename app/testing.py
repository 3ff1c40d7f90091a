"""Helpers for tests and benchmarks: throwaway Postgres databases and Redis DBs, fake registry rows.

Nothing here runs in production code paths.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app import storage
from app.db.models import Model, ModelStatus, Module, utcnow
from app.settings import Settings

PG_HOST = os.environ.get("MWT_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("MWT_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("MWT_TEST_PG_USER", "postgres")
REDIS_HOST = os.environ.get("MWT_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("MWT_TEST_REDIS_PORT", "6379"))


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_available() -> bool:
    return port_open(PG_HOST, PG_PORT)


def redis_available() -> bool:
    return port_open(REDIS_HOST, REDIS_PORT)


def _admin_conn(user: str = PG_USER) -> Any:
    import psycopg

    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=user, dbname="postgres", autocommit=True
    )


@contextmanager
def throwaway_postgres(prefix: str = "mwt_test", owner: str | None = None) -> Iterator[str]:
    """Create a fresh database ``<prefix>_<random>``; yield its SQLAlchemy URL; drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with _admin_conn() as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' OWNER "{owner}"' if owner else ""))
    try:
        yield f"postgresql+psycopg://{owner or PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with _admin_conn() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@contextmanager
def ensure_pg_role(user: str, password: str) -> Iterator[None]:
    """Make sure a login role exists (created, and dropped afterwards, only if it was missing)."""
    with _admin_conn() as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
        if not exists:
            conn.execute(f"CREATE ROLE \"{user}\" LOGIN CREATEDB PASSWORD '{password}'")
    try:
        yield
    finally:
        if not exists:
            with _admin_conn() as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (user,),
                )
                conn.execute(f'DROP OWNED BY "{user}"')
                conn.execute(f'DROP ROLE IF EXISTS "{user}"')


@contextmanager
def throwaway_redis_db() -> Iterator[int]:
    """An empty Redis database number (1-15); emptied again afterwards. Never FLUSHALL."""
    import random

    import redis

    candidates = list(range(1, 16))
    random.shuffle(candidates)
    for db in candidates:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        if client.dbsize() == 0:
            client.set("mwt-test-lock", "1", ex=3600)  # claim it against other test runs
            try:
                yield db
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    raise RuntimeError("no empty Redis database available for the test")


def fake_artifact(directory: Path, payload: bytes, manifest: dict[str, Any]) -> tuple[str, int]:
    """A stand-in artifact dir + tar (not loadable as a network): for registry/API tests."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "weights.safetensors").write_bytes(payload)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return storage.write_tar(directory, directory.parent / f"{directory.name}.tar")


def seed_fake_model(
    session: Session,
    settings: Settings,
    *,
    name: str = "digits-simcnn",
    dataset: str = "digits",
    arch: str = "simcnn",
    num_classes: int = 10,
    accuracy: float = 0.9,
    payload_bytes: int = 4096,
    status: str = ModelStatus.ready.value,
) -> Model:
    """Insert a ready model with one fake module per class (random weights bytes)."""
    from sqlalchemy import func, select

    version = (session.scalar(select(func.max(Model.version)).where(Model.name == name)) or 0) + 1
    model = Model(
        name=name,
        version=version,
        status=status,
        dataset=dataset,
        arch=arch,
        width=0.125,
        modular=True,
        tau=0.9,
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        input_spec={"channels": 3, "size": 32},
        config={"arch": arch},
        tags={"seed": "fake"},
        accuracy=accuracy,
        krr=0.3,
        cohesion=0.9,
        coupling=0.2,
        params=1000,
        flops=20000,
        train_seconds=1.0,
        epochs=1,
        created_at=utcnow(),
        ready_at=utcnow(),
    )
    session.add(model)
    session.flush()
    mdir = storage.model_dir(settings.artifacts, model.id)
    sha, size = fake_artifact(mdir / "model", os.urandom(payload_bytes), {"kind": "model"})
    model.artifact_path = storage.relative(settings.artifacts, mdir / "model")
    model.sha256, model.size_bytes = sha, size
    for c in range(num_classes):
        d = mdir / "modules" / str(c)
        sha, size = fake_artifact(
            d, os.urandom(payload_bytes), {"kind": "module", "class_index": c}
        )
        session.add(
            Module(
                model_id=model.id,
                class_index=c,
                class_name=str(c),
                dataset=dataset,
                arch=arch,
                krr=0.1 + 0.05 * c,
                accuracy=accuracy - 0.01 * c,
                cohesion=0.9,
                kept_kernels=10 + c,
                total_kernels=100,
                params=100,
                flops=2000,
                artifact_path=storage.relative(settings.artifacts, d),
                sha256=sha,
                size_bytes=size,
            )
        )
    session.commit()
    return model


def seed_trained_model(
    session: Session,
    settings: Settings,
    *,
    seed: int = 0,
    arch: str = "simcnn",
    train_images: int = 256,
    name: str = "digits-tiny",
) -> Model:
    """Train a tiny real MwT model on part of digits (about a second) and register it as ready.

    The registry row and the artifact are real (safetensors + manifest with its modularization),
    so compositions can load and measure it; no module rows are written.
    """
    from dataclasses import replace

    from sqlalchemy import func, select

    from mwt_core.artifacts import save_artifact
    from mwt_core.data.datasets import load_dataset
    from mwt_core.models import architecture_info
    from mwt_core.modularize import modularize
    from mwt_core.training import TrainConfig, train

    data = load_dataset("digits", min_input_size=architecture_info(arch).min_input_size)
    small = replace(data, train_x=data.train_x[:train_images], train_y=data.train_y[:train_images])
    cfg = TrainConfig(
        arch=arch, width=0.125, epochs=1, batch_size=64, seed=seed, device="cpu", mask_lr=0.1
    )
    result = train(cfg, small)
    mz = modularize(result.model, small, device="cpu")
    version = (session.scalar(select(func.max(Model.version)).where(Model.name == name)) or 0) + 1
    model = Model(
        name=name, version=version, status=ModelStatus.pending.value, dataset="digits",
        arch=arch, width=cfg.width, modular=True, tau=mz.tau, num_classes=data.num_classes,
        class_names=list(data.class_names), input_spec=data.spec.to_json(), config={"arch": arch},
        tags={"seed": str(seed)}, accuracy=result.test_acc, krr=mz.model_krr,
        cohesion=mz.cohesion, coupling=mz.coupling, epochs=1, created_at=utcnow(),
    )
    session.add(model)
    session.flush()
    mdir = storage.model_dir(settings.artifacts, model.id)
    save_artifact(
        mdir / "model",
        result.model,
        {
            "dataset": "digits",
            "dataset_ref": "digits",
            "input_spec": data.spec.to_json(),
            "class_names": list(data.class_names),
            "modularization": mz.to_json(),
        },
    )
    model.sha256, model.size_bytes = storage.write_tar(mdir / "model", mdir / "model.tar")
    model.artifact_path = storage.relative(settings.artifacts, mdir / "model")
    model.status, model.ready_at = ModelStatus.ready.value, utcnow()
    session.commit()
    return model


def crash_after_claim(job_id: str, settings_data: dict[str, Any], log_level: str) -> None:
    """Executor target for tests: claim the job like a real run, then die without finishing it."""
    from app.db.session import make_engine, make_sessionmaker
    from worker.jobs import claim, worker_identity

    settings = Settings(**settings_data)
    engine = make_engine(settings)
    claim(make_sessionmaker(engine), job_id, worker_identity())
    os._exit(3)


def claim_and_hang(job_id: str, settings_data: dict[str, Any], log_level: str) -> None:
    """Executor target for tests: claim the job, then hang as a stuck training would."""
    import time

    from app.db.session import make_engine, make_sessionmaker
    from worker.jobs import claim, worker_identity

    settings = Settings(**settings_data)
    claim(make_sessionmaker(make_engine(settings)), job_id, worker_identity())
    time.sleep(3600)


def claim_report_and_hang(job_id: str, settings_data: dict[str, Any], log_level: str) -> None:
    """Executor target for tests: claim the job, report progress once under the real job context
    (heartbeat thread, stall watchdog that exits the process), then hang."""
    import time

    from app.db.session import make_engine, make_sessionmaker
    from worker.jobs import JobContext, _exit_hung_process, claim, worker_identity

    settings = Settings(**settings_data)
    factory = make_sessionmaker(make_engine(settings))
    worker = worker_identity()
    job = claim(factory, job_id, worker)
    if job is None:
        return
    with JobContext(factory, settings, job, worker, on_stall=_exit_hung_process) as ctx:
        ctx.report({"phase": "training", "epoch": 1}, force=True)
        time.sleep(3600)


# ----------------------------------------------------------------------------- processes

REPO_ROOT = Path(__file__).resolve().parents[1]


def mwt_command(args: list[str]) -> list[str]:
    """``mwt ...`` as this environment runs it: the console script if it is ours, else ``python -m app.cli``."""
    import sys

    if args and args[0] == "mwt":
        script = Path(sys.executable).parent / "mwt"
        if script.is_file() and "app.cli" in script.read_text(errors="ignore"):
            return [str(script), *args[1:]]
        return [sys.executable, "-m", "app.cli", *args[1:]]
    return list(args)


class ServiceProcess:
    """A service started in its own session (process group), output to a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        import subprocess

        self.name = name
        self.args = mwt_command(args)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args,
            env=env,
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]

    def kill(self) -> None:
        """SIGKILL the whole process group (what an OOM kill or a lost node looks like)."""
        import signal

        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self, timeout: float = 20.0) -> int | None:
        import signal
        import subprocess

        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def wait_http(url: str, timeout: float = 60.0, proc: ServiceProcess | None = None) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log()}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(
        f"{url} did not answer within {timeout:.0f} s" + (f":\n{proc.log()}" if proc else "")
    )


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without MWT_* variables, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MWT_") or k.startswith("MWT_TEST_")
    }
    env.update(extra or {})
    return env


# ----------------------------------------------------------------------------- docker-compose

_INTERPOLATION = __import__("re").compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def compose_service(
    name: str, compose_file: Path | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command and environment docker compose would give service ``name`` (anchors, merges and
    ``${VAR:-default}`` interpolation resolved against this process's environment)."""
    import yaml

    data = yaml.safe_load((compose_file or REPO_ROOT / "docker-compose.yml").read_text())
    service = data["services"][name]

    def interpolate(value: object) -> str:
        text = str(value)
        return _INTERPOLATION.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), text)

    env_spec = service.get("environment") or {}
    if isinstance(env_spec, list):
        env_spec = dict(item.split("=", 1) for item in env_spec)
    env = {k: interpolate(v) for k, v in env_spec.items()}
    command = service["command"]
    if isinstance(command, str):
        import shlex

        command = shlex.split(command)
    return [interpolate(c) for c in command], env


def localize_env(
    env: dict[str, str], *, database_url: str, redis_db: int, data_dir: Path
) -> dict[str, str]:
    """Point a compose environment at this machine: only host names, ports, database names and the
    volume path change."""
    from urllib.parse import urlsplit, urlunsplit

    from sqlalchemy.engine import make_url

    out = dict(env)
    if "MWT_DATABASE_URL" in out:
        local = make_url(database_url)
        out["MWT_DATABASE_URL"] = (
            make_url(out["MWT_DATABASE_URL"])
            .set(host=local.host, port=local.port, database=local.database)
            .render_as_string(hide_password=False)
        )
    for key in ("MWT_BROKER_URL", "MWT_RESULT_BACKEND"):
        if out.get(key):
            parts = urlsplit(out[key])
            netloc = parts.netloc.rsplit("@", 1)
            auth = netloc[0] + "@" if len(netloc) == 2 else ""
            out[key] = urlunsplit(
                (parts.scheme, f"{auth}{REDIS_HOST}:{REDIS_PORT}", f"/{redis_db}", "", "")
            )
    for key in ("MWT_DATA_DIR", "MWT_ARTIFACT_DIR", "MWT_DATASET_DIR"):
        if out.get(key, "").startswith("/data"):
            out[key] = str(data_dir) + out[key][len("/data") :]
    return out
