"""Issue 14, case 6: keys are isolated. A write key acts on what it created, admin on all;
listings stay shared unless MWT_PRIVATE_LISTING; an Idempotency-Key is scoped per key."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.auth import ensure_admin_key
from app.db.models import Composition, Model
from app.main import create_app
from app.settings import Settings
from tests.support.registry import seed_fake_model

TINY = {"epochs": 1, "width": 0.125}


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        x_train=np.zeros((8, 8, 8), np.uint8),
        y_train=np.arange(8) % 2,
        x_test=np.zeros((4, 8, 8), np.uint8),
        y_test=np.arange(4) % 2,
    )
    return buf.getvalue()


def test_a_write_key_cannot_cancel_another_keys_job(
    client: TestClient, make_key: Callable[..., str]
) -> None:
    alice, bob = make_key("write"), make_key("write")
    job = client.post("/api/v1/jobs", json=TINY, headers=_as(alice)).json()["id"]
    r = client.post(f"/api/v1/jobs/{job}/cancel", headers=_as(bob))
    assert r.status_code == 403 and "another API key" in r.json()["detail"]
    assert client.get(f"/api/v1/jobs/{job}", headers=_as(bob)).json()["status"] == "queued"
    assert client.post(f"/api/v1/jobs/{job}/cancel", headers=_as(alice)).status_code == 202
    other = client.post("/api/v1/jobs", json=TINY, headers=_as(alice)).json()["id"]
    assert client.post(f"/api/v1/jobs/{other}/cancel").status_code == 202  # the admin key


def test_idempotency_key_is_scoped_per_api_key(
    client: TestClient, make_key: Callable[..., str]
) -> None:
    alice, bob = make_key("write"), make_key("write")
    same = {"Idempotency-Key": "nightly-1"}
    a = client.post("/api/v1/jobs", json=TINY, headers={**_as(alice), **same})
    b = client.post("/api/v1/jobs", json=TINY, headers={**_as(bob), **same})
    assert a.status_code == 202 and b.status_code == 202
    assert a.json()["id"] != b.json()["id"]
    again = client.post("/api/v1/jobs", json=TINY, headers={**_as(bob), **same})
    assert again.status_code == 200 and again.json()["id"] == b.json()["id"]


def test_models_compositions_and_datasets_belong_to_their_creator(
    client: TestClient, app: FastAPI, settings: Settings, make_key: Callable[..., str]
) -> None:
    alice, bob, reader = make_key("write"), make_key("write"), make_key("read")
    alice_id = next(k["id"] for k in client.get("/api/v1/keys").json() if k["prefix"] == alice[:12])
    with app.state.sessionmaker() as s:
        model = seed_fake_model(s, settings)
        s.execute(update(Model).where(Model.id == model.id).values(api_key_id=alice_id))
        comp = Composition(
            model_id=model.id, classes=[1], class_names=["1"], classes_key="1",
            api_key_id=alice_id,
        )
        s.add(comp)
        s.commit()
        model_id, comp_id = model.id, comp.id
    # Every read key still sees the shared registry.
    assert client.get(f"/api/v1/models/{model_id}", headers=_as(reader)).status_code == 200
    assert client.get("/api/v1/models", headers=_as(bob)).json()["total"] == 1

    r = client.patch(f"/api/v1/models/{model_id}", json={"tags": {"x": "1"}}, headers=_as(bob))
    assert r.status_code == 403
    assert client.delete(f"/api/v1/compositions/{comp_id}", headers=_as(bob)).status_code == 403
    assert client.delete(f"/api/v1/models/{model_id}?force=true", headers=_as(bob)).status_code == 403
    r = client.patch(f"/api/v1/models/{model_id}", json={"tags": {"x": "1"}}, headers=_as(alice))
    assert r.status_code == 200

    up = client.post("/api/v1/datasets", files={"file": ("alices.npz", _npz())}, headers=_as(alice))
    assert up.status_code == 201
    assert client.delete("/api/v1/datasets/alices", headers=_as(bob)).status_code == 403
    assert client.delete("/api/v1/datasets/alices", headers=_as(alice)).status_code == 204
    assert client.delete(f"/api/v1/compositions/{comp_id}").status_code == 204  # admin


def test_private_listing_shows_a_key_only_its_own(
    settings: Settings, make_key: Callable[..., str]
) -> None:
    private = settings.model_copy(update={"private_listing": True})
    app = create_app(private, run_executor=False)
    with TestClient(app) as c:
        admin = ensure_admin_key(app.state.sessionmaker, private)
        assert admin is not None
        c.headers["Authorization"] = f"Bearer {admin}"
        keys = [c.post("/api/v1/keys", json={"name": n, "scopes": ["write"]}).json()["token"]
                for n in ("alice", "bob")]
        alice, bob = keys
        mine = c.post("/api/v1/jobs", json=TINY, headers=_as(alice)).json()["id"]
        assert [j["id"] for j in c.get("/api/v1/jobs", headers=_as(alice)).json()["items"]] == [mine]
        assert c.get("/api/v1/jobs", headers=_as(bob)).json()["items"] == []
        assert c.get("/api/v1/jobs").json()["total"] == 1  # admin sees all
        c.post("/api/v1/datasets", files={"file": ("alices.npz", _npz())}, headers=_as(alice))
        names = {d["name"] for d in c.get("/api/v1/datasets", headers=_as(bob)).json()}
        assert "alices" not in names and "digits" in names
