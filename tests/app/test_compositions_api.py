"""Compositions across models, against real (tiny) trained models in the registry."""

from __future__ import annotations

import io
import json
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


@pytest.mark.slow
def test_compose_across_models(
    client: TestClient, app: FastAPI, two_models: tuple[Model, Model], tmp_path
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
    from mwt_core.compose_options import DEFAULT_COMBINE, FALLBACK_COMBINE, LABELLED_METHODS

    labelled_default = DEFAULT_COMBINE in LABELLED_METHODS  # only a labelled method draws labels
    assert m["test_samples"] == len(y) and m["calibration_samples"] == (30 if labelled_default else 0)
    assert [s["model_id"] for s in m["sources"]] == [a.id, b.id]
    assert 0 < comp["krr"] <= 1 and comp["accuracy_loss"] == pytest.approx(
        comp["baseline_accuracy"] - comp["accuracy"]
    )
    # The default (auto) on models trained before validation slices: the fallback method, and why.
    assert m["combine"] == FALLBACK_COMBINE and m["combine_choice"]["mode"] == "default"
    assert m["raw_accuracy"] == m["uncalibrated_accuracy"]
    from mwt_core.combine import needs_own

    assert (m["combine_params"] > 0) == labelled_default and m["latency_ms"] > 0
    assert (m["own_samples"] > 0) == needs_own(m["combine"])  # only what the method needs
    # The same request finds the same composition at once, from the registry: no model is
    # loaded for it. Another method or calibration is another composition.
    app.state.model_cache.forget_model(a.id)
    app.state.model_cache.forget_model(b.id)
    again = client.post("/api/v1/compositions", json=body)
    assert again.status_code == 200 and again.json()["id"] == comp["id"]
    assert not app.state.model_cache._items, "a repeated composition must not load models"
    raw = {**body, "calibration_per_class": 0, "combine": "raw"}
    other = client.post("/api/v1/compositions", json=raw)
    assert other.status_code == 201 and other.json()["id"] != comp["id"]
    assert other.json()["accuracy"] == pytest.approx(m["uncalibrated_accuracy"])
    assert other.json()["metrics"]["calibration_samples"] == 0
    assert client.post("/api/v1/compositions", json=raw).json()["id"] == other.json()["id"]
    labelled = client.post("/api/v1/compositions",
                           json={**body, "combine": "head", "calibration_per_class": 0})
    assert labelled.status_code == 422 and "calibration_per_class > 0" in labelled.json()["detail"]

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
        ({"sources": src, "combine": "vote"}, 422, "combine"),
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


@pytest.mark.slow
def test_composition_reports_loss_against_a_standard_model(
    client: TestClient, app: FastAPI, settings: Settings, two_models: tuple[Model, Model]
) -> None:
    """Where the registry holds a standard (modular=false) model of the same dataset and
    architecture, a composition reports the accuracy lost against it (the paper's definition)."""
    from mwt_core.compose import NormalizedInput, accuracy
    from mwt_core.data.datasets import InputSpec
    from mwt_core.reuse import restrict

    a, b = two_models
    body = {"sources": [{"model_id": a.id, "classes": [0, 1]}, {"model_id": b.id, "classes": [7]}],
            "combine": "energy"}
    first = client.post("/api/v1/compositions", json=body).json()
    assert "standard_accuracy" not in first["metrics"]  # none in the registry yet
    with app.state.sessionmaker() as s:
        std = seed_trained_model(s, settings, seed=2, name="digits-standard")
        std.modular = False
        s.commit()
        std_id = std.id
    body["sources"][1]["classes"] = [7, 9]
    r = client.post("/api/v1/compositions", json=body)
    assert r.status_code == 201, r.json()
    m = r.json()["metrics"]
    assert m["standard_model_id"] == std_id and m["combine"] == "energy"
    from mwt_core.artifacts import load_artifact

    net, manifest = load_artifact(settings.artifacts / f"models/{std_id}/model")
    x, y = _union([[0, 1], [7, 9]])
    spec = InputSpec.from_json(manifest["input_spec"])
    want = accuracy(NormalizedInput(restrict(net, [0, 1, 7, 9], 10), spec), x, y)
    assert m["standard_accuracy"] == pytest.approx(want)
    assert m["standard_accuracy_loss"] == pytest.approx(want - m["accuracy"])


def test_a_composition_past_the_inline_size_runs_as_a_job(
    client: TestClient, app: FastAPI, settings: Settings, two_models: tuple[Model, Model]
) -> None:
    """More sources than MWT_COMPOSE_INLINE_MAX_PARTS: 202 with a compose job, the same
    request joins that job, and the job stores what the request would have composed."""
    from worker.jobs import run_job

    a, b = two_models
    body = {
        "sources": [{"model_id": a.id, "classes": [3, 5]}, {"model_id": b.id, "classes": [8]}],
        "calibration_per_class": 10,
    }
    app.state.settings = settings.model_copy(update={"compose_inline_max_parts": 1})
    r = client.post("/api/v1/compositions", json=body)
    assert r.status_code == 202, r.json()
    job = r.json()
    assert job["kind"] == "compose" and job["status"] == "queued"
    assert r.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert client.post("/api/v1/compositions", json=body).json()["id"] == job["id"]
    one_model = client.post("/api/v1/compositions", json={"model_id": a.id, "classes": [3, 5]})
    assert one_model.status_code == 201  # one source is within the size

    assert run_job(job["id"], settings) == "succeeded"
    done = client.get(f"/api/v1/jobs/{job['id']}").json()
    comp = client.get(f"/api/v1/compositions/{done['composition_id']}").json()
    assert comp["classes"] == [3, 5, 8] and comp["class_names"] == ["3", "5", "8"]
    # The composition is the one the request would have built: asked again, it is found.
    app.state.settings = settings
    again = client.post("/api/v1/compositions", json=body)
    assert again.status_code == 200 and again.json()["id"] == comp["id"]
    assert again.json()["accuracy"] == comp["accuracy"]


def _manifest_of(client: TestClient, comp: dict) -> dict:
    """The manifest inside a composition's download."""
    with tarfile.open(fileobj=io.BytesIO(client.get(comp["download_url"]).content)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("manifest.json"))
        file = tar.extractfile(member)
        assert file is not None
        return dict(json.loads(file.read()))


def test_one_model_composition_chooses_tau_on_the_validation_slice(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    """A model trained with a validation slice: its classes are cut at the tau chosen on the
    slice by default, recorded in the response and the manifest; "auto", another margin and a
    number are compositions of their own, each found again."""
    from mwt_core.config import TAU_GRID, ModularizeConfig

    with app.state.sessionmaker() as s:
        model = seed_trained_model(s, settings, record_config=True, name="digits-sliced")
    one = {"model_id": model.id, "classes": [3, 5, 8]}
    r = client.post("/api/v1/compositions", json=one)
    assert r.status_code == 201, r.json()
    comp = r.json()
    m = comp["metrics"]
    assert m["tau_mode"] == "auto" and comp["tau"] == m["tau"] and comp["tau"] in TAU_GRID
    assert comp["margin_pp"] == m["margin_pp"] == ModularizeConfig.margin_pp
    assert m["val_samples"] > 0 and 0 <= m["module_val_acc"] <= 1 and 0 <= m["full_val_acc"] <= 1
    assert m["met_margin"] is (m["module_val_acc"] >= m["full_val_acc"] - 0.01 - 1e-9)
    choice = _manifest_of(client, comp)["tau_choice"]
    assert choice["tau"] == comp["tau"] and choice["tau_mode"] == "auto"
    assert choice["margin_pp"] == ModularizeConfig.margin_pp and choice["tried"]
    assert choice["module_val_acc"] == m["module_val_acc"]

    auto = client.post("/api/v1/compositions", json={**one, "tau": "auto"})
    assert auto.status_code == 200 and auto.json()["id"] == comp["id"]  # auto is the default
    loose = client.post("/api/v1/compositions", json={**one, "tau": "auto", "margin_pp": 100})
    assert loose.status_code == 201 and loose.json()["id"] != comp["id"]
    assert loose.json()["tau"] == max(TAU_GRID)  # any loss is allowed: the smallest module
    ids = {comp["id"], loose.json()["id"]}
    for tau in (0.9, 0.8):
        fixed = client.post("/api/v1/compositions", json={**one, "tau": tau})
        assert fixed.status_code == 201 and fixed.json()["id"] not in ids, fixed.json()
        assert fixed.json()["tau"] == tau and fixed.json()["metrics"]["tau_mode"] == "fixed"
        assert fixed.json()["margin_pp"] is None
        assert _manifest_of(client, fixed.json())["tau_choice"]["tau"] == tau
        ids.add(fixed.json()["id"])
        again = client.post("/api/v1/compositions", json={**one, "tau": tau})
        assert again.status_code == 200 and again.json()["id"] == fixed.json()["id"]


def test_finetuned_composition_uses_the_chosen_tau(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    from worker.jobs import run_job

    with app.state.sessionmaker() as s:
        model = seed_trained_model(s, settings, record_config=True, name="digits-sliced")
    body = {"model_id": model.id, "classes": [3, 5], "finetune": {"epochs": 1}, "tau": 0.85}
    r = client.post("/api/v1/compositions", json=body)
    assert r.status_code == 202, r.json()
    assert run_job(r.json()["id"], settings) == "succeeded"
    done = client.get(f"/api/v1/jobs/{r.json()['id']}").json()
    comp = client.get(f"/api/v1/compositions/{done['composition_id']}").json()
    assert comp["finetuned"] and comp["tau"] == 0.85
    assert comp["metrics"]["tau_mode"] == "fixed"


def test_tau_validation(client: TestClient, seeded: Model) -> None:
    one = {"model_id": seeded.id, "classes": [1, 2]}
    src = [{"model_id": seeded.id, "classes": [1]}, {"model_id": seeded.id + 1, "classes": [2]}]
    cases = [
        ({**one, "tau": "fast"}, "tau"),
        ({**one, "tau": "AUTO"}, "tau"),
        ({**one, "tau": "0.5"}, "tau"),
        ({**one, "tau": 0}, "tau"),
        ({**one, "tau": 1.5}, "tau"),
        ({**one, "tau": True}, "tau"),
        ({**one, "margin_pp": -1}, "margin_pp"),
        ({**one, "margin_pp": 101}, "margin_pp"),
        ({**one, "margin_pp": "1"}, "margin_pp"),
        ({**one, "tau": 0.8, "margin_pp": 2}, "margin_pp applies to tau 'auto'"),
        ({"sources": src, "tau": 0.8}, "one model's classes"),
        ({"sources": src, "margin_pp": 2}, "one model's classes"),
        ({"modules": [1, 2], "tau": "auto"}, "one model's classes"),
    ]
    for body, message in cases:
        r = client.post("/api/v1/compositions", json=body)
        assert r.status_code == 422, (body, r.json())
        assert message in r.json()["detail"], (body, r.json())
    # The seeded model records no validation slice: "auto" is refused before anything is
    # loaded, saying what to give instead.
    for body in ({**one, "tau": "auto"}, {"sources": [one], "tau": "auto"}):
        r = client.post("/api/v1/compositions", json=body)
        assert r.status_code == 422, r.json()
        detail = r.json()["detail"]
        assert "without a validation slice" in detail and "number in (0, 1]" in detail, detail
    assert client.get("/api/v1/compositions").json()["total"] == 0


def test_compose_auto_chooses_on_the_models_validation_slices(
    client: TestClient, app: FastAPI, settings: Settings, two_models: tuple[Model, Model]
) -> None:
    """``combine: auto`` measures every no-label method on the images the source models held out
    of training and runs the best; models trained without a slice get the default, and the
    composition says why."""
    from mwt_core.compose_options import FALLBACK_COMBINE, ZERO_LABEL_METHODS

    with app.state.sessionmaker() as s:
        a = seed_trained_model(s, settings, seed=0, record_config=True)
        b = seed_trained_model(s, settings, seed=1, record_config=True)
    halves = [{"model_id": a.id, "classes": [0, 1, 2, 3, 4]},
              {"model_id": b.id, "classes": [5, 6, 7, 8, 9]}]
    r = client.post("/api/v1/compositions", json={"sources": halves})  # auto is the default
    assert r.status_code == 201, r.json()
    m = r.json()["metrics"]
    choice = m["combine_choice"]
    assert choice["mode"] == "auto" and choice["val_samples"] > 0
    assert set(choice["val_accuracy"]) == set(ZERO_LABEL_METHODS)
    assert m["combine"] in ZERO_LABEL_METHODS
    assert choice["val_accuracy"][m["combine"]] == max(choice["val_accuracy"].values())
    # The stored artifact runs the chosen method (what a download rebuilds from its manifest).
    manifest = client.get(f"/api/v1/compositions/{r.json()['id']}").json()["metrics"]
    assert manifest["combine"] == m["combine"]
    # Models from before the validation slice: the default method, and why.
    old_a, old_b = two_models
    old = [{"model_id": old_a.id, "classes": [0, 1]}, {"model_id": old_b.id, "classes": [8, 9]}]
    r = client.post("/api/v1/compositions", json={"sources": old, "combine": "auto"})
    assert r.status_code == 201, r.json()
    m = r.json()["metrics"]
    assert m["combine"] == FALLBACK_COMBINE and m["combine_choice"]["mode"] == "default"
    assert "val_fraction" in m["combine_choice"]["note"]
