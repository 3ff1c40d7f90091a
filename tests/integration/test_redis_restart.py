"""Issue 14: a Redis restart (stop, start) while jobs are queued loses none of them.

The broker here is a private ``redis-server`` on a free port, without persistence (the worst
case: every queued message is gone after the restart), so restarting it disturbs no other
test run on the shared Redis. The DB is the source of truth: the reaper sends every queued job
whose message is overdue again, and each job runs once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.client import MwtClient
from tests.support.processes import (
    ServiceProcess,
    clean_env,
    compose_service,
    localize_env,
    wait_http,
)
from tests.support.services import (
    ensure_pg_role,
    free_port,
    port_open,
    postgres_available,
    throwaway_postgres,
)

# A private Redis, an API and a worker process, and four jobs trained through them.
pytestmark = pytest.mark.slow

TINY = {"dataset": "digits", "arch": "simcnn", "width": 0.125, "batch_size": 128}
FAST = {
    "MWT_HEARTBEAT_INTERVAL_S": "1",
    "MWT_STALE_AFTER_S": "6",
    "MWT_REAPER_INTERVAL_S": "1",
    "MWT_REDISPATCH_AFTER_S": "5",
}


class PrivateRedis:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory-policy", "noeviction", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", self.port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[tuple[MwtClient, PrivateRedis]]:
    if not postgres_available():
        pytest.fail("needs PostgreSQL on 127.0.0.1 (see README: Tests)")
    if shutil.which("redis-server") is None:
        pytest.fail("needs the redis-server binary to run a private, restartable Redis")
    redis = PrivateRedis(tmp_path)
    redis.start()
    procs: list[ServiceProcess] = []
    try:
        with ensure_pg_role("mwt", "mwt"), throwaway_postgres(owner="mwt") as url:
            envs = {}
            for name in ("migrate", "api", "worker"):
                _, env = compose_service(name)
                env = localize_env(env, database_url=url, redis_db=0, data_dir=tmp_path / "volume")
                for key in ("MWT_BROKER_URL", "MWT_RESULT_BACKEND"):
                    if env.get(key):
                        env[key] = f"redis://127.0.0.1:{redis.port}/0"
                env.update(FAST)
                envs[name] = clean_env(env)
            cmd, _ = compose_service("migrate")
            migrate = ServiceProcess("migrate", cmd, envs["migrate"], tmp_path)
            assert migrate.proc.wait(120) == 0, migrate.log()
            found = re.search(r"export MWT_API_KEY=(\S+)", migrate.log())
            assert found, migrate.log()
            cmd, _ = compose_service("api")
            port = free_port()
            cmd = [str(port) if p == "--port" else c for p, c in zip([None, *cmd], cmd, strict=False)]
            procs.append(ServiceProcess("api", cmd, envs["api"], tmp_path))
            wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=procs[0])
            cmd, _ = compose_service("worker")
            procs.append(ServiceProcess("worker", cmd, envs["worker"], tmp_path))
            hub = MwtClient(f"http://127.0.0.1:{port}", found.group(1))
            try:
                yield hub, redis
            finally:
                hub.close()
                for p in reversed(procs):
                    p.stop()
    finally:
        redis.stop()


def test_redis_restart_during_a_queue_of_jobs_loses_none(
    private_stack: tuple[MwtClient, PrivateRedis],
) -> None:
    hub, redis = private_stack
    ids = [hub.submit_job(**TINY, epochs=2, seed=i)["id"] for i in range(4)]
    deadline = time.monotonic() + 300
    while hub.job(ids[0])["status"] == "queued":  # the worker is busy; the rest wait in Redis
        assert time.monotonic() < deadline
        time.sleep(0.3)
    redis.stop()  # every queued message is gone (no persistence)
    time.sleep(3)
    redis.start()
    terminal = ("succeeded", "failed", "cancelled")
    deadline = time.monotonic() + 900
    while True:
        jobs = [hub.job(j) for j in ids]
        if all(j["status"] in terminal for j in jobs):
            break
        assert time.monotonic() < deadline, [(j["id"], j["status"], j["error"]) for j in jobs]
        time.sleep(1)
    assert [j["status"] for j in jobs] == ["succeeded"] * 4, [(j["status"], j["error"]) for j in jobs]
    assert hub.jobs(status="running")["total"] == 0
