"""The service CLI (`app/cli.py` + `app/client.py`) against the app, through TestClient's transport."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from typer.testing import CliRunner

from app.cli import app as cli
from app.client import MwtClient
from app.db.models import Model


@pytest.fixture
def use_app(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """`mwt` client commands talk to the test app."""
    token = client.headers["Authorization"].removeprefix("Bearer ")
    monkeypatch.setattr(
        "app.cli_common._client",
        lambda url, key: MwtClient("http://testserver", token, transport=client._transport),
    )
    return client


def test_download_model_works_and_skips_a_verified_file(
    use_app: TestClient, seeded: Model, tmp_path: Path
) -> None:
    runner = CliRunner()
    args = ["download", str(seeded.id), "--what", "model", "--out", str(tmp_path), "--no-extract"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert seeded.sha256 in first.output and "skipped" not in first.output
    (archive,) = [p for p in tmp_path.iterdir() if p.suffix == ".tar"]
    stamp = archive.stat().st_mtime_ns
    again = runner.invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "skipped" in again.output
    assert archive.stat().st_mtime_ns == stamp  # not rewritten
    # A corrupt file on disk is not "verified": it is downloaded again.
    archive.write_bytes(b"not the archive")
    fixed = runner.invoke(cli, args)
    assert fixed.exit_code == 0, fixed.output
    assert "skipped" not in fixed.output and archive.stat().st_size == seeded.size_bytes


def test_modules_sort_and_arch_reach_the_api(use_app: TestClient, seeded: Model) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["modules", "--json", "--sort=-id"])
    assert res.exit_code == 0, res.output
    ids = [m["id"] for m in json.loads(res.output)["items"]]
    assert len(ids) > 1 and ids == sorted(ids, reverse=True)
    res = runner.invoke(cli, ["modules", "--json", "--arch", seeded.arch])
    assert json.loads(res.output)["total"] == len(ids)
    res = runner.invoke(cli, ["modules", "--json", "--arch", "no-such-arch"])
    assert json.loads(res.output)["total"] == 0
    res = runner.invoke(cli, ["modules", "--sort", "size"])
    # The API names the field and the sort keys it takes (a schema pattern since the hardening).
    assert res.exit_code == 1 and "query.sort" in res.output and "krr|accuracy" in res.output


# ---------------------------------------------------------------------------- 80 columns

JOB_ID = "3f2a9c1e-7b4d-4e8f-9a61-0c5d2e8b7f14"
SHA = "9c1e7b4d4e8f9a610c5d2e8b7f143f2a9c1e7b4d4e8f9a610c5d2e8b7f143f2a"


class _FakeHub:
    """Canned pages with the widths that folded before: uuids, 6-7 digit numbers, long names."""

    def __enter__(self) -> _FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def jobs(self, **_: object) -> dict:
        job = {"id": JOB_ID, "kind": "train", "status": "succeeded", "dataset": "cifar10",
               "arch": "resnet18", "percent": 100.0, "attempts": 1, "model_id": 12345,
               "error": "worker lost: the process was killed by the OOM killer " * 2}
        return {"total": 1, "items": [job]}

    def models(self, **_: object) -> dict:
        m = {"id": 123, "name": "cifar10-resnet18-experiment", "version": 17, "dataset": "cifar10",
             "arch": "resnet18", "width": 0.125, "accuracy": 0.9721, "krr": 0.8463,
             "cohesion": 0.9973, "coupling": 0.0312, "params": 11_173_962}
        return {"total": 1, "items": [m]}

    def modules(self, **_: object) -> dict:
        m = {"id": 4567, "model_id": 123, "class_index": 8, "class_name": "airplane",
             "dataset": "cifar10", "krr": 0.9412, "accuracy": 0.973, "params": 793_000,
             "size_bytes": 3_181_234, "sha256": SHA}
        return {"total": 1, "items": [m]}

    def weights(self) -> list[dict]:
        return [{"name": "resnet50-imagenet-finetuned-digits", "tensors": 320, "params": 25_610_205,
                 "dtypes": ["float32", "int64"], "size_bytes": 94_400_000}]

    def compose(self, *_: object) -> dict:
        return {"id": 77, "sources": [{"model_id": 123}], "class_names": ["3", "5", "8"],
                "accuracy": 0.9908, "baseline_accuracy": 0.9912, "accuracy_loss": 0.0004,
                "krr": 0.8912, "params": 959_568, "flops": 12_345_678, "sha256": SHA}


TABLES = {
    "weights": (["weights"], ["resnet50-imagenet-finetuned-digits", "320", "25.6M", "94.4MB"]),
    "jobs": (["jobs"], [JOB_ID[:8], "12345"]),
    "models": (["models"], ["97.2%", "84.6%", "11.2M", "0.997", "123"]),
    "modules": (["modules"], ["4567", "793k", "97.3%", "94.1%"]),
    "compose": (["compose", "123", "3,5,8"], ["99.1%", "960k", "12.3M", "89.1%"]),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_tables_fit_80_columns_without_splitting_numbers(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    console = Console(width=80, record=True)
    monkeypatch.setattr("app.cli_common.out", console)
    monkeypatch.setattr("app.cli_common._client", lambda url, key: _FakeHub())
    args, whole = TABLES[name]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    text = console.export_text()
    lines = text.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, text
    for value in whole:  # each id and number on one line, in one piece
        assert any(value in line for line in lines), f"{value!r} split or missing:\n{text}"
    assert JOB_ID not in text and SHA[:12] not in text  # short ids, not the full uuid/digest


def test_serve_banner_keeps_the_database_url_whole() -> None:
    from app.cli_server import _banner
    from app.settings import Settings

    s = Settings(database_url="postgresql+psycopg://mwt:secret@db.internal.example:5432/mwt_hub_prod")
    console = Console(width=80, record=True)
    console.print(_banner(s), soft_wrap=True)
    lines = console.export_text().splitlines()
    assert any("db.internal.example:5432/mwt_hub_prod" in line for line in lines)
    assert all("secret" not in line for line in lines)


def test_a_lost_admin_key_is_replaced_with_mwt_key(
    client: TestClient, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/configuration.md, "Lost the admin key": `mwt key --scope admin` with the server's settings makes a
    working admin key, which then revokes the lost one."""
    lost = client.headers["Authorization"].removeprefix("Bearer ")
    monkeypatch.setenv("MWT_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("MWT_DATABASE_URL", settings.database_url)
    res = CliRunner().invoke(cli, ["key", "--name", "recovery", "--scope", "admin"])
    assert res.exit_code == 0, res.output
    found = re.search(r"key (\d+) \(admin\): (mwt_\S+)", res.output)
    assert found, res.output
    admin = {"Authorization": f"Bearer {found.group(2)}"}
    keys = client.get("/api/v1/keys", headers=admin)
    assert keys.status_code == 200, keys.text
    (old,) = [k for k in keys.json() if lost.startswith(k["prefix"]) and k["name"] != "recovery"]
    assert client.delete(f"/api/v1/keys/{old['id']}", headers=admin).status_code == 200
    gone = client.get("/api/v1/models", headers={"Authorization": f"Bearer {lost}"})
    assert gone.status_code == 401


def test_upload_weights_then_submit_init_from(use_app: TestClient, tmp_path: Path) -> None:
    import torchvision.models as tvm
    from safetensors.torch import save_file

    from mwt_core.config import TrainConfig

    path = tmp_path / "r18.safetensors"
    state = tvm.resnet18(weights=None, num_classes=10).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    runner = CliRunner()
    res = runner.invoke(cli, ["upload-weights", "r18", str(path)])
    assert res.exit_code == 0, res.output
    assert f"{len(state)} tensors" in res.output
    res = runner.invoke(cli, ["submit", "--json", "--arch", "tv_resnet18", "--width", "1",
                              "--init-from", "r18"])
    assert res.exit_code == 0, res.output
    params = json.loads(res.output)["params"]
    # the same defaults as a run from scratch
    assert params["init_from"] == "r18" and params["beta"] == TrainConfig.beta
    res = runner.invoke(cli, ["submit", "--arch", "simcnn", "--init-from", "r18"])
    assert res.exit_code != 0 and "is not a weight of simcnn" in res.output
    res = runner.invoke(cli, ["weights"])
    assert res.exit_code == 0 and "r18" in res.output and str(len(state)) in res.output
    res = runner.invoke(cli, ["submit", "--init-from-model", "999"])
    assert res.exit_code != 0 and "no model 999 in the registry" in res.output
