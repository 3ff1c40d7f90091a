"""API benchmark: module queries and downloads under 50 concurrent clients, and compose latency
(one model, and across two models).

Runs against two stacks it starts itself, each with one tiny model trained on digits first:
- embedded: `mwt serve` (SQLite registry, in-process executor);
- postgres: the docker-compose services `migrate`, `api` and `worker`, started with the compose file's
  commands and environment, pointed at the local Postgres (throwaway database) and Redis.

    python bench/api.py                      # both stacks, 10 s per workload, 50 clients
    python bench/api.py --stacks embedded --duration 5

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stacks import distributed_stack, embedded_stack  # noqa: E402

from app.client import MwtClient  # noqa: E402
from tests.support.services import postgres_available, redis_available  # noqa: E402

TRAIN = {"dataset": "digits", "arch": "simcnn", "width": 0.125, "epochs": 1, "batch_size": 128}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


async def load(
    base: str, token: str, paths: list[str], concurrency: int, duration: float
) -> dict[str, Any]:
    """``concurrency`` clients request random ``paths`` back to back for ``duration`` seconds."""
    lat: list[float] = []
    errors = 0
    nbytes = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, limits=limits, timeout=60
    ) as client:
        # warm-up (connections, caches)
        await asyncio.gather(*(client.get(random.choice(paths)) for _ in range(concurrency)))
        deadline = time.perf_counter() + duration

        async def one() -> None:
            nonlocal errors, nbytes
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await client.get(random.choice(paths))
                    nbytes += len(r.content)
                    if r.status_code != 200:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "requests": len(lat),
        "errors": errors,
        "rps": len(lat) / elapsed,
        "p50_ms": 1000 * pct(lat, 50),
        "p99_ms": 1000 * pct(lat, 99),
        "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"),
        "mb_per_s": nbytes / elapsed / 1e6,
        "concurrency": concurrency,
        "duration_s": round(elapsed, 2),
    }


def compose_latency(hub: MwtClient, model_id: int, num_classes: int, n: int) -> dict[str, Any]:
    """Sequential compositions of distinct 3-class subsets (each built and evaluated anew), then repeats."""
    rng = random.Random(0)
    subsets: list[list[int]] = []
    while len(subsets) < n:
        s = sorted(rng.sample(range(num_classes), 3))
        if s not in subsets and s != [3, 5, 8]:
            subsets.append(s)
    fresh, again = [], []
    accs = []
    # The first composition of a model loads its artifact and dataset into the API's cache.
    t0 = time.perf_counter()
    hub.compose(model_id, [3, 5, 8])
    cold = time.perf_counter() - t0
    for s in subsets:
        t0 = time.perf_counter()
        comp = hub.compose(model_id, s)
        fresh.append(time.perf_counter() - t0)
        accs.append(comp["accuracy"])
    for s in subsets:
        t0 = time.perf_counter()
        hub.compose(model_id, s)
        again.append(time.perf_counter() - t0)
    return {
        "n": n,
        "p50_ms": 1000 * pct(fresh, 50),
        "p99_ms": 1000 * pct(fresh, 99),
        "max_ms": 1000 * max(fresh),
        "cold_ms": 1000 * cold,
        "existing_p50_ms": 1000 * pct(again, 50),
        "mean_accuracy": statistics.fmean(accs),
    }


def across_latency(hub: MwtClient, a: int, b: int, n: int) -> dict[str, Any]:
    """Sequential cross-model compositions: 2 classes of model ``a`` + 2 of model ``b``, each new."""
    rng = random.Random(1)
    pairs: list[tuple[list[int], list[int]]] = []
    while len(pairs) < n:
        four = rng.sample(range(10), 4)
        pair = (sorted(four[:2]), sorted(four[2:]))
        if pair not in pairs:
            pairs.append(pair)
    t0 = time.perf_counter()
    hub.compose_across([(a, [0, 1]), (b, [2, 3])])  # loads the second model into the cache
    cold = time.perf_counter() - t0
    times, accs, raw = [], [], []
    for ca, cb in pairs:
        t0 = time.perf_counter()
        comp = hub.compose_across([(a, ca), (b, cb)])
        times.append(time.perf_counter() - t0)
        accs.append(comp["accuracy"])
        raw.append(comp["metrics"]["uncalibrated_accuracy"])
    return {
        "n": n,
        "p50_ms": 1000 * pct(times, 50),
        "p99_ms": 1000 * pct(times, 99),
        "cold_ms": 1000 * cold,
        "mean_accuracy": statistics.fmean(accs),
        "mean_uncalibrated_accuracy": statistics.fmean(raw),
    }


def prepare(hub: MwtClient, seed: int = 0) -> tuple[int, list[dict[str, Any]]]:
    job = hub.submit_job(**TRAIN, seed=seed)
    final = hub.wait(job["id"], timeout=1800)
    if final["status"] != "succeeded":
        raise RuntimeError(f"training job failed: {final['error']}")
    mods = hub.modules(model_id=final["model_id"], limit=100)["items"]
    return final["model_id"], mods


def run_workloads(name: str, base: str, token: str, args: argparse.Namespace) -> dict[str, Any]:
    with MwtClient(base, token, timeout=120) as hub:
        t0 = time.perf_counter()
        model_id, mods = prepare(hub)
        train_s = time.perf_counter() - t0
        queries = [
            f"/api/v1/modules?dataset=digits&class_index={m['class_index']}&max_krr=1&min_accuracy=0&limit=10"
            for m in mods
        ] + ["/api/v1/modules?dataset=digits&limit=50", "/api/v1/modules?class_name=3&sort=-krr"]
        downloads = [m["download_url"] for m in mods]
        print(
            f"[{name}] model {model_id} ready in {train_s:.0f} s; module size {mods[0]['size_bytes']} bytes",
            file=sys.stderr,
        )
        q = asyncio.run(load(base, token, queries, args.concurrency, args.duration))
        print(f"[{name}] module queries: {q['rps']:.0f} req/s", file=sys.stderr)
        d = asyncio.run(load(base, token, downloads, args.concurrency, args.duration))
        print(f"[{name}] downloads: {d['rps']:.0f} req/s", file=sys.stderr)
        c = compose_latency(hub, model_id, 10, args.compose_n)
        print(f"[{name}] compose p50 {c['p50_ms']:.0f} ms", file=sys.stderr)
        second, _ = prepare(hub, seed=1)
        x = across_latency(hub, model_id, second, args.compose_n)
        print(f"[{name}] compose across 2 models p50 {x['p50_ms']:.0f} ms", file=sys.stderr)
    return {
        "module_queries": q,
        "downloads": d,
        "compose": c,
        "compose_across": x,
        "module_bytes": mods[0]["size_bytes"],
        "prepare_s": round(train_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--stacks", default="embedded,postgres", help="comma-separated: embedded, postgres"
    )
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load workload")
    ap.add_argument("--compose-n", type=int, default=10, help="compositions to time")
    args = ap.parse_args()

    results: dict[str, Any] = {}
    for name in [s.strip() for s in args.stacks.split(",") if s.strip()]:
        with TemporaryDirectory(prefix=f"mwt-bench-{name}-") as tmp:
            if name == "embedded":
                ctx = embedded_stack(Path(tmp))
            elif name == "postgres":
                if not (postgres_available() and redis_available()):
                    print("[postgres] skipped: PostgreSQL/Redis not reachable", file=sys.stderr)
                    continue
                ctx = distributed_stack(Path(tmp))
            else:
                raise SystemExit(f"unknown stack {name!r}")
            with ctx as stack:
                results[name] = run_workloads(name, stack.base, stack.token, args)

    print()
    header = f"{'stack':<10} {'workload':<16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'MB/s':>7}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        for label, key in (("module query", "module_queries"), ("module download", "downloads")):
            w = r[key]
            print(
                f"{name:<10} {label:<16} {w['rps']:>8.0f} {w['p50_ms']:>8.1f} {w['p99_ms']:>8.1f} "
                f"{w['errors']:>7} {w['mb_per_s']:>7.1f}"
            )
        c = r["compose"]
        print(
            f"{name:<10} {'compose (new)':<16} {1000 / c['p50_ms']:>8.1f} {c['p50_ms']:>8.1f} "
            f"{c['p99_ms']:>8.1f} {0:>7} {'-':>7}"
        )
        print(
            f"{name:<10} {'compose (cold)':<16} {1000 / c['cold_ms']:>8.1f} {c['cold_ms']:>8.1f} "
            f"{'-':>8} {0:>7} {'-':>7}"
        )
        print(
            f"{name:<10} {'compose (exists)':<16} {1000 / c['existing_p50_ms']:>8.1f} "
            f"{c['existing_p50_ms']:>8.1f} {'-':>8} {0:>7} {'-':>7}"
        )
        x = r["compose_across"]
        print(
            f"{name:<10} {'compose 2 models':<16} {1000 / x['p50_ms']:>8.1f} {x['p50_ms']:>8.1f} "
            f"{x['p99_ms']:>8.1f} {0:>7} {'-':>7}"
        )
    print(
        f"\n{args.concurrency} concurrent clients, {args.duration:.0f} s per load workload; compose: "
        f"{args.compose_n} distinct 3-class subsets, sequential, after one cold composition (model and\n"
        "dataset loaded into the API's cache); 'exists' = the same request again (registry lookup);\n"
        "'2 models': 2 classes of each of two models, calibrated on 20 training images per class.\n"
        "Client and server share this machine; req/s for compose = 1000 / p50."
    )
    summary = {
        "bench": "api",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "results": results,
    }
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
