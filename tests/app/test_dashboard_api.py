"""The dashboard's server side: offline docs, the static dashboard, and its read-only views."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app import storage
from app.settings import Settings
from tests.support.registry import seed_trained_model


def test_docs_and_redoc_load_nothing_from_outside(client: TestClient) -> None:
    for path in ("/docs", "/redoc"):
        html = client.get(path).text
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
        assert urls, html
        outside = [u for u in urls if re.match(r"(https?:)?//", u)]
        assert not outside, f"{path} loads {outside}"
        for u in urls:
            if u.startswith("/_docs-assets/"):
                r = client.get(u)
                assert r.status_code == 200 and len(r.content) > 1000, u
    assert "/_docs-assets/swagger-ui-bundle.js" in client.get("/docs").text


def test_dashboard_is_served_at_root(client: TestClient) -> None:
    html = client.get("/").text
    assert '<script type="module" src="/ui/js/main.js">' in html
    for asset in re.findall(r'(?:src|href)="(/ui/[^"]+)"', html) + ["/ui/js/api.js", "/ui/js/plots.js"]:
        assert client.get(asset).status_code == 200, asset
    for js in ("main", "api", "plots"):
        text = client.get(f"/ui/js/{js}.js").text
        # the only URL is the SVG namespace, which is a name, never fetched
        assert set(re.findall(r"https?://[^\s\"'`]+", text)) <= {"http://www.w3.org/2000/svg"}, js


def test_whoami_reports_the_key_scopes(
    client: TestClient, make_key: Callable[..., str]
) -> None:
    read = make_key("read")
    r = client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {read}"})
    assert r.status_code == 200 and r.json()["scopes"] == ["read"]
    assert client.get("/api/v1/whoami").json()["scopes"] == ["admin", "read", "write"]
    assert client.get("/api/v1/whoami", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_insights_are_the_manifest_modularization(
    app: FastAPI, client: TestClient, settings: Settings
) -> None:
    from mwt_core.artifacts import read_manifest

    with app.state.sessionmaker() as s:
        model = seed_trained_model(s, settings)
        model_id, path = model.id, model.artifact_path
    assert path is not None
    mod = read_manifest(storage.resolve(settings.artifacts, path))["modularization"]
    out = client.get(f"/api/v1/models/{model_id}/insights").json()
    assert out["layer_kernels"] == mod["kernels"]
    assert out["kept"] == [[len(layer) for layer in cls] for cls in mod["class_masks"]]
    k = len(mod["class_masks"])
    for a in range(k):
        for b in range(k):
            sa = {(li, i) for li, layer in enumerate(mod["class_masks"][a]) for i in layer}
            sb = {(li, i) for li, layer in enumerate(mod["class_masks"][b]) for i in layer}
            assert out["shared"][a][b] == len(sa & sb)
            assert abs(out["coupling"][a][b] - len(sa & sb) / len(sa | sb)) < 1e-12
    assert client.get("/api/v1/models/999/insights").status_code == 404


def test_insights_of_a_model_without_artifact_is_a_conflict(
    client: TestClient, seeded: object
) -> None:
    from app.db.models import Model

    assert isinstance(seeded, Model)
    r = client.get(f"/api/v1/models/{seeded.id}/insights")
    assert r.status_code == 409 and "manifest" in r.json()["detail"]


def test_dataset_samples_are_pngs_of_each_class(client: TestClient) -> None:
    from PIL import Image

    out = client.get("/api/v1/datasets/digits/samples", params={"per_class": 2}).json()
    assert out["class_names"] == [str(i) for i in range(10)]
    assert [len(x) for x in out["images"]] == [2] * 10
    png = base64.b64decode(out["images"][3][0].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (8, 8)
    r = client.get("/api/v1/datasets/nope/samples")
    assert r.status_code == 404 and "unknown dataset" in r.json()["detail"]
    assert client.get("/api/v1/datasets/digits/samples", params={"per_class": 99}).status_code == 422
