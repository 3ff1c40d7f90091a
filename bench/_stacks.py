"""The service stacks the benchmarks start on this machine, all on 127.0.0.1:

- embedded: one ``mwt serve`` (SQLite registry, in-process job executor);
- distributed: the docker-compose services ``migrate``, ``api`` and ``worker`` started with the
  compose file's own commands and environment, pointed at the local Postgres (a throwaway
  database) and Redis (an empty database number).

Both take ``env`` (extra ``MWT_*`` settings for every service) and ``prepare`` (called with the
services' settings on the migrated, empty registry before the API starts: to seed it).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.db import migrate  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests.support.processes import (  # noqa: E402
    ServiceProcess,
    clean_env,
    compose_service,
    localize_env,
    wait_http,
)
from tests.support.services import (  # noqa: E402
    ensure_pg_role,
    free_port,
    throwaway_postgres,
    throwaway_redis_db,
)

Prepare = Callable[[Settings], None]


@dataclass
class Stack:
    """A running stack: where its API answers, the admin key, and its processes."""

    name: str
    root: Path
    base: str
    token: str
    settings: Settings  # what the services run with (the registry, the artifact store)
    api: ServiceProcess
    worker_env: dict[str, str] | None = None  # None: jobs run in the API's own executor
    workers: list[ServiceProcess] = field(default_factory=list)

    def start_worker(self) -> ServiceProcess:
        """One more Celery worker as the compose file runs it (a supervisor's restart)."""
        if self.worker_env is None:
            raise ValueError(f"the {self.name} stack has no Celery workers")
        cmd, _ = compose_service("worker")
        w = ServiceProcess(f"worker{len(self.workers)}", cmd, self.worker_env, self.root)
        self.workers.append(w)
        return w


def settings_from_env(env: dict[str, str]) -> Settings:
    """The ``Settings`` a service started with ``env`` reads (its ``MWT_*`` variables)."""
    fields = {k.removeprefix("MWT_").lower(): v for k, v in env.items() if k.startswith("MWT_")}
    return Settings(**{k: v for k, v in fields.items() if k in Settings.model_fields})


@contextlib.contextmanager
def embedded_stack(
    root: Path, env: dict[str, str] | None = None, prepare: Prepare | None = None
) -> Iterator[Stack]:
    """``mwt serve`` on a fresh data directory under ``root``, a free port, a generated key."""
    port = free_port()
    key_file = root / "admin.key"
    full = clean_env({"MWT_DATA_DIR": str(root / "data"), "MWT_LOG_LEVEL": "warning", **(env or {})})
    settings = settings_from_env(full)
    if prepare is not None:
        migrate.upgrade(settings)  # `mwt serve` migrates too; seeding needs the tables first
        prepare(settings)
    proc = ServiceProcess(
        "serve", ["mwt", "serve", "--port", str(port), "--key-file", str(key_file)], full, root
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, proc)
        yield Stack("embedded", root, f"http://127.0.0.1:{port}", key_file.read_text().strip(),
                    settings, proc)
    finally:
        proc.stop()


@contextlib.contextmanager
def distributed_stack(
    root: Path, env: dict[str, str] | None = None, prepare: Prepare | None = None
) -> Iterator[Stack]:
    """The compose file's migrate, api and one worker on a throwaway Postgres database and
    Redis database number; the volume is ``root/volume``."""
    with (
        ensure_pg_role("mwt", "mwt"),
        throwaway_postgres("mwt_bench", owner="mwt") as url,
        throwaway_redis_db() as rdb,
    ):

        def env_of(service: str) -> dict[str, str]:
            _, service_env = compose_service(service)
            service_env = localize_env(service_env, database_url=url, redis_db=rdb,
                                       data_dir=root / "volume")
            return clean_env({**service_env, "MWT_LOG_LEVEL": "warning", **(env or {})})

        cmd, _ = compose_service("migrate")
        mig = ServiceProcess("migrate", cmd, env_of("migrate"), root)
        if mig.proc.wait(120) != 0:
            raise RuntimeError(mig.log())
        token = re.search(r"export MWT_API_KEY=(\S+)", mig.log())
        if token is None:
            raise RuntimeError(f"no admin key printed by migrate:\n{mig.log()}")
        api_env = env_of("api")
        settings = settings_from_env(api_env)
        if prepare is not None:
            prepare(settings)
        port = free_port()
        cmd, _ = compose_service("api")
        cmd = [
            str(port) if prev == "--port" else c for prev, c in zip([None, *cmd], cmd, strict=False)
        ]
        api = ServiceProcess("api", cmd, api_env, root)
        stack = Stack("distributed", root, f"http://127.0.0.1:{port}", token.group(1), settings,
                      api, worker_env=env_of("worker"))
        try:
            stack.start_worker()
            wait_http(f"http://127.0.0.1:{port}/health", 120, api)
            yield stack
        finally:
            for w in stack.workers:
                w.stop()
            api.stop()
