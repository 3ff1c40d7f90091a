"""Soak: one API under a bounded, mixed load with a training job whose process is killed once.

Starts one stack on 127.0.0.1 (``bench/_stacks.py``): ``embedded`` is one ``mwt serve``;
``celery`` is the compose file's migrate + API + one Celery worker on Redis and a throwaway
Postgres database. Two tiny trained models are registered first (with their modules), then
``--clients`` threads send, for ``--duration`` seconds, a random mix of

- query:    module, model and composition listings with random filters and sorts;
- download: module, model and composition archives, each body's sha256 checked against the
            registry's and the response's ``X-Checksum-Sha256``;
- predict:  JSON images to modules, models and compositions;
- export:   TorchScript and ONNX exports of modules, models and compositions (sha256 = ETag);
- compose:  compositions of one model's classes, across both models, and of stored modules;
- job:      polls of the training job.

One training job runs meanwhile. Once it has checkpointed an epoch (at ``--kill-after`` seconds
into the load, or earlier if that epoch is its last but one), the process running it is SIGKILLed:
the embedded executor's job subprocess, or the Celery worker (which a supervisor then restarts, as
the compose file's ``restart: unless-stopped`` does). The job must resume from its checkpoint and
succeed; the bench waits for it after the load (``--job-timeout``).

Clients honour 429/503 + Retry-After (counted, then they back off). A 5xx, a transport error or a
checksum mismatch is reported as it is, never retried away.

    python bench/soak.py                          # embedded, 300 s, 16 clients
    python bench/soak.py --stack celery           # API + Celery worker + Redis + Postgres
    python bench/soak.py --duration 15 --job-train-images 128 --epochs 2 --results /tmp/s.md

Prints a table, then one JSON line; the table also goes to ``--results``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
import numpy as np
from _main import bench_main
from _stacks import Stack, distributed_stack, embedded_stack
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.settings import Settings  # noqa: E402
from tests.support.services import postgres_available, redis_available  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("query", "download", "predict", "export", "compose", "job")
# Share of each kind among the clients' requests (the job's own polls and its submission add to "job").
MIX = {"query": 30, "download": 25, "predict": 15, "export": 10, "compose": 15, "job": 5}
RSS_LIMIT_MB = 2048.0
TERMINAL = ("succeeded", "failed", "cancelled")
# The Celery stack notices its killed worker by the job's silent heartbeat; with the compose
# file's 120 s the job would wait two minutes of the soak for it. The integration tests of
# that stack use the same short timings.
FAST_REAPER = {"MWT_HEARTBEAT_INTERVAL_S": "1", "MWT_STALE_AFTER_S": "6",
               "MWT_REAPER_INTERVAL_S": "1"}
BACKOFF_CAP_S = 10.0
PREDICT_IMAGES = 2


def _mix(text: str) -> dict[str, float]:
    """``--mix``: ``compose=1,predict=2`` -> every kind's weight (0 for those left out)."""
    out = dict.fromkeys(KINDS, 0.0)
    for item in text.split(","):
        kind, _, weight = item.partition("=")
        if kind.strip() not in out:
            raise argparse.ArgumentTypeError(f"unknown kind {kind.strip()!r}; kinds: {', '.join(KINDS)}")
        try:
            out[kind.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be a number") from None
    if min(out.values()) < 0 or not sum(out.values()):
        raise argparse.ArgumentTypeError("weights must be >= 0, and one of them > 0")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stack", choices=["embedded", "celery"], default="embedded")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (threads)")
    p.add_argument("--mix", type=_mix, default=MIX,
                   help="the clients' requests, as KIND=WEIGHT,... (kinds left out: none); "
                        "default: " + ",".join(f"{k}={v}" for k, v in MIX.items()))
    p.add_argument("--epochs", type=int, default=4, help="of the training job")
    p.add_argument("--width", type=float, default=0.125, help="of the training job")
    p.add_argument("--job-train-images", type=int, default=0,
                   help="train the job on an uploaded subset of digits this large (0: all of digits)")
    p.add_argument("--kill-after", type=float, default=None,
                   help="kill the job at its first checkpoint this many seconds into the load "
                        "(default: a third of --duration)")
    p.add_argument("--job-timeout", type=float, default=900.0,
                   help="seconds to wait for the job after the load ends")
    p.add_argument("--seed-images", type=int, default=256,
                   help="training images of each of the two registered models")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None,
                   help="copy the services' logs here at the end (they go with the stack otherwise)")
    p.add_argument("--results", default=None,
                   help="markdown file for the table (default: bench/results/soak-<stack>.md; '' = none)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- measurements


@dataclass
class Tally:
    """What came back for one kind of request."""

    codes: Counter[str] = field(default_factory=Counter)  # "200", "503", "error" (transport)
    ok_s: list[float] = field(default_factory=list)  # latencies of 2xx/3xx answers


class Recorder:
    """Every request's outcome, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tally = {k: Tally() for k in KINDS}
        self.checksum_checks = 0
        self.mismatches: list[str] = []
        self.samples: list[str] = []  # the first few 5xx answers and transport errors
        self.wrong_answers: list[str] = []  # 200s that do not answer what was asked
        self.backoff_s = 0.0
        self.throttled: Counter[str] = Counter()  # 429/503 that said when to come back (Retry-After)

    def record(self, kind: str, code: str, seconds: float, what: str = "", body: str = "") -> None:
        with self.lock:
            t = self.tally[kind]
            t.codes[code] += 1
            if code[0] in "23":
                t.ok_s.append(seconds)
            elif (code == "error" or code[0] == "5") and len(self.samples) < 10:
                self.samples.append(f"{kind} {what} -> {code}: {body[:300]}")

    def checksum(self, ok: bool, what: str) -> None:
        with self.lock:
            self.checksum_checks += 1
            if not ok:
                self.mismatches.append(what)

    def wrong(self, what: str) -> None:
        with self.lock:
            self.wrong_answers.append(what)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind, t in self.tally.items():
            codes = dict(sorted(t.codes.items()))
            lat = np.array(t.ok_s) * 1000
            out[kind] = {
                "requests": sum(codes.values()),
                "by_status": codes,
                "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            }
        return out


def _proc_status_kb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    """VmRSS of one process every ``period`` seconds; its VmHWM (the kernel's peak) on demand."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[float] = []
        self.load_samples: int | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            kb = _proc_status_kb(self.pid, "VmRSS")
            if kb is not None:
                self.samples.append(kb / 1024)
            self.stop_event.wait(self.period)

    def load_over(self) -> None:
        """Mark the end of the load: the timeline stops here (the peak does not)."""
        self.load_samples = len(self.samples)

    def finish(self, points: int = 11) -> dict[str, Any]:
        hwm = _proc_status_kb(self.pid, "VmHWM")  # read before the process is stopped
        self.stop_event.set()
        self.join()
        peak = max([*self.samples, (hwm or 0) / 1024]) if self.samples or hwm else None
        load = self.samples[:self.load_samples]
        # Evenly spaced samples, first to last: a leak climbs, a filling cache levels off.
        timeline = [round(load[round(i * (len(load) - 1) / (points - 1))], 1)
                    for i in range(points)] if load else []
        return {
            "peak_rss_mb": round(peak, 1) if peak is not None else None,
            "vmhwm_mb": round(hwm / 1024, 1) if hwm is not None else None,
            "start_rss_mb": timeline[0] if timeline else None,
            "end_rss_mb": timeline[-1] if timeline else None,
            "rss_timeline_mb": timeline,
        }


# ----------------------------------------------------------------------------- the registry


def seed_models(count: int, train_images: int) -> Any:
    """``prepare`` for the stack: ``count`` tiny trained models with their modules."""

    def prepare(settings: Settings) -> None:
        from app.db.session import make_engine, make_sessionmaker
        from tests.support.registry import seed_trained_model

        engine = make_engine(settings)
        try:
            with make_sessionmaker(engine)() as s:
                for i in range(count):
                    seed_trained_model(s, settings, seed=i, train_images=train_images,
                                       with_modules=True, time_modules=False)
        finally:
            engine.dispose()

    return prepare


@dataclass
class Target:
    """Something stored that can be downloaded, exported and predicted with."""

    kind: str  # module | model | composition
    id: int
    sha256: str


class Registry:
    """The stored things the clients pick from; compositions are added as clients make them."""

    def __init__(self, http: httpx.Client) -> None:
        models = http.get("/api/v1/models", params={"limit": 100}).raise_for_status().json()["items"]
        mods = http.get("/api/v1/modules", params={"limit": 100}).raise_for_status().json()["items"]
        if len(models) < 2 or not mods:
            raise RuntimeError(f"the registry holds {len(models)} model(s), {len(mods)} module(s)")
        self.models = [Target("model", m["id"], m["sha256"]) for m in models]
        self.classes = {m["id"]: m["num_classes"] for m in models}
        self.modules = [Target("module", m["id"], m["sha256"]) for m in mods]
        first = http.get(f"/api/v1/models/{models[0]['id']}").raise_for_status().json()
        spec = first["input_spec"]
        self.shape = (int(spec["channels"]), int(spec["size"]), int(spec["size"]))
        self.compositions: list[Target] = []
        self.lock = threading.Lock()

    def add_composition(self, comp: dict[str, Any]) -> None:
        if comp.get("sha256"):
            with self.lock:
                if all(c.id != comp["id"] for c in self.compositions):
                    self.compositions.append(Target("composition", comp["id"], comp["sha256"]))

    def pick(self, rng: random.Random, weights: dict[str, float]) -> Target:
        with self.lock:
            pools = {"module": self.modules, "model": self.models,
                     "composition": list(self.compositions)}
        kinds = [k for k in weights if pools[k]]
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        return rng.choice(pools[kind])


# ----------------------------------------------------------------------------- the clients


def _plural(kind: str) -> str:
    return {"module": "modules", "model": "models", "composition": "compositions"}[kind]


class Client(threading.Thread):
    """One client: random requests of the mix until the deadline."""

    def __init__(self, index: int, stack: Stack, args: argparse.Namespace, reg: Registry,
                 rec: Recorder, payloads: list[bytes], job_id: str, deadline: float) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.rng = random.Random(args.seed * 1000 + index)
        self.stack, self.args, self.reg, self.rec = stack, args, reg, rec
        self.payloads, self.job_id, self.deadline = payloads, job_id, deadline

    def run(self) -> None:
        kinds, weights = list(self.args.mix), list(self.args.mix.values())
        with httpx.Client(base_url=self.stack.base, timeout=self.args.request_timeout,
                          headers={"Authorization": f"Bearer {self.stack.token}"}) as http:
            while time.monotonic() < self.deadline:
                kind = self.rng.choices(kinds, weights)[0]
                getattr(self, kind)(http)

    def send(self, http: httpx.Client, kind: str, method: str, url: str,
             **kw: Any) -> httpx.Response | None:
        """One request, recorded; after a 429/503 this client waits as Retry-After asks."""
        t0 = time.monotonic()
        try:
            r = http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            self.rec.record(kind, "error", time.monotonic() - t0, f"{method} {url}",
                            f"{type(exc).__name__}: {exc}")
            return None
        took = time.monotonic() - t0
        self.rec.record(kind, str(r.status_code), took, f"{method} {url}", r.text if
                        r.status_code >= 500 else "")
        if r.status_code in (429, 503):
            self.back_off(r)
        return r

    def back_off(self, r: httpx.Response) -> None:
        """Wait as the answer's Retry-After says (1 s without one: it is counted as an error)."""
        try:
            wait = float(r.headers.get("retry-after", "1"))
        except ValueError:
            wait = 1.0  # an HTTP date: not worth parsing for a wait this short
        wait = min(max(wait, 0.1), BACKOFF_CAP_S, max(0.0, self.deadline - time.monotonic()))
        wait *= 1 + 0.2 * self.rng.random()  # spread the retries of clients refused together
        with self.rec.lock:
            self.rec.backoff_s += wait
            if "retry-after" in r.headers:
                self.rec.throttled[str(r.status_code)] += 1
        time.sleep(wait)

    # -- the kinds

    def query(self, http: httpx.Client) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.6:
            params: dict[str, Any] = {"dataset": "digits",
                                      "sort": rng.choice(["krr", "-krr", "accuracy", "-accuracy",
                                                          "id", "-created"])}
            if rng.random() < 0.5:
                params["class_index"] = rng.randrange(10)
            if rng.random() < 0.3:
                params["max_krr"] = round(rng.uniform(0.2, 1.0), 2)
            if rng.random() < 0.3:
                params["min_accuracy"] = round(rng.uniform(0.0, 0.5), 2)
            if rng.random() < 0.3:
                params["model_id"] = rng.choice(self.reg.models).id
            self.send(http, "query", "GET", "/api/v1/modules", params=params)
        elif r < 0.75:
            self.send(http, "query", "GET", f"/api/v1/modules/{rng.choice(self.reg.modules).id}")
        elif r < 0.9:
            self.send(http, "query", "GET", "/api/v1/models", params={"sort": "-accuracy"})
        else:
            self.send(http, "query", "GET", "/api/v1/compositions", params={"limit": 20})

    def download(self, http: httpx.Client) -> None:
        t = self.reg.pick(self.rng, {"module": 0.7, "model": 0.15, "composition": 0.15})
        url = f"/api/v1/{_plural(t.kind)}/{t.id}/download"
        r = self.send(http, "download", "GET", url)
        if r is not None and r.status_code == 200:
            got = hashlib.sha256(r.content).hexdigest()
            said = r.headers.get("x-checksum-sha256")
            self.rec.checksum(got == t.sha256 == said,
                              f"{url}: body {got}, registry {t.sha256}, header {said}")

    def predict(self, http: httpx.Client) -> None:
        t = self.reg.pick(self.rng, {"module": 0.5, "model": 0.25, "composition": 0.25})
        r = self.send(http, "predict", "POST", f"/api/v1/{_plural(t.kind)}/{t.id}/predict",
                      content=self.rng.choice(self.payloads),
                      headers={"Content-Type": "application/json"})
        if r is not None and r.status_code == 200 and len(r.json()["predictions"]) != PREDICT_IMAGES:
            self.rec.wrong(f"{t.kind} {t.id} answered {r.text[:300]}")

    def export(self, http: httpx.Client) -> None:
        t = self.reg.pick(self.rng, {"module": 0.6, "model": 0.1, "composition": 0.3})
        fmt = self.rng.choice(["torchscript", "onnx"])
        url = f"/api/v1/{_plural(t.kind)}/{t.id}/export"
        r = self.send(http, "export", "GET", url, params={"format": fmt})
        if r is not None and r.status_code == 200:
            got = hashlib.sha256(r.content).hexdigest()
            etag = r.headers.get("etag", "").strip('"')
            self.rec.checksum(got == etag, f"{url}?format={fmt}: body {got}, ETag {etag}")

    def compose(self, http: httpx.Client) -> None:
        rng, reg = self.rng, self.reg
        a, b = rng.sample(reg.models, 2)
        form = rng.random()
        body: dict[str, Any]
        if form < 0.5:
            body = {"model_id": a.id,
                    "classes": sorted(rng.sample(range(reg.classes[a.id]), rng.randint(2, 4)))}
        elif form < 0.75:
            ca = rng.sample(range(reg.classes[a.id]), 2)
            cb = rng.sample(range(reg.classes[b.id]), 2)
            body = {"sources": [{"model_id": a.id, "classes": ca}, {"model_id": b.id, "classes": cb}]}
        else:
            body = {"modules": [m.id for m in rng.sample(reg.modules, rng.randint(2, 4))]}
        r = self.send(http, "compose", "POST", "/api/v1/compositions", json=body)
        if r is not None and r.status_code in (200, 201):
            reg.add_composition(r.json())

    def job(self, http: httpx.Client) -> None:
        if self.rng.random() < 0.7:
            self.send(http, "job", "GET", f"/api/v1/jobs/{self.job_id}")
        else:
            self.send(http, "job", "GET", "/api/v1/jobs", params={"limit": 10})


def predict_payloads(shape: tuple[int, int, int], seed: int, count: int = 8) -> list[bytes]:
    """JSON bodies of ``PREDICT_IMAGES`` random images each (made once: clients only send)."""
    gen = np.random.default_rng(seed)
    return [json.dumps(np.round(gen.random((PREDICT_IMAGES, *shape)), 3).tolist()).encode()
            for _ in range(count)]


# ----------------------------------------------------------------------------- the job


def upload_subset(http: httpx.Client, images: int) -> str:
    """Upload the first ``images`` training images of digits (and its whole test split) as a
    dataset; its name."""
    from mwt_core.data.datasets import load_dataset
    from mwt_core.models import architecture_info

    d = load_dataset("digits", min_input_size=architecture_info("simcnn").min_input_size)
    buf = io.BytesIO()
    np.savez(buf, x_train=d.train_x[:images].numpy(), y_train=d.train_y[:images].numpy(),
             x_test=d.test_x.numpy(), y_test=d.test_y.numpy(), class_names=np.array(d.class_names))
    name = f"soak-digits-{images}"
    http.post("/api/v1/datasets", files={"file": (f"{name}.npz", buf.getvalue())},
              data={"name": name}, timeout=120).raise_for_status()
    return name


class JobWatch(threading.Thread):
    """Watches the training job, kills the process running it once it has checkpointed an
    epoch, restarts a killed Celery worker, and waits for the job to end."""

    def __init__(self, stack: Stack, rec: Recorder, job_id: str, epochs: int,
                 load_start: float, kill_at: float, load_end: float, give_up_at: float) -> None:
        super().__init__(name="job-watch", daemon=True)
        self.stack, self.rec, self.job_id, self.epochs = stack, rec, job_id, epochs
        self.load_start, self.kill_at = load_start, kill_at
        self.load_end, self.give_up_at = load_end, give_up_at
        self.killed: dict[str, Any] | None = None
        self.restarts = 0
        self.final: dict[str, Any] | None = None
        self.problem: str | None = None

    def run(self) -> None:
        try:
            self._watch()
        except Exception as exc:  # reported, never a hung bench
            self.problem = f"{type(exc).__name__}: {exc}"

    def _watch(self) -> None:
        headers = {"Authorization": f"Bearer {self.stack.token}"}
        with httpx.Client(base_url=self.stack.base, headers=headers, timeout=60) as http:
            while time.monotonic() < self.give_up_at:
                self._supervise()
                t0 = time.monotonic()
                try:
                    r = http.get(f"/api/v1/jobs/{self.job_id}")
                except httpx.HTTPError as exc:
                    if t0 < self.load_end:
                        self.rec.record("job", "error", time.monotonic() - t0, "watch", str(exc))
                    time.sleep(0.5)
                    continue
                if t0 < self.load_end:  # polls after the load are not part of the soak's figures
                    self.rec.record("job", str(r.status_code), time.monotonic() - t0,
                                    "watch", r.text if r.status_code >= 500 else "")
                if r.status_code != 200:
                    time.sleep(0.5)
                    continue
                job = r.json()
                if job["status"] in TERMINAL:
                    self.final = job
                    return
                if self.killed is None and self._due(job):
                    self._kill(job)
                time.sleep(0.25)
        self.problem = "the job did not end within --job-timeout after the load"

    def _due(self, job: dict[str, Any]) -> bool:
        p = job.get("progress") or {}
        done = p.get("checkpoint_epoch")
        if job["status"] != "running" or p.get("phase") != "training" or not done:
            return False
        # Its last-but-one checkpoint is the last chance to kill it mid-training.
        return int(done) < self.epochs and (time.monotonic() >= self.kill_at
                                            or int(done) >= self.epochs - 1)

    def _job_pid(self) -> int | None:
        """The pid of the attempt that holds the job (the job row's ``worker``: host:pid:id)."""
        from sqlalchemy import select

        from app.db.models import Job
        from app.db.session import make_engine, make_sessionmaker

        engine = make_engine(self.stack.settings)
        try:
            with make_sessionmaker(engine)() as s:
                worker = s.scalar(select(Job.worker).where(Job.id == self.job_id))
        finally:
            engine.dispose()
        return int(worker.rsplit(":", 2)[1]) if worker else None

    def _ours(self, pid: int) -> bool:
        """The pid is a process this bench started: a worker, or a child of the API (its executor)."""
        if any(w.pid == pid for w in self.stack.workers):
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        ppid = next(int(li.split()[1]) for li in status.splitlines() if li.startswith("PPid:"))
        return ppid == self.stack.api.pid

    def _kill(self, job: dict[str, Any]) -> None:
        pid = self._job_pid()
        if pid is None or not self._ours(pid):
            self.problem = f"job process {pid} is not one this bench started; not killed"
            self.killed = {"pid": pid, "epoch": None}
            return
        os.kill(pid, signal.SIGKILL)
        p = job.get("progress") or {}
        self.killed = {"pid": pid, "checkpoint_epoch": p.get("checkpoint_epoch"),
                       "attempt": job["attempts"],
                       "at_s": round(time.monotonic() - self.load_start, 1)}
        print(f"[soak] killed job process {pid} after checkpoint of epoch "
              f"{p.get('checkpoint_epoch')}/{self.epochs}", file=sys.stderr)

    def _supervise(self) -> None:
        """Restart a dead Celery worker, as the compose file's restart policy does."""
        if self.stack.worker_env is None or not self.stack.workers:
            return
        last = self.stack.workers[-1]
        if not last.alive():
            last.stop()
            self.stack.start_worker()
            self.restarts += 1


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.duration <= 0 or args.clients < 1 or args.epochs < 2:
        raise ValueError("--duration must be > 0, --clients >= 1 and --epochs >= 2 "
                         "(the job is killed after a checkpoint before its last epoch)")
    if args.stack == "celery" and not (postgres_available() and redis_available()):
        raise ValueError("the celery stack needs PostgreSQL and Redis on 127.0.0.1")
    kill_after = args.duration / 3 if args.kill_after is None else args.kill_after
    with TemporaryDirectory(prefix=f"mwt-soak-{args.stack}-") as tmp:
        prepare = seed_models(2, args.seed_images)
        started = time.monotonic()
        ctx = (embedded_stack(Path(tmp), prepare=prepare) if args.stack == "embedded"
               else distributed_stack(Path(tmp), env=FAST_REAPER, prepare=prepare))
        with ctx as stack:
            print(f"[soak] {args.stack} stack up in {time.monotonic() - started:.0f} s "
                  f"(API pid {stack.api.pid})", file=sys.stderr)
            try:
                result = soak(stack, args, kill_after)
            finally:
                if args.log_dir:
                    keep_logs(stack, Path(args.log_dir))
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    result["command"] = shlex.join(["python", "bench/soak.py", *sys.argv[1:]])
    path = (ROOT / "bench" / "results" / f"soak-{args.stack}.md" if args.results is None
            else Path(args.results) if args.results else None)
    if path is not None:
        write_results(result, path)
    return result


def keep_logs(stack: Stack, where: Path) -> None:
    """Copy the services' logs (API, workers) to ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    for proc in [stack.api, *stack.workers]:
        shutil.copy(proc.log_path, where / proc.log_path.name)


def soak(stack: Stack, args: argparse.Namespace, kill_after: float) -> dict[str, Any]:
    rec = Recorder()
    headers = {"Authorization": f"Bearer {stack.token}"}
    with httpx.Client(base_url=stack.base, headers=headers, timeout=120) as http:
        reg = Registry(http)
        dataset = upload_subset(http, args.job_train_images) if args.job_train_images else "digits"
        payloads = predict_payloads(reg.shape, args.seed)
        rss = RssSampler(stack.api.pid)
        rss.start()
        t0 = time.monotonic()
        r = http.post("/api/v1/jobs", json={"dataset": dataset, "arch": "simcnn",
                                            "width": args.width, "epochs": args.epochs,
                                            "batch_size": 128, "seed": args.seed})
        rec.record("job", str(r.status_code), time.monotonic() - t0, "submit", r.text)
        r.raise_for_status()
        job_id = r.json()["id"]
    load_end = t0 + args.duration
    watch = JobWatch(stack, rec, job_id, args.epochs, t0, t0 + kill_after, load_end,
                     load_end + args.job_timeout)
    watch.start()
    clients = [Client(i, stack, args, reg, rec, payloads, job_id, load_end)
               for i in range(args.clients)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    load_s = time.monotonic() - t0
    rss.load_over()
    print(f"[soak] load over after {load_s:.0f} s; waiting for the job", file=sys.stderr)
    watch.join()
    memory = rss.finish()
    api_alive = stack.api.alive()

    kinds = rec.summary()
    status_total: Counter[str] = Counter()
    for k in kinds.values():
        status_total.update(k["by_status"])
    final = watch.final or {}
    res = final.get("result") or {}
    job = {
        "id": job_id, "dataset": dataset, "epochs": args.epochs, "status": final.get("status"),
        "attempts": final.get("attempts"), "killed": watch.killed,
        "worker_restarts": watch.restarts, "resumed_from_epoch": res.get("resumed_from_epoch"),
        "epochs_run": res.get("epochs_run"), "duration_s": final.get("duration_s"),
        "error": final.get("error") or watch.problem,
    }
    job["resumed"] = bool(watch.killed and watch.killed.get("pid") and (job["attempts"] or 0) > 1
                          and (job["resumed_from_epoch"] or 0) >= 1)
    job["succeeded"] = job["status"] == "succeeded"
    ge_500 = sum(n for code, n in status_total.items() if code[0] == "5")
    out = {
        "bench": "soak",
        "stack": args.stack,
        "duration_s": args.duration,
        "load_s": round(load_s, 1),
        "clients": args.clients,
        "mix": args.mix,
        "requests": sum(status_total.values()),
        "by_status": dict(sorted(status_total.items())),
        "responses_ge_500": ge_500,
        # 5xx other than the 503s that came with Retry-After (the server's own back-pressure)
        "server_errors": ge_500 - rec.throttled["503"],
        "throttled": sum(rec.throttled.values()),
        "transport_errors": status_total.get("error", 0),
        "backoff_s": round(rec.backoff_s, 1),
        "kinds": kinds,
        "checksum_checks": rec.checksum_checks,
        "checksum_mismatches": len(rec.mismatches),
        "mismatch_samples": rec.mismatches[:5],
        "wrong_answers": len(rec.wrong_answers),
        "wrong_answer_samples": rec.wrong_answers[:5],
        "error_samples": rec.samples,
        "compositions_made": len(reg.compositions),
        "api": {**memory, "alive_at_end": api_alive},
        "job": job,
    }
    out["failures"] = failures(out)
    out["ok"] = not out["failures"]
    return out


def failures(r: dict[str, Any]) -> list[str]:
    """What keeps a soak from passing: any response >= 500 (a 503 with Retry-After included),
    a transport error, a checksum mismatch or wrong answer, the API's peak RSS at or over
    ``RSS_LIMIT_MB`` or its death, and a killed job that did not resume and succeed."""
    out = []
    if r["responses_ge_500"]:
        out.append(f"{r['responses_ge_500']} responses >= 500 ({r['throttled']} of the 429/503 "
                   "with Retry-After)")
    if r["transport_errors"]:
        out.append(f"{r['transport_errors']} transport errors")
    if r["checksum_mismatches"] or r["wrong_answers"]:
        out.append(f"{r['checksum_mismatches']} checksum mismatches, {r['wrong_answers']} wrong answers")
    peak = r["api"]["peak_rss_mb"]
    if peak is None or peak >= RSS_LIMIT_MB:
        out.append(f"API peak RSS {peak} MB (limit {RSS_LIMIT_MB:.0f} MB)")
    if not r["api"]["alive_at_end"]:
        out.append("the API process died")
    job = r["job"]
    if not (job["killed"] and job["killed"].get("pid")):
        out.append("the job's process was not killed")
    elif not (job["resumed"] and job["succeeded"]):
        out.append(f"the killed job ended {job['status']} after {job['attempts']} attempt(s), "
                   f"resumed from epoch {job['resumed_from_epoch']}")
    return out


# ----------------------------------------------------------------------------- the report


def _rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for kind, k in result["kinds"].items():
        codes: dict[str, int] = k["by_status"]

        def count(pred: Any, codes: dict[str, int] = codes) -> str:
            return str(sum(n for c, n in codes.items() if pred(c)))

        rows.append([
            kind, str(k["requests"]),
            count(lambda c: c[0] == "2"), count(lambda c: c[0] == "3"),
            count(lambda c: c[0] == "4" and c not in ("429",)),
            count(lambda c: c in ("429", "503")),
            count(lambda c: c[0] == "5" and c != "503"),
            count(lambda c: not c[0].isdigit()),
            "-" if k["p50_ms"] is None else f"{k['p50_ms']:.0f}",
            "-" if k["p99_ms"] is None else f"{k['p99_ms']:.0f}",
        ])
    return rows


HEADER = ["kind", "requests", "2xx", "3xx", "4xx", "429/503", "other 5xx", "errors",
          "p50 ms", "p99 ms"]


def _notes(result: dict[str, Any]) -> list[str]:
    api, job = result["api"], result["job"]
    killed = job["killed"] or {}
    lines = [
        f"status codes: {json.dumps(result['by_status'])}; {result['throttled']} 429/503 with "
        f"Retry-After, after which the clients backed off {result['backoff_s']:.0f} s in all",
        f"API peak RSS {api['peak_rss_mb']} MB (VmHWM {api['vmhwm_mb']} MB; "
        f"limit {RSS_LIMIT_MB:.0f} MB); alive at the end: {api['alive_at_end']}; RSS through the "
        f"load, evenly spaced: {', '.join(f'{v:.0f}' for v in api['rss_timeline_mb'])} MB",
        f"checksums: {result['checksum_checks']} checked, {result['checksum_mismatches']} mismatches; "
        f"{result['compositions_made']} compositions made",
        f"job: {job['status']} after {job['attempts']} attempt(s); process {killed.get('pid')} "
        f"killed after the checkpoint of epoch {killed.get('checkpoint_epoch')}/{job['epochs']} "
        f"({killed.get('at_s')} s into the load); resumed from epoch {job['resumed_from_epoch']}, "
        f"{job['epochs_run']} epoch(s) run after it"
        + (f"; worker restarted {job['worker_restarts']}x" if job["worker_restarts"] else "")
        + (f"; {job['error']}" if job["error"] else ""),
        "verdict: " + ("PASS (no response >= 500, no transport error, no checksum mismatch, API "
                       f"peak RSS < {RSS_LIMIT_MB:.0f} MB, the killed job resumed and succeeded)"
                       if result["ok"] else "FAIL: " + "; ".join(result["failures"])),
    ]
    return lines


def render(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"soak, {result['stack']} stack: {result['clients']} clients, "
                        f"{result['load_s']:.0f} s; latencies of 2xx/3xx answers")
    for col in HEADER:
        table.add_column(col, justify="left" if col == "kind" else "right")
    for row in _rows(result):
        table.add_row(*row)
    console.print(table)
    for line in _notes(result):
        console.print(line, soft_wrap=True)
    for sample in result["error_samples"][:5]:
        console.print(f"[dim]{sample}[/]", soft_wrap=True, markup=True)


def write_results(result: dict[str, Any], path: Path) -> None:
    """The table, the notes and the JSON line as markdown (the latest run's)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    lines = [
        f"# bench/soak.py, {result['stack']} stack",
        "",
        f"`{result['command']}` at commit {commit}, {dt.date.today().isoformat()}, {result['machine']['cpus']} CPUs "
        "(clients and services on this one machine).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" if c == "kind" else "---:" for c in HEADER) + "|",
        *("| " + " | ".join(r) + " |" for r in _rows(result)),
        "",
        *(f"- {line}" for line in _notes(result)),
        "",
        "```json",
        json.dumps(result),
        "```",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(bench_main(parse_args, run, render))
