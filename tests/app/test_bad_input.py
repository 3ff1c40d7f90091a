"""User input never causes a 500: out-of-range numbers, odd characters, wrong types."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.auth import ensure_admin_key
from app.settings import Settings

HUGE = "99999999999999999999"
GETS = [
    f"/api/v1/models/{HUGE}",
    f"/api/v1/modules/{HUGE}/download",
    f"/api/v1/modules?class_index={HUGE}",
    f"/api/v1/jobs?offset={HUGE}",
    f"/api/v1/compositions?model_id={HUGE}",
    "/api/v1/modules/-1",
    "/api/v1/models?min_accuracy=nan",
    "/api/v1/modules?max_krr=inf",
    "/api/v1/jobs/%00",
    "/api/v1/jobs?dataset=a%00b",
    "/api/v1/models?tag=k%00=v",
    "/api/v1/modules?class_name=%00",
    "/api/v1/datasets/%C3%A9%00",
]
POSTS = [
    ("/api/v1/compositions", {"model_id": int(HUGE), "classes": [1]}),
    ("/api/v1/compositions", {"model_id": 1, "classes": [int(HUGE)]}),
    ("/api/v1/compositions", {"model_id": 1, "classes": ["a\x00"]}),
    ("/api/v1/jobs", {"dataset": "digits\x00"}),
    ("/api/v1/jobs", {"name": "x\x00"}),
    ("/api/v1/jobs", {"tags": {"k": "v\x00"}, "epochs": 1}),
    ("/api/v1/jobs", {"seed": 10**30}),
    ("/api/v1/keys", {"name": "\x00", "scopes": ["read"]}),
]


@pytest.fixture
def raw_client(app: FastAPI, settings: Settings):  # noqa: ANN201
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {ensure_admin_key(app.state.sessionmaker, settings)}"
        yield c


def test_no_500_for_odd_input(raw_client: TestClient) -> None:
    for url in GETS:
        r = raw_client.get(url)
        assert r.status_code < 500, (url, r.status_code, r.text)
        if r.status_code >= 400:
            assert r.json()["detail"], url
    for url, body in POSTS:
        r = raw_client.post(url, json=body)
        assert 400 <= r.status_code < 500 or r.status_code in (201, 202), (
            url,
            body,
            r.status_code,
            r.text,
        )
