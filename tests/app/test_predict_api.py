"""Predict and export over HTTP, against small real models registered in the registry.

The models are ResNet-18 x0.125 on scikit-learn's 8x8 digits (trained once per module, a
few seconds each) so a PNG written from a test image is exactly what the model was trained
on. References are the stored artifacts run in-process on the dataset's own tensors.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from app import storage
from app.db.models import Composition, Model, ModelStatus, Module, utcnow
from app.settings import Settings
from mwt_core.artifacts import load_artifact, save_artifact
from mwt_core.data.datasets import load_dataset
from mwt_core.modularize import modularize
from mwt_core.reuse import extract_module
from mwt_core.training import TrainConfig, train

N_IMAGES = 12
MODULE_CLASS = 3


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", min_input_size=8)


@pytest.fixture(scope="module")
def trained(digits):
    """Two small MwT models of the same data (seeds 0 and 1) with their modularizations."""
    torch.manual_seed(0)
    out = []
    for seed in (0, 1):
        cfg = TrainConfig(arch="resnet18", width=0.125, epochs=2, batch_size=64, seed=seed,
                          device="cpu", mask_lr=0.1)
        result = train(cfg, digits)
        out.append((result, modularize(result.model, digits, device="cpu"), cfg))
    return out


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Small limits, so the limit checks are cheap to hit."""
    return settings.model_copy(update={"predict_max_images": N_IMAGES, "predict_max_image_kb": 4,
                                       "predict_max_pixels": 64 * 64})


def _register(app: FastAPI, settings: Settings, digits, trained_one, seed: int) -> tuple[int, int]:
    """A ready model row with its artifact, and one module row (class MODULE_CLASS)."""
    result, mz, cfg = trained_one
    with app.state.sessionmaker() as s:
        model = Model(
            name="digits-predict", version=seed + 1, status=ModelStatus.pending.value,
            dataset="digits", arch=cfg.arch, width=cfg.width, modular=True, tau=mz.tau,
            num_classes=10, class_names=list(digits.class_names),
            input_spec=digits.spec.to_json(), config={"arch": cfg.arch}, tags={},
            accuracy=result.test_acc, krr=mz.model_krr, epochs=cfg.epochs, created_at=utcnow(),
        )
        s.add(model)
        s.flush()
        mdir = storage.model_dir(settings.artifacts, model.id)
        common = {"dataset": "digits", "dataset_ref": "digits", "input_spec": digits.spec.to_json()}
        save_artifact(mdir / "model", result.model,
                      {**common, "class_names": list(digits.class_names),
                       "modularization": mz.to_json()})
        model.sha256, model.size_bytes = storage.write_tar(mdir / "model", mdir / "model.tar")
        model.artifact_path = storage.relative(settings.artifacts, mdir / "model")
        model.status, model.ready_at = ModelStatus.ready.value, utcnow()
        module = extract_module(result.model, mz, [MODULE_CLASS])
        mdir_c = mdir / "modules" / str(MODULE_CLASS)
        save_artifact(mdir_c, module, {**common, "class_names": [str(MODULE_CLASS)],
                                       "classes": [MODULE_CLASS]})
        sha, size = storage.write_tar(mdir_c, mdir / "modules" / f"{MODULE_CLASS}.tar")
        row = Module(
            model_id=model.id, class_index=MODULE_CLASS, class_name=str(MODULE_CLASS),
            dataset="digits", arch=cfg.arch, krr=float(mz.krr[MODULE_CLASS]), accuracy=None,
            cohesion=None, kept_kernels=1, total_kernels=1, params=1, flops=1,
            artifact_path=storage.relative(settings.artifacts, mdir_c), sha256=sha, size_bytes=size,
        )
        s.add(row)
        s.commit()
        return model.id, row.id


