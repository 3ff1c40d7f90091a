"""How the API hands a queued job to whatever runs jobs.

- ``ExecutorDispatcher``: embedded mode; wakes the in-process executor (which polls the DB).
- ``CeleryDispatcher``: distributed mode; sends the job id to the job's queue.
- ``NullDispatcher``: the job stays queued until some executor polls for it.
The job row is committed before dispatch: the DB, not the broker, is the source of truth.
"""

from __future__ import annotations

import logging
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    def dispatch(self, job_id: str, queue: str) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def check(self) -> str | None:
        """None when ready, else what is wrong (for /ready)."""
        ...


class NullDispatcher:
    def dispatch(self, job_id: str, queue: str) -> None:
        log.info("job %s queued (no executor in this process)", job_id)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def check(self) -> str | None:
        return None


class ExecutorDispatcher:
    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        from worker.executor import Executor

        self.executor = Executor(settings, factory)

    def dispatch(self, job_id: str, queue: str) -> None:
        self.executor.wake()

    def start(self) -> None:
        self.executor.start()

    def stop(self) -> None:
        self.executor.stop()

    def check(self) -> str | None:
        return None if self.executor.alive() else "the embedded executor is not running"


class CeleryDispatcher:
    def __init__(self, settings: Settings) -> None:
        from worker.celery_app import make_celery

        self.settings = settings
        self.celery = make_celery(settings)

    def dispatch(self, job_id: str, queue: str) -> None:
        from worker.celery_app import TASK_RUN_JOB

        self.celery.send_task(TASK_RUN_JOB, args=[job_id], queue=queue)

    def requeue(self, job_id: str, queue: str) -> None:
        self.dispatch(job_id, queue)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.celery.close()

    def check(self) -> str | None:
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            return None
        except Exception as exc:
            return f"broker unreachable: {exc}"


def make_dispatcher(
    settings: Settings, factory: sessionmaker[Session], run_executor: bool
) -> Dispatcher:
    if settings.broker_url:
        return CeleryDispatcher(settings)
    if run_executor:
        return ExecutorDispatcher(settings, factory)
    return NullDispatcher()
