"""A queued job whose broker message is lost is sent again by the reaper, through real Redis."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from app.db.models import Job, JobKind, utcnow
from app.db.session import make_engine, make_sessionmaker
from app.services.jobs import create_job, send
from app.settings import Settings
from tests.support.services import REDIS_HOST, REDIS_PORT, redis_available, throwaway_redis_db
from worker.dispatch import CeleryDispatcher
from worker.reaper import reap


def _queued_job_ids(client: redis.Redis, queue: str) -> list[str]:
    """Job ids in the Celery messages waiting in ``queue`` (kombu's Redis list)."""
    ids = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        ids.append(args[0])
    return ids


@pytest.mark.integration
def test_lost_message_is_sent_again(tmp_path: Path, sqlite_template: Path) -> None:
    assert redis_available(), "Redis is not running on 127.0.0.1:6379 (see README: Tests)"
    data = tmp_path / "data"
    data.mkdir()
    for f in sqlite_template.glob("mwt.db*"):
        shutil.copy(f, data / f.name)
    with throwaway_redis_db() as db:
        url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
        settings = Settings(data_dir=data, broker_url=url, redispatch_after_s=600)
        engine = make_engine(settings)
        factory = make_sessionmaker(engine)
        dispatcher = CeleryDispatcher(settings)
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        try:
            with factory() as s:
                job, _ = create_job(s, kind=JobKind.train, params={"epochs": 1}, queue="gpu",
                                    max_attempts=3, dataset="digits", arch="simcnn")
                assert send(s, dispatcher.dispatch, job)
                job_id = job.id
            assert _queued_job_ids(client, "gpu") == [job_id]
            assert reap(factory, settings, requeue=dispatcher.requeue) == []  # its message is live

            client.delete("gpu")  # the broker loses it (restart without persistence, purge...)
            with factory() as s:
                s.execute(update(Job).where(Job.id == job_id).values(
                    dispatched_at=utcnow() - dt.timedelta(seconds=601)))
                s.commit()
            assert reap(factory, settings, requeue=dispatcher.requeue) == [(job_id, "resent")]
            assert _queued_job_ids(client, "gpu") == [job_id]
            assert reap(factory, settings, requeue=dispatcher.requeue) == []  # not sent twice
        finally:
            dispatcher.stop()
            client.close()
            engine.dispose()
