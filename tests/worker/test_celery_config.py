"""The Celery app is configured for long GPU jobs (DESIGN §3.1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings
from worker.celery_app import TASK_RUN_JOB, make_celery


def test_celery_settings_for_long_jobs(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, broker_url="redis://example:6379/0", job_visibility_timeout_s=90_000
    )
    celery = make_celery(settings)
    conf = celery.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 90_000
    assert conf.result_backend_transport_options["visibility_timeout"] == 90_000
    assert conf.visibility_timeout == 90_000
    assert {q.name for q in conf.task_queues} == {"gpu", "cpu"}
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.broker_url == "redis://example:6379/0"


def test_tasks_are_thin_and_named() -> None:
    import worker.tasks as tasks

    assert tasks.run_job_task.name == TASK_RUN_JOB
    assert tasks.run_job_task.acks_late and tasks.run_job_task.reject_on_worker_lost


def test_a_job_queued_without_a_broker_goes_to_the_training_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs stored as `embedded` (server run without a broker) and re-sent once one is set
    must reach a queue a worker reads."""
    from worker.dispatch import CeleryDispatcher

    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(
        "worker.celery_app.send_run_job", lambda celery, job_id, queue: sent.append((job_id, queue))
    )
    d = CeleryDispatcher(Settings(data_dir=tmp_path, broker_url="redis://example:6379/0"))
    d.dispatch("a", "embedded")
    d.dispatch("b", "cpu")
    assert sent == [("a", "gpu"), ("b", "cpu")]
