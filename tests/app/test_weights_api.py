"""Uploaded weights (safetensors state dicts) and jobs that start from them (init_from)."""

import pickle

import torch
import torchvision.models as tvm
from safetensors.torch import save

from app.services.weights import weights_path
from mwt_core.config import TrainConfig


def _resnet18_bytes(num_classes: int) -> bytes:
    state = tvm.resnet18(weights=None, num_classes=num_classes).state_dict()
    return save({k: v.contiguous() for k, v in state.items()})


def test_upload_then_submit_checks_shapes_against_the_dataset(client, settings, make_key):
    r = client.put("/api/v1/weights/r18-digits", content=_resnet18_bytes(10))
    assert r.status_code == 201, r.text
    assert r.json()["tensors"] == len(tvm.resnet18().state_dict())
    assert weights_path(settings, "r18-digits").is_file()
    assert client.put("/api/v1/weights/r18-digits", content=b"x").status_code == 409

    ok = client.post("/api/v1/jobs", json={"arch": "tv_resnet18", "width": 1, "epochs": 1,
                                           "init_from": "r18-digits"})
    assert ok.status_code == 202, ok.text
    assert ok.json()["params"]["init_from"] == "r18-digits"
    # a run from weights takes the same defaults as one from scratch, on any data set
    loss_keys = ("mask_lr", "alpha", "beta", "gamma", "lr", "target_krr", "budget_rate",
                 "val_fraction", "guard_pp")
    defaults = {k: getattr(TrainConfig, k) for k in loss_keys}
    assert {k: ok.json()["params"][k] for k in loss_keys} == defaults
    chosen = client.post("/api/v1/jobs", json={"arch": "tv_resnet18", "width": 1, "epochs": 1,
                                               "init_from": "r18-digits", "beta": 2.0, "mask_lr": None})
    assert (chosen.json()["params"]["beta"], chosen.json()["params"]["mask_lr"]) == (2.0, None)
    assert chosen.json()["params"]["alpha"] == TrainConfig.alpha
    scratch = client.post("/api/v1/jobs", json={"epochs": 1})
    synthetic = client.post("/api/v1/jobs", json={"epochs": 1, "dataset": "synthetic"})
    for other in (scratch, synthetic):
        assert {k: other.json()["params"][k] for k in loss_keys} == defaults

    client.put("/api/v1/weights/r18-imagenet", content=_resnet18_bytes(1000))
    bad = client.post("/api/v1/jobs", json={"arch": "tv_resnet18", "width": 1,
                                            "init_from": "r18-imagenet"})
    assert bad.status_code == 422
    assert "'fc.bias' has shape [1000]" in bad.json()["detail"]  # the first mismatched tensor
    wrong_arch = client.post("/api/v1/jobs", json={"arch": "simcnn", "init_from": "r18-digits"})
    assert wrong_arch.status_code == 422 and "is not a weight of simcnn" in wrong_arch.json()["detail"]
    missing = client.post("/api/v1/jobs", json={"arch": "tv_resnet18", "width": 1, "init_from": "nope"})
    assert missing.status_code == 422 and "no weights uploaded as 'nope'" in missing.json()["detail"]

    read = make_key("read")
    r = client.put("/api/v1/weights/other", content=_resnet18_bytes(10),
                   headers={"Authorization": f"Bearer {read}"})
    assert r.status_code == 403


def test_upload_refuses_pickles_bad_names_and_empty_dicts(client, settings):
    r = client.put("/api/v1/weights/pickled", content=pickle.dumps({"w": torch.zeros(2)}))
    assert r.status_code == 422 and "safetensors" in r.json()["detail"]
    assert not weights_path(settings, "pickled").exists()
    assert not list(weights_path(settings, "pickled").parent.glob(".upload-*"))  # no leftovers
    assert client.put("/api/v1/weights/.hidden", content=b"x").status_code == 422
    assert client.put("/api/v1/weights/empty", content=save({})).status_code == 422


def test_worker_reads_the_uploaded_file(settings):
    from worker.jobs import _train_config

    cfg = _train_config(settings, {"arch": "tv_resnet18", "width": 1, "init_from": "r18"})
    assert cfg.init_from == str(weights_path(settings, "r18"))
    assert _train_config(settings, {"arch": "simcnn"}).init_from is None


