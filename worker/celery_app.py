"""The Celery application (distributed mode).

Settings chosen for long GPU jobs (see DESIGN §3.1):
- late acks + reject on worker lost: a job whose worker dies is redelivered, and the
  attempts counter on the job row caps how often;
- prefetch 1: a worker never holds a second long job hostage;
- visibility timeout above the longest job, in broker and result-backend transport
  options alike, so Redis does not redeliver a job that is still running;
- ``gpu`` and ``cpu`` queues; GPU workers run ``-P solo`` (CUDA is never initialised in a
  forked child), one worker per GPU.

``celery -A worker.celery_app worker`` (or ``mwt worker``) uses the module-level ``app``.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.settings import Settings, get_settings

TASK_RUN_JOB = "mwt.run_job"


def make_celery(settings: Settings) -> Celery:
    broker = settings.broker_url or "memory://"
    celery = Celery("mwt", broker=broker, backend=settings.result_backend, include=["worker.tasks"])
    transport = {"visibility_timeout": settings.job_visibility_timeout_s}
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=(Queue(settings.train_queue), Queue(settings.light_queue)),
        task_default_queue=settings.light_queue,
        broker_transport_options=dict(transport),
        result_backend_transport_options=dict(transport),
        visibility_timeout=settings.job_visibility_timeout_s,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # A redelivered copy of a running job is harmless: run_job claims the job row with a
        # compare-and-set and skips a job another worker holds.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return celery


def send_run_job(celery: Celery, job_id: str, queue: str) -> None:
    """Hand job ``job_id`` to the workers of ``queue``: the one place a job message is sent.

    Record the send with ``app.services.jobs.send``, which calls this through a dispatcher.
    """
    celery.send_task(TASK_RUN_JOB, args=[job_id], queue=queue)


app = make_celery(get_settings())
