from __future__ import annotations

import hashlib

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app import storage
from app.db.models import Composition, Model
from app.settings import Settings
from tests.support.registry import seed_fake_model


def test_models_list_filter_sort_page(client: TestClient, app: FastAPI, settings: Settings) -> None:
    with app.state.sessionmaker() as s:
        seed_fake_model(s, settings, accuracy=0.8)
        seed_fake_model(s, settings, accuracy=0.95)
        seed_fake_model(
            s, settings, name="mnist-resnet18", dataset="mnist", arch="resnet18", accuracy=0.99
        )
        seed_fake_model(s, settings, name="pending-one", status="pending")
    page = client.get("/api/v1/models").json()
    assert page["total"] == 3  # ready only by default
    assert [
        m["version"]
        for m in client.get("/api/v1/models", params={"name": "digits-simcnn"}).json()["items"]
    ] == [2, 1]
    assert client.get("/api/v1/models", params={"status": "any"}).json()["total"] == 4
    assert (
        client.get("/api/v1/models", params={"dataset": "digits", "min_accuracy": 0.9}).json()[
            "total"
        ]
        == 1
    )
    assert (
        client.get("/api/v1/models", params={"arch": "resnet18"}).json()["items"][0]["dataset"]
        == "mnist"
    )
    assert client.get("/api/v1/models", params={"max_krr": 0.2}).json()["total"] == 0
    assert client.get("/api/v1/models", params={"tag": "seed=fake"}).json()["total"] == 3
    assert client.get("/api/v1/models", params={"tag": "seed=real"}).json()["total"] == 0
    accs = [
        m["accuracy"]
        for m in client.get("/api/v1/models", params={"sort": "-accuracy"}).json()["items"]
    ]
    assert accs == sorted(accs, reverse=True)
    one = client.get("/api/v1/models", params={"limit": 1, "offset": 1}).json()
    assert len(one["items"]) == 1 and one["next_offset"] == 2
    r = client.get("/api/v1/models", params={"sort": "size"})
    # The spec states the choices (a pattern), so the message names them.
    assert r.status_code == 422 and "created|accuracy|krr|version" in r.json()["detail"]
    r = client.get("/api/v1/models", params={"tag": "novalue"})
    assert r.status_code == 422 and "query.tag" in r.json()["detail"] and "=" in r.json()["detail"]
    assert client.get("/api/v1/models", params={"min_accuracy": 2}).status_code == 422


def test_model_detail_patch_and_404(client: TestClient, seeded: Model) -> None:
    m = client.get(f"/api/v1/models/{seeded.id}").json()
    assert m["status"] == "ready" and len(m["modules"]) == 10
    assert m["modules"][3]["class_name"] == "3" and m["modules"][3]["download_url"].endswith(
        "/download"
    )
    assert {
        "accuracy",
        "krr",
        "cohesion",
        "coupling",
        "params",
        "flops",
        "train_seconds",
    } <= m.keys()
    r = client.patch(f"/api/v1/models/{seeded.id}", json={"tags": {"stage": "prod", "seed": None}})
    assert r.status_code == 200 and r.json()["tags"] == {"stage": "prod"}
    assert client.get("/api/v1/models/999").status_code == 404
    assert client.get("/api/v1/models/abc").status_code == 422


def test_module_queries(client: TestClient, app: FastAPI, settings: Settings) -> None:
    with app.state.sessionmaker() as s:
        seed_fake_model(s, settings)
        seed_fake_model(s, settings, name="mnist-x", dataset="mnist", accuracy=0.5)
    assert client.get("/api/v1/modules").json()["total"] == 20
    assert client.get("/api/v1/modules", params={"dataset": "mnist"}).json()["total"] == 10
    by_name = client.get("/api/v1/modules", params={"class_name": "3"}).json()
    assert by_name["total"] == 2 and {m["class_index"] for m in by_name["items"]} == {3}
    assert (
        client.get("/api/v1/modules", params={"class_index": 9, "dataset": "digits"}).json()[
            "total"
        ]
        == 1
    )
    low = client.get("/api/v1/modules", params={"max_krr": 0.2}).json()["items"]
    assert low and all(m["krr"] <= 0.2 for m in low)
    good = client.get("/api/v1/modules", params={"min_accuracy": 0.85}).json()["items"]
    assert good and all(m["accuracy"] >= 0.85 for m in good)
    krrs = [
        m["krr"]
        for m in client.get("/api/v1/modules", params={"sort": "-krr", "limit": 5}).json()["items"]
    ]
    assert krrs == sorted(krrs, reverse=True)
    assert client.get("/api/v1/modules", params={"max_krr": -1}).status_code == 422
    assert client.get("/api/v1/modules/12345").status_code == 404