@pytest.fixture
def registry(app: FastAPI, settings: Settings, client: TestClient, digits, trained):
    """Two models with a module each, and a composition across them (0-4 from one, 5-9 from
    the other, calibrated) made through the API."""
    (a, mod_a), (b, _) = (_register(app, settings, digits, t, i) for i, t in enumerate(trained))
    r = client.post("/api/v1/compositions", json={
        "sources": [{"model_id": a, "classes": [0, 1, 2, 3, 4]},
                    {"model_id": b, "classes": [5, 6, 7, 8, 9]}],
        "calibration_per_class": 10,
    })
    assert r.status_code == 201, r.json()
    return {"model": a, "module": mod_a, "composition": r.json()["id"]}


def _stored(app: FastAPI, settings: Settings, kind: str, ident: int):
    table = {"model": Model, "module": Module, "composition": Composition}[kind]
    with app.state.sessionmaker() as s:
        rel = s.get(table, ident).artifact_path
    return load_artifact(storage.resolve(settings.artifacts, rel))


def _png(image: torch.Tensor, size: int | None = None, mode: str = "L") -> bytes:
    """A ``1 x H x W`` uint8 image as PNG bytes (optionally enlarged, or as RGB)."""
    im = Image.fromarray(image[0].numpy(), mode="L").convert(mode)
    if size is not None:
        im = im.resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _reference(net, manifest, digits, idx: slice) -> torch.Tensor:
    """In-process scores on the dataset's own test tensors (no PNG, no export code)."""
    with torch.no_grad():
        if manifest["kind"] == "composition":
            return net(digits.test_x[idx].float() / 255.0)
        return net(digits.spec.normalize(digits.test_x[idx]))


def test_predict_png_digits_right_class_on_top(
    client: TestClient, app: FastAPI, settings: Settings, registry, digits
) -> None:
    idx = slice(0, N_IMAGES)
    files = [("files", (f"digit{i}.png", _png(digits.test_x[i]), "image/png"))
             for i in range(N_IMAGES)]
    truth = [str(int(c)) for c in digits.test_y[idx]]
    for kind in ("composition", "model"):
        net, manifest = _stored(app, settings, kind, registry[kind])
        ref = _reference(net, manifest, digits, idx)
        names = [str(n) for n in manifest["class_names"]]
        r = client.post(f"/api/v1/{kind}s/{registry[kind]}/predict", files=files)
        assert r.status_code == 200, r.json()
        body = r.json()
        assert body["kind"] == kind and body["scoring"] == "softmax" and body["class_names"] == names
        assert [p["input"] for p in body["predictions"]] == [f"digit{i}.png" for i in range(N_IMAGES)]
        probs = torch.softmax(ref, 1)
        right = 0
        for i, pred in enumerate(body["predictions"]):
            top = pred["top"]
            assert len(top) == settings.predict_top_k
            assert [t["probability"] for t in top] == sorted((t["probability"] for t in top),
                                                             reverse=True)
            assert top[0]["class_name"] == names[int(ref[i].argmax())]
            for t in top:
                assert t["probability"] == pytest.approx(float(probs[i, t["index"]]), abs=1e-5)
                assert t["logit"] == pytest.approx(float(ref[i, t["index"]]), abs=1e-4)
            right += top[0]["class_name"] == truth[i]
        # The test digits the stored classifier gets right come back right over HTTP, PNG and all.
        assert right == int((ref.argmax(1) == digits.test_y[idx]).sum()) and right > 0

        # The same images as a JSON batch (already in the spec's shape) answer the same.
        batch = (digits.test_x[idx].float() / 255.0).tolist()
        j = client.post(f"/api/v1/{kind}s/{registry[kind]}/predict", json=batch,
                        params={"top_k": 2})
        assert j.status_code == 200, j.json()
        assert [p["input"] for p in j.json()["predictions"]] == [f"#{i}" for i in range(N_IMAGES)]
        for a, b in zip(j.json()["predictions"], body["predictions"], strict=True):
            assert len(a["top"]) == 2 and a["top"][0]["class_name"] == b["top"][0]["class_name"]

    # A bigger RGB picture of a digit is turned into the spec's 1 x 8 x 8 before classifying.
    big = client.post(f"/api/v1/models/{registry['model']}/predict",
                      files={"files": ("big.png", _png(digits.test_x[0], 32, "RGB"), "image/png")})
    assert big.status_code == 200 and big.json()["input_spec"]["size"] == 8


