"""Throwaway PostgreSQL databases and Redis DBs, free ports: the real services tests run against."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

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
