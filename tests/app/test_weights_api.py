"""Uploaded weights (safetensors state dicts) and jobs that start from them (init_from)."""

import pickle

import torch
import torchvision.models as tvm
from safetensors.torch import save

from app.services.weights import weights_path


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
