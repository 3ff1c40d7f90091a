"""Compositions across models, against real (tiny) trained models in the registry."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.db.models import Model
from app.settings import Settings
from tests.support.registry import seed_trained_model


@pytest.fixture
def two_models(app: FastAPI, settings: Settings) -> tuple[Model, Model]:
    with app.state.sessionmaker() as s:
        a = seed_trained_model(s, settings, seed=0)
        b = seed_trained_model(s, settings, seed=1)
        return a, b


def _union(classes_per_source: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    from mwt_core.compose import labelled_union
    from mwt_core.data.datasets import load_dataset

    data = load_dataset("digits", min_input_size=32)
    return labelled_union([(data, c) for c in classes_per_source])


def test_compose_across_models(
    client: TestClient, two_models: tuple[Model, Model], tmp_path
) -> None:
    a, b = two_models
    body = {
        "sources": [{"model_id": a.id, "classes": [3, 5]}, {"model_id": b.id, "classes": ["8"]}],
        "calibration_per_class": 10,
    }
    r = client.post("/api/v1/compositions", json=body)
    assert r.status_code == 201, r.json()
    comp = r.json()
    assert comp["model_id"] == a.id and comp["classes"] == [3, 5, 8]
    assert comp["class_names"] == ["3", "5", "8"]
    assert [(s["model_id"], s["classes"]) for s in comp["sources"]] == [(a.id, [3, 5]), (b.id, [8])]
    m = comp["metrics"]
    x, y = _union([[3, 5], [8]])
    assert m["test_samples"] == len(y) and m["calibration_samples"] == 30
    assert [s["model_id"] for s in m["sources"]] == [a.id, b.id]
    assert 0 < comp["krr"] <= 1 and comp["accuracy_loss"] == pytest.approx(
        comp["baseline_accuracy"] - comp["accuracy"]
    )
    # The same request finds the same composition; another calibration is another composition.
    again = client.post("/api/v1/compositions", json=body)
    assert again.status_code == 200 and again.json()["id"] == comp["id"]
    other = client.post("/api/v1/compositions", json={**body, "calibration_per_class": 0})
    assert other.status_code == 201 and other.json()["id"] != comp["id"]
    assert other.json()["accuracy"] == pytest.approx(m["uncalibrated_accuracy"])

    # The download is the calibrated classifier: it reproduces the reported accuracy.
    from mwt_core.artifacts import load_artifact
    from mwt_core.compose import ComposedClassifier, accuracy

    tar = client.get(f"/api/v1/compositions/{comp['id']}/download")
    assert tar.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as t:
        t.extractall(tmp_path / "c", filter="data")
    manifest_dir = next(p.parent for p in (tmp_path / "c").rglob("manifest.json"))
    net, manifest = load_artifact(manifest_dir)
    assert isinstance(net, ComposedClassifier) and manifest["kind"] == "composition"
    assert [s["model_id"] for s in manifest["sources"]] == [a.id, b.id]
    assert accuracy(net, x, y) == pytest.approx(comp["accuracy"])
    ts = client.get(f"/api/v1/compositions/{comp['id']}/torchscript")
    assert ts.status_code == 200
    scripted = torch.jit.load(io.BytesIO(ts.content))
    with torch.no_grad():
        assert torch.allclose(scripted(x[:8]), net(x[:8]), atol=1e-5)

    # Filters see it from either model; deleting the second model must not leave it dangling.
    listed = client.get("/api/v1/compositions", params={"model_id": b.id}).json()
    assert {c["id"] for c in listed["items"]} == {comp["id"], other.json()["id"]}
    r = client.delete(f"/api/v1/models/{b.id}")
    assert r.status_code == 409 and str(comp["id"]) in r.json()["detail"]
    assert client.delete(f"/api/v1/models/{b.id}", params={"force": "true"}).status_code == 204
    assert client.get(f"/api/v1/compositions/{comp['id']}").status_code == 404
    assert client.get(f"/api/v1/models/{a.id}").status_code == 200


def test_compose_across_models_validation(
    client: TestClient, app: FastAPI, settings: Settings, two_models: tuple[Model, Model]
) -> None:
    a, b = two_models
    src = [{"model_id": a.id, "classes": [1]}, {"model_id": b.id, "classes": [2]}]
    cases = [
        ({"model_id": a.id, "classes": [1], "sources": src}, 422, "not both"),
        ({"model_id": a.id}, 422, "give model_id and classes"),
        ({"sources": [src[0], {"model_id": a.id, "classes": [2]}]}, 422, "appears in two sources"),
        ({"sources": src, "finetune": {"epochs": 1}}, 422, "calibrated instead"),
        ({"sources": [src[0], {"model_id": 999, "classes": [2]}]}, 404, "model 999 not found"),
        ({"sources": [src[0], {"model_id": b.id, "classes": [12]}]}, 422, "out of range"),
        ({"sources": src, "calibration_per_class": -1}, 422, "calibration_per_class"),
        ({"sources": []}, 422, "sources"),
    ]
    for body, code, message in cases:
        r = client.post("/api/v1/compositions", json=body)
        assert r.status_code == code, (body, r.json())
        assert message in r.json()["detail"], (body, r.json())
    # A model that reads 8x8 digits cannot sit beside one that reads 32x32 images.
    with app.state.sessionmaker() as s:
        small = seed_trained_model(s, settings, arch="resnet18", name="digits-8px")
    r = client.post(
        "/api/v1/compositions",
        json={"sources": [src[0], {"model_id": small.id, "classes": [2]}]},
    )
    assert r.status_code == 422 and "different input shapes" in r.json()["detail"], r.json()
    assert client.get("/api/v1/compositions").json()["total"] == 0
