"""`POST /jobs {}` and `mwt submit` with no options train the same thing: mwt_core's defaults
(``TrainConfig``'s field defaults, whatever the data set)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import app as cli
from app.client import MwtClient
from mwt_core.config import ModularizeConfig, TrainConfig


def test_empty_submit_and_mwt_submit_train_the_core_defaults(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = client.post("/api/v1/jobs", json={})
    assert empty.status_code == 202, empty.text
    token = client.headers["Authorization"].removeprefix("Bearer ")
    monkeypatch.setattr(
        "app.cli_common._client",
        lambda url, key: MwtClient("http://testserver", token, transport=client._transport),
    )
    res = CliRunner().invoke(cli, ["submit", "--json"])
    assert res.exit_code == 0, res.output
    from_cli = json.loads(res.output)["params"]
    assert from_cli == empty.json()["params"]
    # TrainConfig's defaults (a width not given: the architecture's)
    defaults = {k: v for k, v in TrainConfig().to_json().items()
                if k not in ("device", "target_krr", "budget_rate", "val_fraction", "guard_pp")}
    assert {k: from_cli[k] for k in defaults} == defaults
    assert from_cli["tau"] == ModularizeConfig.tau
