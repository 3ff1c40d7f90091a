"""The embedded executor: no broker, no Celery. A thread polls the job table and runs each
queued job in a *spawned* subprocess (fresh interpreter: CUDA-safe, crash-isolated) that
calls the same ``worker.jobs.run_job`` the Celery tasks call.

A child that dies without finishing its job is noticed at once (exit code) and handled like
a lost worker: requeued to resume from its checkpoint, or failed once out of attempts.
On shutdown, running children are stopped and their jobs requeued without spending an attempt.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, JobStatus
from app.services.jobs import release_job
from app.settings import Settings
from worker.reaper import reap

log = logging.getLogger(__name__)


PARENT_POLL_S = 1.0


def exit_with_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """Make this (job) process exit when ``parent_pid`` (the executor's process) dies.

    A job process outlives a SIGKILLed ``mwt serve`` otherwise: the restarted executor
    would requeue its job and start a second training beside the orphan. On Linux the
    kernel sends SIGKILL at once (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon thread
    also watches ``os.getppid()`` (the parent changes when the original one dies) and
    ends the process within ``poll_s``.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("prctl unavailable (%s); relying on the parent watchdog", exc)
    if os.getppid() != parent_pid:  # died before the signal was armed
        os._exit(PARENT_GONE_EXIT)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                # No cleanup: the job is requeued by whoever owns the registry next.
                os._exit(PARENT_GONE_EXIT)

    threading.Thread(target=watch, name="mwt-parent-watch", daemon=True).start()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_GONE_EXIT = 70


def _child_entry(
    target: Callable[..., None],
    parent_pid: int,
    job_id: str,
    settings_data: dict[str, Any],
    log_level: str,
) -> None:
    """Every job process starts here: bound to its parent's life, then the job's target."""
    exit_with_parent(parent_pid)
    target(job_id, settings_data, log_level)


def _child_main(job_id: str, settings_data: dict[str, Any], log_level: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s [job] %(name)s: %(message)s"
    )
    from worker.jobs import run_job

    run_job(job_id, Settings(**settings_data))


class Executor:
    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        target: Callable[..., None] | None = None,
    ) -> None:
        self.settings = settings
        self.target = target or _child_main
        self.factory = factory
        self.concurrency = settings.executor_concurrency
        self._mp = multiprocessing.get_context("spawn")
        self._running: dict[str, BaseProcess] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reap = 0.0
        self._host = socket.gethostname()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="mwt-executor", daemon=True)
        self._thread.start()
        log.info("embedded executor started (concurrency %d)", self.concurrency)

    def wake(self) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            items = list(self._running.items())
            self._running.clear()
        for job_id, proc in items:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
            action = release_job(
                self.factory, job_id, None, "the embedded executor shut down", count_attempt=False
            )
            log.info("job %s stopped with the executor (%s)", job_id, action)

    # ---------------------------------------------------------------- loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._collect()
                self._maybe_reap()
                self._launch()
            except Exception:
                log.exception("executor loop iteration failed")
            self._wake.wait(self.settings.executor_poll_s)
            self._wake.clear()

    def _collect(self) -> None:
        with self._lock:
            done = [(j, p) for j, p in self._running.items() if not p.is_alive()]
            for j, _ in done:
                del self._running[j]
        for job_id, proc in done:
            proc.join()
            if proc.exitcode != 0:
                pid_prefix = f"{self._host}:{proc.pid}:"
                with self.factory() as s:
                    worker = s.scalar(
                        select(Job.worker).where(
                            Job.id == job_id, Job.status == JobStatus.running.value
                        )
                    )
                if worker and worker.startswith(pid_prefix):
                    release_job(
                        self.factory,
                        job_id,
                        worker,
                        f"job process {proc.pid} died (exit code {proc.exitcode})",
                    )

    def _maybe_reap(self) -> None:
        interval = self.settings.reaper_interval_s or self.settings.stale_after_s / 2
        if time.monotonic() - self._last_reap >= interval:
            self._last_reap = time.monotonic()
            reap(self.factory, self.settings)  # requeued jobs are picked up by the next poll

    def _launch(self) -> None:
        with self._lock:
            free = self.concurrency - len(self._running)
            busy = set(self._running)
        if free <= 0 or self._stop.is_set():
            return
        with self.factory() as s:
            queued = s.scalars(
                select(Job.id)
                .where(Job.status == JobStatus.queued.value, Job.cancel_requested.is_(False))
                .order_by(Job.created_at)
                .limit(free + len(busy))
            ).all()
        for job_id in [j for j in queued if j not in busy][:free]:
            proc = self._mp.Process(
                target=_child_entry,
                args=(
                    self.target,
                    os.getpid(),
                    job_id,
                    self.settings.model_dump(),
                    self.settings.log_level,
                ),
                name=f"mwt-job-{job_id[:8]}",
                daemon=True,
            )
            proc.start()
            with self._lock:
                self._running[job_id] = proc
            log.info("job %s started in process %s", job_id, proc.pid)
