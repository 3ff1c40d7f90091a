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
    defaults = {k: v for k, v in TrainConfig().to_json().items() if k != "device"}
    assert {k: from_cli[k] for k in defaults} == defaults
    assert from_cli["tau"] == ModularizeConfig.tau


def test_mwt_submit_sends_the_budget_options_given(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = client.headers["Authorization"].removeprefix("Bearer ")
    monkeypatch.setattr(
        "app.cli_common._client",
        lambda url, key: MwtClient("http://testserver", token, transport=client._transport),
    )
    runner = CliRunner()

    def submit(*args: str) -> dict:
        res = runner.invoke(cli, ["submit", "--json", "--epochs", "1", *args])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)["params"]

    params = submit("--target-krr", "0.5", "--budget-rate", "10", "--val-fraction", "0.2",
                    "--guard-pp", "2.5")
    assert {k: params[k] for k in ("target_krr", "budget_rate", "val_fraction", "guard_pp")} == {
        "target_krr": 0.5, "budget_rate": 10.0, "val_fraction": 0.2, "guard_pp": 2.5}
    assert submit("--no-budget")["target_krr"] == 1.0  # a budget of every kernel: none
    for bad, message in ((["--target-krr", "2"], "target_krr"), (["--val-fraction", "0.9"], "val_fraction"),
                         (["--target-krr", "0.5", "--no-budget"], "not both")):
        res = runner.invoke(cli, ["submit", "--epochs", "1", *bad])
        assert res.exit_code != 0 and message in res.output, res.output
