"""The export routes (models, modules, compositions): what they answer is in the OpenAPI document."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.db.models import Model, ModelStatus
from app.settings import Settings
from tests.support.registry import seed_fake_model

EXPORTS = (
    "/api/v1/models/{model_id}/export",
    "/api/v1/modules/{module_id}/export",
    "/api/v1/compositions/{composition_id}/export",
    "/api/v1/compositions/{composition_id}/torchscript",
)


def test_every_code_an_export_answers_is_documented(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    doc = client.get("/openapi.json").json()
    err = {"$ref": "#/components/schemas/ErrorOut"}
    for path in EXPORTS:
        responses = doc["paths"][path]["get"]["responses"]
        assert {"200", "304", "404", "409", "410", "503"} <= set(responses), (path, sorted(responses))
        for code in ("404", "409", "410", "503"):
            assert responses[code]["content"]["application/json"]["schema"] == err, (path, code)
        assert "application/octet-stream" in responses["200"]["content"], path

    # The codes the routes do answer (a missing row, a model still training, an artifact the
    # exporter cannot load) are among the documented ones.
    with app.state.sessionmaker() as s:
        fake = seed_fake_model(s, settings)  # its artifact is stand-in bytes: not loadable
        pending = seed_fake_model(s, settings, name="training")
        pending_row = s.get(Model, pending.id)
        assert pending_row is not None
        pending_row.status, pending_row.artifact_path, pending_row.sha256 = (
            ModelStatus.pending.value, None, None,
        )
        s.commit()
        fake_id, pending_id, module_id = fake.id, pending.id, fake.modules[0].id
    answered = {
        "/api/v1/models/{model_id}/export": [
            client.get(f"/api/v1/models/{i}/export") for i in (fake_id, pending_id, 10**6)
        ],
        "/api/v1/modules/{module_id}/export": [
            client.get(f"/api/v1/modules/{i}/export") for i in (module_id, 10**6)
        ],
        "/api/v1/compositions/{composition_id}/export": [
            client.get("/api/v1/compositions/999/export")
        ],
    }
    seen = set()
    for path, replies in answered.items():
        documented = doc["paths"][path]["get"]["responses"]
        for r in replies:
            assert str(r.status_code) in documented, (path, r.status_code, r.text)
            seen.add(r.status_code)
    assert {404, 409, 410} <= seen
