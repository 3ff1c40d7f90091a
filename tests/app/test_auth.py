from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth import ensure_admin_key, hash_token
from app.db.models import ApiKey
from app.settings import Settings


def test_open_routes_need_no_key(app: FastAPI) -> None:
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/api/v1/health").status_code == 200
        assert c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/openapi.json").status_code == 200


def test_every_api_route_needs_a_key(app: FastAPI) -> None:
    with TestClient(app) as c:
        paths = c.get("/openapi.json").json()["paths"]
        for path, ops in paths.items():
            if not path.startswith("/api/v1"):
                continue
            url = path.replace("{job_id}", "x").replace("{name}", "x")
            for key in ("{model_id}", "{module_id}", "{composition_id}", "{key_id}"):
                url = url.replace(key, "1")
            for method in ops:
                r = c.request(method.upper(), url)
                assert r.status_code == 401, (method, path, r.status_code)
                assert "API key" in r.json()["detail"]


def test_bad_and_revoked_keys(client: TestClient, make_key: Callable[..., str]) -> None:
    r = client.get("/api/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API key"
    token = make_key("read")
    assert (
        client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    )
    assert (
        client.get("/api/v1/jobs", headers={"X-API-Key": token, "Authorization": ""}).status_code
        == 200
    )
    key_id = next(k["id"] for k in client.get("/api/v1/keys").json() if k["prefix"] == token[:12])
    assert client.delete(f"/api/v1/keys/{key_id}").status_code == 200
    assert (
        client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    )


def test_scopes(client: TestClient, make_key: Callable[..., str]) -> None:
    read, write = make_key("read"), make_key("write")
    job = {"epochs": 1, "width": 0.125}
    r = client.post("/api/v1/jobs", json=job, headers={"Authorization": f"Bearer {read}"})
    assert r.status_code == 403 and "'write' scope" in r.json()["detail"]
    assert (
        client.post(
            "/api/v1/jobs", json=job, headers={"Authorization": f"Bearer {write}"}
        ).status_code
        == 202
    )
    assert (
        client.get("/api/v1/keys", headers={"Authorization": f"Bearer {write}"}).status_code == 403
    )
    r = client.post("/api/v1/keys", json={"name": "ci", "scopes": ["read", "write"]})
    assert r.status_code == 201
    body = r.json()
    assert body["token"].startswith("mwt_") and body["scopes"] == ["read", "write"]
    assert "token" not in client.get("/api/v1/keys").json()[0]
    assert client.post("/api/v1/keys", json={"name": "x", "scopes": ["root"]}).status_code == 422


def test_keys_are_stored_hashed_and_bootstrap_is_once(app: FastAPI, settings: Settings) -> None:
    first = ensure_admin_key(app.state.sessionmaker, settings)
    assert first is not None
    assert ensure_admin_key(app.state.sessionmaker, settings) is None  # printed once, never again
    with app.state.sessionmaker() as s:
        rows = s.scalars(select(ApiKey)).all()
    assert len(rows) == 1
    assert rows[0].key_hash == hash_token(first) and first not in (rows[0].key_hash, rows[0].prefix)
    assert rows[0].scopes == ["admin"]


def test_bootstrap_key_from_settings(app: FastAPI, settings: Settings) -> None:
    s2 = settings.model_copy(update={"bootstrap_admin_key": "mwt_operator_chosen_key"})
    assert ensure_admin_key(app.state.sessionmaker, s2) == "mwt_operator_chosen_key"
    with TestClient(app) as c:
        r = c.get("/api/v1/keys", headers={"Authorization": "Bearer mwt_operator_chosen_key"})
        assert r.status_code == 200


def test_cannot_revoke_own_key(client: TestClient) -> None:
    own = client.get("/api/v1/keys").json()[0]["id"]
    assert client.delete(f"/api/v1/keys/{own}").status_code == 409
    assert client.delete("/api/v1/keys/999").status_code == 404


def _routes_with_a_body(c: TestClient) -> list[tuple[str, str]]:
    """(method, url) of every API operation that takes a body (POST, PUT, PATCH)."""
    out = []
    for path, ops in c.get("/openapi.json").json()["paths"].items():
        if not path.startswith("/api/v1"):
            continue
        url = re.sub(r"\{\w+_id\}", "1", path)
        url = re.sub(r"\{\w+\}", "x", url)
        out += [(m.upper(), url) for m in ops if m in ("post", "put", "patch")]
    return out


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_a_read_key_is_refused_before_any_of_its_body_is_read(
    client: TestClient, make_key: Callable[..., str], framing: str
) -> None:
    """A read key's upload to a write route gets its 403 before the body is read: the body
    generator below is never asked for a chunk. (Before, FastAPI parsed a multipart or JSON
    body whole before the route's scope check ran.)"""
    read = make_key("read")
    chunk, chunks = bytes(8 * 1024), 16  # under every route's body limit: a 413 would not tell
    refused = set()
    for method, url in _routes_with_a_body(client):
        consumed = 0

        def body() -> Iterator[bytes]:
            nonlocal consumed
            head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\n'
            consumed += len(head)
            yield head
            for _ in range(chunks):
                consumed += len(chunk)
                yield chunk

        headers = {"Authorization": f"Bearer {read}",
                   "Content-Type": "multipart/form-data; boundary=xyz"}
        if framing == "length":
            headers["Content-Length"] = str(chunks * len(chunk) + 100)
        r = client.request(method, url, content=body(), headers=headers)
        if r.status_code != 403:
            continue  # a route a read key may use (predictions)
        assert "lacks the 'write' scope" in r.json()["detail"] or "lacks the 'admin' scope" in r.json()["detail"]
        assert consumed == 0, (method, url, f"{consumed} bytes of the body were read before the 403")
        refused.add((method, url))
    assert {("POST", "/api/v1/datasets"), ("PUT", "/api/v1/weights/x"), ("POST", "/api/v1/jobs"),
            ("POST", "/api/v1/keys")} <= refused
