"""The dispatchers that hand a queued job to something that runs it (``app.dispatch.Dispatcher``).

- ``ExecutorDispatcher``: embedded mode; wakes the in-process executor (which polls the DB).
- ``CeleryDispatcher``: distributed mode; sends the job id to the job's queue.
``make_dispatcher`` picks one from the settings; the composition roots (``app.main``,
``app.cli``) call it, so the API itself only knows the protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from app.dispatch import Dispatcher, NullDispatcher, Requeue
from app.settings import EMBEDDED_QUEUE, Settings

if TYPE_CHECKING:
    from celery import Celery


class ExecutorDispatcher:
    requeue: Requeue | None = None  # the executor polls the DB for queued jobs

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
        # Imported here: worker.celery_app builds its module-level app from the environment.
        from worker.celery_app import make_celery

        self.settings = settings
        self.celery: Celery = make_celery(settings)
        # A queued job whose message is lost is sent again the same way.
        self.requeue: Requeue | None = self.dispatch

    def dispatch(self, job_id: str, queue: str) -> None:
        from worker.celery_app import send_run_job

        # A job queued while the server ran without a broker carries no Celery queue; the
        # training queue's workers run every kind of job.
        send_run_job(self.celery, job_id, self.settings.train_queue if queue == EMBEDDED_QUEUE else queue)

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
    """Celery with a broker, else the embedded executor when this process runs jobs, else none."""
    if settings.broker_url:
        return CeleryDispatcher(settings)
    if run_executor:
        return ExecutorDispatcher(settings, factory)
    return NullDispatcher()