def test_submit_from_a_registry_model_checks_it_first(client, app, settings):
    from tests.support.registry import seed_trained_model

    with app.state.sessionmaker() as s:
        base = seed_trained_model(s, settings)  # simcnn x0.125 on digits, ready
        base_id = base.id
    body = {"arch": "simcnn", "width": 0.125, "epochs": 1, "init_from_model": base_id}
    ok = client.post("/api/v1/jobs", json=body)
    assert ok.status_code == 202, ok.text
    assert ok.json()["params"]["init_from_model"] == base_id

    wider = client.post("/api/v1/jobs", json={**body, "width": 0.25})
    assert wider.status_code == 422
    detail = wider.json()["detail"]
    assert detail.startswith(f"weights of model {base_id}: tensor ") and "has shape" in detail
    absent = client.post("/api/v1/jobs", json={**body, "init_from_model": base_id + 100})
    assert absent.status_code == 422
    assert f"no model {base_id + 100} in the registry" in absent.json()["detail"]
    both = client.post("/api/v1/jobs", json={**body, "init_from": "r18"})
    assert both.status_code == 422 and "not both" in both.json()["detail"]

    # the base model cannot be deleted from under the queued job
    gone = client.delete(f"/api/v1/models/{base_id}")
    assert gone.status_code == 409 and ok.json()["id"] in gone.json()["detail"]


def test_list_and_delete_uploaded_weights(client, make_key):
    assert client.get("/api/v1/weights").json() == []
    client.put("/api/v1/weights/r18", content=_resnet18_bytes(10))
    listed = client.get("/api/v1/weights").json()
    assert [(w["name"], w["tensors"]) for w in listed] == [("r18", len(tvm.resnet18().state_dict()))]
    job = client.post("/api/v1/jobs", json={"arch": "tv_resnet18", "width": 1, "init_from": "r18"}).json()
    used = client.delete("/api/v1/weights/r18")
    assert used.status_code == 409 and job["id"] in used.json()["detail"]  # nothing lost
    writer = make_key("write")
    assert client.delete("/api/v1/weights/r18", headers={"Authorization": f"Bearer {writer}"}).status_code == 403
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    assert client.delete("/api/v1/weights/r18").status_code == 204
    assert client.get("/api/v1/weights").json() == []
    assert client.delete("/api/v1/weights/r18").status_code == 404


def _no_file_reads(monkeypatch) -> None:
    """Make every way of opening a weights file fail the test."""
    import mwt_core.models.weights as weights_mod

    def refuse(*args, **kwargs):
        raise AssertionError("a weights file was opened")

    for name in ("safe_open", "read_header", "read_shapes", "read_weights"):
        monkeypatch.setattr(weights_mod, name, refuse, raising=False)
    monkeypatch.setattr("mwt_core.checksums.sha256_file", refuse)


def test_listing_weights_reads_the_registry_not_the_files(client, monkeypatch):
    """What a listing shows was recorded when the weights were stored: listing opens no
    weights file (before, each listing read every file's header)."""
    body = _resnet18_bytes(10)
    stored = client.put("/api/v1/weights/r18", content=body)
    assert stored.status_code == 201, stored.text
    state = tvm.resnet18(weights=None, num_classes=10).state_dict()
    expected = {
        "name": "r18", "size_bytes": len(body), "sha256": stored.json()["sha256"],
        "tensors": len(state), "params": sum(t.numel() for t in state.values()),
        "dtypes": ["float32", "int64"],  # num_batches_tracked: int64
    }
    _no_file_reads(monkeypatch)
    listed = client.get("/api/v1/weights")
    assert listed.status_code == 200, listed.text
    assert [{k: w.get(k) for k in expected} for w in listed.json()] == [expected]
    assert {k: stored.json().get(k) for k in expected} == expected


def test_weights_stored_before_the_registry_recorded_them_are_listed(client, settings, monkeypatch):
    """Files uploaded before the weights table existed get their row at the first listing
    (their header read once); later listings read the registry only."""
    legacy = weights_path(settings, "legacy")
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_bytes(save({"w": torch.zeros(3, 4, dtype=torch.float16)}))
    weights_path(settings, "broken").write_bytes(b"not safetensors")  # left out, as before
    first = client.get("/api/v1/weights").json()
    assert [(w["name"], w["tensors"], w["params"], w["dtypes"]) for w in first] == [
        ("legacy", 1, 12, ["float16"])
    ]
    _no_file_reads(monkeypatch)
    assert client.get("/api/v1/weights").json() == first
    assert client.put("/api/v1/weights/legacy", content=b"x").status_code == 409


def test_concurrent_uploads_of_one_name_store_one_file_and_its_row(client, settings):
    """Two uploads racing for one name: one is stored (file and row agree), the other 409."""
    from concurrent.futures import ThreadPoolExecutor

    from mwt_core.checksums import sha256_file

    bodies = [save({"w": torch.full((64, 64), float(i))}) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda b: client.put("/api/v1/weights/race", content=b), bodies))
    assert sorted(r.status_code for r in answers) == [201, 409], [r.text for r in answers]
    stored = next(r.json() for r in answers if r.status_code == 201)
    listed = client.get("/api/v1/weights").json()
    assert [(w["name"], w["sha256"]) for w in listed] == [("race", stored["sha256"])]
    assert sha256_file(weights_path(settings, "race")) == stored["sha256"]
    assert not list(weights_path(settings, "race").parent.glob(".upload-*"))
