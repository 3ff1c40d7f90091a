"""Registry queries under load: `wrk` against one `mwt serve` (embedded SQLite, default settings),
with the response cache on and off, one after the other on the same machine.

Registers ``--models`` models of ten modules each (fake weights: the query reads rows, not files),
then runs ``wrk -t2 -c50`` on a filtered module query. `wrk` is a C load generator
(`apt-get install wrk`): a Python client would cost as much CPU as the server it measures.

    python bench/registry_load.py                       # cache 1 s and off, 10 s each
    python bench/registry_load.py --cache 1 0 --duration 10 --connections 50
    python bench/registry_load.py --stack postgres      # `mwt api` on a throwaway Postgres database

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from _main import bench_main
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.auth import ensure_admin_key  # noqa: E402
from app.db import migrate  # noqa: E402
from app.db.session import make_engine, make_sessionmaker  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests.support.processes import ServiceProcess, clean_env, wait_http  # noqa: E402
from tests.support.registry import seed_fake_model  # noqa: E402
from tests.support.services import free_port, throwaway_postgres  # noqa: E402

QUERY = "/api/v1/modules?dataset=digits&class_name=3&sort=-krr"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=float, nargs="+", default=[1.0, 0.0],
                   help="MWT_RESPONSE_CACHE_S values to run (0: off)")
    p.add_argument("--stack", choices=["embedded", "postgres"], default="embedded",
                   help="embedded: `mwt serve` on SQLite; postgres: `mwt api` (the distributed "
                        "stack's API process) on a throwaway database of the local Postgres")
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--duration", type=int, default=10, help="seconds of load per run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of load before each run")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    return p.parse_args(argv)


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests per second, latency percentiles (ms) and failures from ``wrk --latency``."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise ValueError(f"wrk printed no rate:\n{out}")
    fig: dict[str, float] = {"req_per_s": float(rps.group(1))}
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.MULTILINE)
        fig[f"p{q}_ms"] = _ms(m.group(1)) if m else float("nan")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    fig["non_2xx"] = float(bad.group(1)) if bad else 0.0
    return fig


def _wrk(args: argparse.Namespace, url: str, key: str, seconds: int) -> str:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--latency",
           "-H", f"Authorization: Bearer {key}", url]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def one_run(args: argparse.Namespace, ttl: float, root: Path) -> dict[str, float]:
    if args.stack == "postgres":
        with throwaway_postgres("mwt_bench") as url:
            return _serve_and_load(args, ttl, root, url)
    return _serve_and_load(args, ttl, root, "")


def _serve_and_load(args: argparse.Namespace, ttl: float, root: Path, url: str) -> dict[str, float]:
    data = root / f"cache-{ttl:g}"
    settings = Settings(data_dir=data, database_url=url)
    migrate.upgrade(settings)
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        for i in range(args.models):
            seed_fake_model(s, settings, accuracy=0.8 + 0.01 * i)
        s.commit()
    engine.dispose()
    port, key = free_port(), "mwt_bench_" + secrets.token_hex(16)
    env = clean_env({"MWT_DATA_DIR": str(data), "MWT_BOOTSTRAP_ADMIN_KEY": key,
                     "MWT_RESPONSE_CACHE_S": str(ttl), "OMP_NUM_THREADS": "1"})
    if url:
        env.update({"MWT_DATABASE_URL": url, "MWT_BROKER_URL": "redis://127.0.0.1:6379/15"})
        # `mwt api` installs no key; the bench's admin key goes in as `mwt serve` would.
        engine = make_engine(settings)
        ensure_admin_key(make_sessionmaker(engine), settings.model_copy(update={"bootstrap_admin_key": key}))
        engine.dispose()
    command = ["mwt", "api", "--port", str(port)] if url else ["mwt", "serve", "--port", str(port)]
    proc = ServiceProcess("api" if url else "serve", command, env, root)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", timeout=90, proc=proc)
        if args.warmup:
            _wrk(args, base + QUERY, key, args.warmup)
        return parse_wrk(_wrk(args, base + QUERY, key, args.duration))
    finally:
        proc.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise ValueError("wrk is not installed (apt-get install wrk)")
    if args.duration < 1 or args.connections < 1 or args.models < 1:
        raise ValueError("--duration, --connections and --models must be >= 1")
    result: dict[str, Any] = {"stack": args.stack, "query": QUERY, "connections": args.connections,
                              "duration_s": args.duration, "models": args.models, "runs": {}}
    with TemporaryDirectory(prefix="mwt-registry-load-") as tmp:
        for ttl in args.cache:
            result["runs"][f"{ttl:g}"] = one_run(args, ttl, Path(tmp))
    runs = result["runs"]
    if "0" in runs:
        for ttl, fig in runs.items():
            result[f"speedup_cache_{ttl}"] = fig["req_per_s"] / runs["0"]["req_per_s"]
    return result


def render(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{result['stack']}: GET {result['query']} — wrk, {result['connections']} connections, "
                        f"{result['duration_s']} s")
    for col in ("response cache", "req/s", "p50 ms", "p90 ms", "p99 ms", "non-2xx"):
        table.add_column(col, justify="left" if col == "response cache" else "right")
    for ttl, f in result["runs"].items():
        table.add_row("off" if float(ttl) == 0 else f"{ttl} s", f"{f['req_per_s']:,.0f}",
                      f"{f['p50_ms']:.1f}", f"{f['p90_ms']:.1f}", f"{f['p99_ms']:.1f}",
                      f"{f['non_2xx']:.0f}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(bench_main(parse_args, run, render))