def test_module_download_etag_304_range(
    client: TestClient, seeded: Model, settings: Settings
) -> None:
    mod = client.get("/api/v1/modules", params={"model_id": seeded.id, "class_index": 2}).json()[
        "items"
    ][0]
    r = client.get(mod["download_url"])
    assert r.status_code == 200
    assert r.headers["etag"] == f'"{mod["sha256"]}"' and r.headers["accept-ranges"] == "bytes"
    assert hashlib.sha256(r.content).hexdigest() == mod["sha256"] == r.headers["x-checksum-sha256"]
    assert len(r.content) == mod["size_bytes"]
    assert "attachment" in r.headers["content-disposition"]
    full = r.content
    assert (
        client.get(mod["download_url"], headers={"If-None-Match": r.headers["etag"]}).status_code
        == 304
    )
    assert client.get(mod["download_url"], headers={"If-None-Match": '"other"'}).status_code == 200
    part = client.get(mod["download_url"], headers={"Range": "bytes=1000-"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 1000-{len(full) - 1}/{len(full)}"
    assert full[:1000] + part.content == full
    head = client.get(mod["download_url"], headers={"Range": "bytes=0-99"})
    assert head.status_code == 206 and head.content == full[:100]
    stale = client.get(mod["download_url"], headers={"Range": "bytes=10-", "If-Range": '"stale"'})
    assert stale.status_code == 200 and stale.content == full
    bad = client.get(mod["download_url"], headers={"Range": f"bytes={len(full) + 10}-"})
    assert bad.status_code == 416
    assert client.head(mod["download_url"]).headers["etag"] == f'"{mod["sha256"]}"'
    manifest = client.get(f"/api/v1/modules/{mod['id']}/manifest").json()
    assert manifest["class_index"] == 2
    # An archive that vanished from the store is reported, not a 500.
    tar = storage.resolve(settings.artifacts, f"models/{seeded.id}/modules/2.tar")
    tar.unlink()
    assert client.get(mod["download_url"]).status_code == 410
    assert client.get("/api/v1/modules/999/download").status_code == 404


def test_model_download(client: TestClient, seeded: Model) -> None:
    r = client.get(f"/api/v1/models/{seeded.id}/download")
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == seeded.sha256


def test_delete_refused_while_used_unless_forced(
    client: TestClient, app: FastAPI, seeded: Model, settings: Settings
) -> None:
    with app.state.sessionmaker() as s:
        s.add(
            Composition(
                model_id=seeded.id, classes=[1, 2], class_names=["1", "2"], classes_key="1,2"
            )
        )
        s.commit()
    r = client.delete(f"/api/v1/models/{seeded.id}")
    assert (
        r.status_code == 409
        and "composition(s)" in r.json()["detail"]
        and "force=true" in r.json()["detail"]
    )
    assert client.delete(f"/api/v1/models/{seeded.id}", params={"force": "true"}).status_code == 204
    assert client.get(f"/api/v1/models/{seeded.id}").status_code == 404
    assert client.get("/api/v1/modules", params={"model_id": seeded.id}).json()["total"] == 0
    assert client.get("/api/v1/compositions").json()["total"] == 0
    assert not storage.model_dir(settings.artifacts, seeded.id).exists()
    assert client.delete(f"/api/v1/models/{seeded.id}").status_code == 404


def test_compose_validation(
    client: TestClient, app: FastAPI, seeded: Model, settings: Settings
) -> None:
    cases = [
        ({"model_id": 999, "classes": [1]}, 404, "model 999 not found"),
        ({"model_id": seeded.id, "classes": [3, 10]}, 422, "class index 10 is out of range"),
        ({"model_id": seeded.id, "classes": [3, 3]}, 422, "must not repeat"),
        ({"model_id": seeded.id, "classes": ["cat"]}, 422, "no class named 'cat'"),
        ({"model_id": seeded.id, "classes": []}, 422, "classes: List should have at least 1 item"),
        (
            {"model_id": seeded.id, "classes": [1], "finetune": {"epochs": 0}},
            422,
            "finetune.epochs",
        ),
    ]
    for body, code, message in cases:
        r = client.post("/api/v1/compositions", json=body)
        assert r.status_code == code, (body, r.json())
        assert message in r.json()["detail"], r.json()
    with app.state.sessionmaker() as s:
        pending = seed_fake_model(s, settings, name="p", status="pending")
    r = client.post("/api/v1/compositions", json={"model_id": pending.id, "classes": [1]})
    assert r.status_code == 409 and "not ready" in r.json()["detail"]
    # The fake model has no loadable artifact: a clear 4xx, never a 500.
    r = client.post("/api/v1/compositions", json={"model_id": seeded.id, "classes": [1, 2]})
    assert 400 <= r.status_code < 500, r.json()
    assert client.get("/api/v1/compositions/999").status_code == 404
