"""The registry's read answers are replayed for a short time, per key, and never outlive a write
made through the API (app.response_cache)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app import response_cache
from app.auth import ensure_admin_key
from app.main import create_app
from app.settings import Settings
from tests.support.registry import seed_fake_model

# Long enough that a loaded machine never expires an entry between two requests of a test;
# expiry itself is tested by moving the cache's clock.
TTL = 30.0


@pytest.fixture
def cached(settings: Settings) -> Iterator[tuple[FastAPI, TestClient]]:
    app = create_app(settings.model_copy(update={"response_cache_s": TTL}), run_executor=False)
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {ensure_admin_key(app.state.sessionmaker, settings)}"
        yield app, c


def _seed(app: FastAPI, settings: Settings, **kw: object) -> int:
    with app.state.sessionmaker() as s:
        model = seed_fake_model(s, settings, **kw)  # type: ignore[arg-type]
        s.commit()
        return model.id


def test_a_repeated_query_is_replayed_with_the_same_answer(
    cached: tuple[FastAPI, TestClient], settings: Settings
) -> None:
    app, c = cached
    _seed(app, settings)
    first = c.get("/api/v1/modules", params={"class_name": "3"})
    second = c.get("/api/v1/modules", params={"class_name": "3"})
    assert first.headers["x-mwt-cache"] == "miss" and second.headers["x-mwt-cache"] == "hit"
    assert second.status_code == 200 and second.json() == first.json()
    assert second.headers["content-type"] == first.headers["content-type"]
    # Another query string is another entry.
    assert c.get("/api/v1/modules", params={"class_name": "4"}).headers["x-mwt-cache"] == "miss"


def test_a_write_through_the_api_is_seen_at_once(
    cached: tuple[FastAPI, TestClient], settings: Settings
) -> None:
    app, c = cached
    model_id = _seed(app, settings)
    assert len(c.get("/api/v1/models").json()["items"]) == 1
    assert c.get("/api/v1/models").headers["x-mwt-cache"] == "hit"
    assert c.delete(f"/api/v1/models/{model_id}").status_code == 204
    after = c.get("/api/v1/models")
    assert after.headers["x-mwt-cache"] == "miss" and after.json()["items"] == []


def test_a_change_made_elsewhere_is_seen_within_the_ttl(
    cached: tuple[FastAPI, TestClient], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job process publishing a model writes the database, not through this API process.
    app, c = cached
    _seed(app, settings)
    assert len(c.get("/api/v1/models").json()["items"]) == 1
    _seed(app, settings)
    stale = c.get("/api/v1/models")
    assert stale.headers["x-mwt-cache"] == "hit" and len(stale.json()["items"]) == 1
    now = time.monotonic()
    monkeypatch.setattr(response_cache.time, "monotonic", lambda: now + TTL + 0.1)
    fresh = c.get("/api/v1/models")
    assert fresh.headers["x-mwt-cache"] == "miss" and len(fresh.json()["items"]) == 2


def test_entries_are_per_key_and_a_bad_key_is_still_refused(
    cached: tuple[FastAPI, TestClient], settings: Settings, make_key: Callable[..., str]
) -> None:
    app, c = cached
    _seed(app, settings)
    assert c.get("/api/v1/models").status_code == 200
    reader = {"Authorization": f"Bearer {make_key('read')}"}
    assert c.get("/api/v1/models", headers=reader).headers["x-mwt-cache"] == "miss"
    refused = c.get("/api/v1/models", headers={"Authorization": "Bearer mwt_not_a_key"})
    assert refused.status_code == 401


def test_downloads_errors_and_jobs_are_never_replayed(
    cached: tuple[FastAPI, TestClient], settings: Settings
) -> None:
    app, c = cached
    model_id = _seed(app, settings)
    for _ in range(2):
        dl = c.get(f"/api/v1/models/{model_id}/download")
        assert dl.status_code == 200 and "x-mwt-cache" not in dl.headers
        missing = c.get("/api/v1/models/999999")
        assert missing.status_code == 404 and missing.headers.get("x-mwt-cache") == "miss"
        assert "x-mwt-cache" not in c.get("/api/v1/jobs").headers


def test_ttl_zero_turns_it_off(client: TestClient, app: FastAPI, settings: Settings) -> None:
    # The shared test settings keep the default; a deployment can switch it off.
    off = create_app(settings.model_copy(update={"response_cache_s": 0}), run_executor=False)
    with TestClient(off) as c:
        c.headers["Authorization"] = client.headers["Authorization"]
        for _ in range(2):
            assert "x-mwt-cache" not in c.get("/api/v1/models").headers


def test_concurrent_misses_compute_the_answer_once() -> None:
    """Twenty clients asking for the same expired answer at once: the app computes it once and
    the other nineteen get that answer (no stampede on the database)."""
    import asyncio
    from types import SimpleNamespace
    from typing import Any

    from app.response_cache import ResponseCacheMiddleware

    calls = 0

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)  # the query and serialisation
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"n": %d}' % calls})

    cache = ResponseCacheMiddleware(inner, ["/api/v1/modules"], ttl_s=60)
    scope = {"type": "http", "method": "GET", "path": "/api/v1/modules", "query_string": b"",
             "headers": [], "state": {"principal": SimpleNamespace(key_id=1)}}

    async def one() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await cache(dict(scope), None, send)  # type: ignore[arg-type]
        return sent

    async def burst() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(one() for _ in range(20)))

    answers = asyncio.run(burst())
    assert calls == 1
    assert all(a[-1]["body"] == b'{"n": 1}' for a in answers)
