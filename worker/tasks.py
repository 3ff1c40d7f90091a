"""Thin named Celery tasks: each takes a job id and runs the same function as the embedded executor."""

from __future__ import annotations

import logging
from functools import partial

from celery.signals import worker_ready

from app.settings import get_settings
from worker.celery_app import TASK_RUN_JOB, app, send_run_job
from worker.jobs import run_job
from worker.reaper import reap_once

log = logging.getLogger(__name__)


@app.task(name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job_task(job_id: str) -> str:
    return run_job(job_id, get_settings())


@worker_ready.connect
def _reap_on_start(**_: object) -> None:
    """A (re)started worker first looks for jobs whose workers died."""
    try:
        reaped = reap_once(get_settings(), requeue=partial(send_run_job, app))
        if reaped:
            log.warning("reaped %d stale job(s) on start: %s", len(reaped), reaped)
    except Exception:  # never keep a worker from starting
        log.exception("reaper pass on worker start failed")
