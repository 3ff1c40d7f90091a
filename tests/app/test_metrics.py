from __future__ import annotations

import datetime as dt

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db.models import Job


def test_prometheus_metrics(client: TestClient, app: FastAPI) -> None:
    a = client.post("/api/v1/jobs", json={"epochs": 1}).json()["id"]
    b = client.post("/api/v1/jobs", json={"epochs": 2}).json()["id"]
    client.get("/api/v1/modules/7")
    now = dt.datetime.now(dt.UTC)
    with app.state.sessionmaker() as s:
        s.execute(
            update(Job)
            .where(Job.id == a)
            .values(status="succeeded", duration_s=42.0, finished_at=now)
        )
        s.execute(
            update(Job).where(Job.id == b).values(status="failed", duration_s=3.0, finished_at=now)
        )
        s.commit()
    text = client.get("/metrics").text
    assert 'mwt_http_requests_total{method="POST",route="/api/v1/jobs",status="202"} 2.0' in text
    assert (
        'mwt_http_requests_total{method="GET",route="/api/v1/modules/{module_id}",status="404"} 1.0'
        in text
    )
    assert "mwt_http_request_duration_seconds_bucket" in text
    assert 'mwt_jobs{state="succeeded"} 1.0' in text and 'mwt_jobs{state="queued"} 0.0' in text
    assert 'mwt_job_duration_seconds_bucket{kind="train",le="60.0",status="succeeded"} 1.0' in text
    assert 'mwt_job_duration_seconds_bucket{kind="train",le="30.0",status="succeeded"} 0.0' in text
    assert 'mwt_job_duration_seconds_sum{kind="train",status="failed"} 3.0' in text
    assert "mwt_modules 0.0" in text and "mwt_compositions 0.0" in text
    assert "mwt_jobs_unsent 0.0" in text  # both were handed over (then finished)
    assert "_created" not in text


def test_unsent_jobs_gauge(client: TestClient, app: FastAPI) -> None:
    class Down:
        def dispatch(self, job_id: str, queue: str) -> None:
            raise ConnectionError("broker down")

    app.state.dispatcher = Down()
    assert client.post("/api/v1/jobs", json={"epochs": 1}).status_code == 202
    assert "mwt_jobs_unsent 1.0" in client.get("/metrics").text