def test_predict_one_class_module_reports_its_sigmoid(
    client: TestClient, app: FastAPI, settings: Settings, registry, digits
) -> None:
    net, manifest = _stored(app, settings, "module", registry["module"])
    ref = _reference(net, manifest, digits, slice(0, 4))
    r = client.post(f"/api/v1/modules/{registry['module']}/predict",
                    files=[("files", (f"{i}.png", _png(digits.test_x[i]), "image/png"))
                           for i in range(4)])
    assert r.status_code == 200, r.json()
    body = r.json()
    assert body["scoring"] == "sigmoid" and body["class_names"] == [str(MODULE_CLASS)]
    for i, pred in enumerate(body["predictions"]):
        (only,) = pred["top"]
        assert only["logit"] == pytest.approx(float(ref[i, 0]), abs=1e-4)
        # Not a softmax of one logit (always 1.0): the score moves with the logit.
        assert only["probability"] == pytest.approx(float(torch.sigmoid(ref[i, 0])), abs=1e-5)
    assert len({p["top"][0]["probability"] for p in body["predictions"]}) > 1


def test_predict_bad_inputs_are_4xx(client: TestClient, registry, digits, settings) -> None:
    url = f"/api/v1/compositions/{registry['composition']}/predict"
    png = _png(digits.test_x[0])
    noise = np.random.default_rng(0).integers(0, 256, (80, 80), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise, mode="L").save(buf, format="PNG")
    big_file = buf.getvalue()
    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, format="PNG")
    many_pixels = buf.getvalue()
    assert len(big_file) > 4096 and len(many_pixels) < 4096
    cases = [
        ({"files": {"files": ("notes.txt", b"hello, not an image", "text/plain")}}, 422,
         "notes.txt: not a PNG or JPEG"),
        ({"files": {"files": ("cut.png", png[: len(png) // 2], "image/png")}}, 422, "cut.png"),
        ({"files": {"files": ("empty.png", b"", "image/png")}}, 422, "empty"),
        ({"files": {"files": ("big.png", big_file, "image/png")}}, 413, "KiB"),
        ({"files": {"files": ("wide.png", many_pixels, "image/png")}}, 413, "100x100 pixels"),
        ({"files": [("files", (f"{i}.png", png, "image/png")) for i in range(N_IMAGES + 1)]}, 413,
         f"at most {N_IMAGES}"),
        ({"files": {"note": (None, "a form field, no file")}}, 422, "no image files"),
        ({"data": {"note": "no file"}}, 415, "multipart/form-data"),
        ({"json": [[[[0.5] * 8] * 8] * 3]}, 422, "[1, 8, 8]"),  # 3 channels for a grey spec
        ({"json": [[[[0.5] * 7] * 8]]}, 422, "[1, 8, 8]"),
        ({"json": [[[[2.0] * 8] * 8]]}, 422, "[0, 1]"),
        ({"json": [[[["a"] * 8] * 8]]}, 422, "numeric"),
        ({"json": []}, 422, "no image"),
        ({"json": {"images": []}}, 422, "array of images"),
        ({"json": [[[[0.5] * 8] * 8]] * (N_IMAGES + 1)}, 413, f"at most {N_IMAGES}"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422,
         "not valid JSON"),
        ({"content": png, "headers": {"content-type": "image/png"}}, 415, "multipart/form-data"),
    ]
    for kwargs, code, message in cases:
        r = client.post(url, **kwargs)
        assert r.status_code == code, (kwargs.get("files") or kwargs.get("json"), r.text)
        assert message in r.json()["detail"], (message, r.json())
    assert client.post(url, content=b"0" * (settings.predict_body_limit_bytes + 1),
                       headers={"content-type": "application/json"}).status_code == 413
    assert client.post(url, files={"files": ("a.png", png, "image/png")},
                       params={"top_k": 0}).status_code == 422
    r = client.post("/api/v1/compositions/999/predict", files={"files": ("a.png", png, "image/png")})
    assert r.status_code == 404 and "composition 999 not found" in r.json()["detail"]
    r = client.post("/api/v1/modules/999/predict", json=[[[[0.5] * 8] * 8]])
    assert r.status_code == 404


def test_predict_needs_only_a_read_key(client: TestClient, registry, digits, make_key) -> None:
    url = f"/api/v1/modules/{registry['module']}/predict"
    files = {"files": ("a.png", _png(digits.test_x[0]), "image/png")}
    assert client.post(url, files=files, headers={"Authorization": "Bearer nope"}).status_code == 401
    read = make_key("read")
    assert client.post(url, files=files, headers={"Authorization": f"Bearer {read}"}).status_code == 200


@pytest.mark.slow
def test_export_downloads_match_in_process(
    client: TestClient, app: FastAPI, settings: Settings, registry, digits
) -> None:
    import onnxruntime as ort

    idx = slice(0, N_IMAGES)
    x = (digits.test_x[idx].float() / 255.0)
    for kind in ("model", "module", "composition"):
        net, manifest = _stored(app, settings, kind, registry[kind])
        ref = _reference(net, manifest, digits, idx)
        url = f"/api/v1/{kind}s/{registry[kind]}/export"
        ts = client.get(url)  # TorchScript by default
        assert ts.status_code == 200 and ts.headers["etag"]
        extra = {"mwt.json": ""}
        scripted = torch.jit.load(io.BytesIO(ts.content), _extra_files=extra)
        with torch.no_grad():
            assert float((scripted(x) - ref).abs().max()) <= 1e-4
        assert json.loads(extra["mwt.json"])["class_names"] == [str(n) for n in manifest["class_names"]]
        ox = client.get(url, params={"format": "onnx"})
        assert ox.status_code == 200 and ox.headers["content-disposition"].endswith('.onnx"')
        sess = ort.InferenceSession(ox.content, providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert float(np.abs(got - ref.numpy()).max()) <= 1e-4
        # Cached: the same file (ETag) again, and 304 for a client that has it.
        again = client.get(url, params={"format": "onnx"})
        assert again.headers["etag"] == ox.headers["etag"] and again.content == ox.content
        assert client.get(url, params={"format": "onnx"},
                          headers={"If-None-Match": ox.headers["etag"]}).status_code == 304
        bad = client.get(url, params={"format": "pickle"})
        assert bad.status_code == 422 and "torchscript" in bad.json()["detail"]
    legacy = client.get(f"/api/v1/compositions/{registry['composition']}/torchscript")
    assert legacy.status_code == 200
    assert client.get("/api/v1/modules/999/export").status_code == 404


def test_classifier_cache_is_a_bounded_lru(app: FastAPI, settings: Settings, registry) -> None:
    from app.services.predict import ClassifierCache

    with app.state.sessionmaker() as s:
        paths = {k: s.get(t, registry[k]).artifact_path
                 for k, t in (("model", Model), ("module", Module))}
    cache = ClassifierCache(1)
    first = cache.load(settings, ("model", registry["model"], "a"), paths["model"])
    assert cache.load(settings, ("model", registry["model"], "a"), paths["model"]) is first
    cache.load(settings, ("module", registry["module"], "b"), paths["module"])
    assert len(cache) == 1  # the model was evicted: the next request loads it again
    assert cache.load(settings, ("model", registry["model"], "a"), paths["model"]) is not first
    # Another sha256 for the same id is another entry, never the old classifier.
    assert cache.load(settings, ("model", registry["model"], "c"), paths["model"]) is not first
