from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


def _npz(n: int = 40, k: int = 3, size: int = 8, **extra: np.ndarray) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 255, (n, size, size), dtype=np.uint8),
        "y_train": np.arange(n) % k,
        "x_test": rng.integers(0, 255, (n // 2, size, size), dtype=np.uint8),
        "y_test": np.arange(n // 2) % k,
        "class_names": np.array([f"c{i}" for i in range(k)]),
    }
    arrays.update(extra)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_list_and_show_builtins(client: TestClient) -> None:
    names = {d["name"]: d for d in client.get("/api/v1/datasets").json()}
    assert names["digits"]["available"] and names["digits"]["num_classes"] == 10
    assert names["synthetic"]["available"]
    assert names["digits28"]["available"] and names["digits28"]["input_size"] == 28
    assert names["cifar10"]["available"] is False and "download" in names["cifar10"]["hint"]
    assert client.get("/api/v1/datasets/digits").json()["input_size"] == 8
    assert client.get("/api/v1/datasets/nope").status_code == 404


def test_upload_validate_and_use(client: TestClient, settings: Settings) -> None:
    r = client.post("/api/v1/datasets", files={"file": ("shapes.npz", _npz())})
    assert r.status_code == 201, r.json()
    d = r.json()
    assert (
        d["name"] == "shapes" and d["source"] == "upload" and d["class_names"] == ["c0", "c1", "c2"]
    )
    assert d["train_size"] == 40 and d["test_size"] == 20 and len(d["sha256"]) == 64
    assert (settings.datasets / "uploads" / "shapes.npz").is_file()
    assert client.get("/api/v1/datasets/shapes").json()["sha256"] == d["sha256"]
    again = client.post("/api/v1/datasets", files={"file": ("shapes.npz", _npz())})
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    named = client.post(
        "/api/v1/datasets", files={"file": ("x.npz", _npz())}, data={"name": "other"}
    )
    assert named.status_code == 201 and named.json()["name"] == "other"
    job = client.post("/api/v1/jobs", json={"dataset": "shapes", "arch": "resnet18", "epochs": 1})
    assert job.status_code == 202
    assert client.delete("/api/v1/datasets/other").status_code == 204
    assert client.get("/api/v1/datasets/other").status_code == 404
    assert client.delete("/api/v1/datasets/digits").status_code == 409


def test_invalid_uploads_are_4xx_with_reason(client: TestClient) -> None:
    cases = [
        (("bad.npz", b"not a zip at all"), "not a readable .npz"),
        (("float.npz", _npz(x_train=np.zeros((40, 8, 8), dtype=np.float32))), "must be uint8"),
        (("missing.npz", _npz(n=40)[:100]), "invalid dataset"),
        (("empty.npz", b""), "empty"),
    ]
    for file, message in cases:
        r = client.post("/api/v1/datasets", files={"file": file})
        assert r.status_code == 422, (file[0], r.json())
        assert message in r.json()["detail"], r.json()
        assert "/tmp" not in r.json()["detail"] and ".upload-" not in r.json()["detail"]
    r = client.post("/api/v1/datasets", files={"file": ("digits.npz", _npz())})
    assert r.status_code == 409 and "built-in" in r.json()["detail"]
    r = client.post(
        "/api/v1/datasets", files={"file": ("x.npz", _npz())}, data={"name": "Bad Name"}
    )
    assert r.status_code == 422 and "invalid dataset name" in r.json()["detail"]
    assert client.post("/api/v1/datasets").status_code == 422


def test_upload_size_limit(settings: Settings, tmp_path: Path) -> None:
    from app.auth import ensure_admin_key

    small = settings.model_copy(update={"max_upload_mb": 1})
    app: FastAPI = create_app(small, run_executor=False)
    with TestClient(app) as c:
        token = ensure_admin_key(app.state.sessionmaker, small)
        big = _npz(n=20000, size=8)  # ~1.9 MB
        r = c.post(
            "/api/v1/datasets",
            files={"file": ("big.npz", big)},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 413
        uploads = small.datasets / "uploads"
        assert not uploads.exists() or not any(uploads.iterdir())
        assert (
            c.get("/api/v1/datasets/big", headers={"Authorization": f"Bearer {token}"}).status_code
            == 404
        )
