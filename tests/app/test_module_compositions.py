"""Compositions of stored per-class modules (`modules`), rebuilt by a client from downloads.

The registry composes its stored modules as parts; a client downloads the same modules over
the API and runs `mwt compose-local` on them in a subprocess (its own process and thread
count). Both classifiers must agree to 1e-5 on digits' test split.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.client import MwtClient
from app.db.models import Model, ModelStatus
from app.schemas.compositions import MAX_MODULES
from app.settings import Settings
from mwt_core.compose import NormalizedInput
from mwt_core.compose_options import AUTO_COMBINE, DEFAULT_COMBINE, ZERO_LABEL_METHODS
from tests.support.processes import REPO_ROOT
from tests.support.registry import seed_fake_model, seed_trained_model

TOLERANCE = 1e-5


@pytest.fixture
def module_models(app: FastAPI, settings: Settings) -> tuple[Model, Model]:
    with app.state.sessionmaker() as s:
        # No test here reads a module's latency, and timing it is most of a seeding's time.
        a = seed_trained_model(s, settings, seed=0, with_modules=True, time_modules=False)
        b = seed_trained_model(s, settings, seed=1, with_modules=True, time_modules=False)
        return a, b


def _module_ids(client: TestClient, model: Model) -> dict[int, int]:
    """Class index -> module id of a model's stored modules."""
    items = client.get("/api/v1/modules", params={"model_id": model.id, "limit": 100}).json()
    return {m["class_index"]: m["id"] for m in items["items"]}


def _download(hub: MwtClient, module_id: int, where: Path) -> Path:
    """The unpacked module directory, as `mwt download` leaves it (sha256 verified)."""
    files = hub.download_module(module_id, where).files
    return next(f.parent for f in files if f.name == "manifest.json")


def _load_tar(content: bytes, where: Path) -> tuple[torch.nn.Module, dict]:
    from mwt_core.artifacts import load_artifact

    with tarfile.open(fileobj=io.BytesIO(content)) as t:
        t.extractall(where, filter="data")
    return load_artifact(next(p.parent for p in where.rglob("manifest.json")))


def _compose_local(runs: list[tuple[list[Path], Path, str]]) -> list[dict]:
    """`mwt compose-local DIR... --out OUT --combine METHOD --json` for each run, in one client
    process of its own (one interpreter start for all; one thread: this machine is shared)."""
    argv = [["compose-local", *map(str, dirs), "--out", str(out), "--combine", combine,
             "--device", "cpu", "--json"] for dirs, out, combine in runs]
    code = ("import json, sys\n"
            "from app.cli import app\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    app(args, prog_name='mwt', standalone_mode=False)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    decoder, text, out = json.JSONDecoder(), done.stdout.strip(), []
    while text:  # --json prints one object per run
        obj, end = decoder.raw_decode(text)
        out.append(obj)
        text = text[end:].strip()
    assert len(out) == len(runs), done.stdout
    return out


@pytest.mark.slow  # four compositions on each side and a client process: about a minute
@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)  # the registry is not the point
def test_client_rebuilds_the_registrys_composition_of_modules(
    client: TestClient, module_models: tuple[Model, Model], tmp_path: Path
) -> None:
    from mwt_core.artifacts import load_artifact
    from mwt_core.data.datasets import load_dataset

    a, b = module_models
    ids_a, ids_b = _module_ids(client, a), _module_ids(client, b)
    assert sorted(ids_a) == list(range(10)) and sorted(ids_b) == list(range(10))
    test_x = load_dataset("digits", min_input_size=32).test_x.float() / 255.0
    hub = MwtClient("http://testserver", client.headers["Authorization"].split()[1],
                    transport=client._transport)  # the real client, over the app's HTTP
    cases = {
        "two models": [ids_a[3], ids_b[8], ids_a[5], ids_b[0]],  # output order, interleaved
        "one model": [ids_a[7], ids_a[1], ids_a[2]],
    }
    runs, served = [], []
    for name, ids in cases.items():
        dirs = [_download(hub, i, tmp_path / "dl") for i in ids]
        for combine in (DEFAULT_COMBINE, "raw"):
            r = client.post("/api/v1/compositions", json={"modules": ids, "combine": combine})
            assert r.status_code == 201, r.json()
            comp = r.json()
            assert hub.compose_modules(ids, combine=combine)["id"] == comp["id"]  # found again
            m = comp["metrics"]
            # auto names the method it chose; the local composition must choose the same
            assert m["combine"] == combine or (combine == AUTO_COMBINE
                                               and m["combine"] in ZERO_LABEL_METHODS)
            assert [s["module_id"] for s in m["sources"]] == ids
            assert comp["class_names"] == [s["class_names"][0] for s in comp["sources"]]
            assert comp["baseline_accuracy"] is not None  # the registry has the whole models
            again = client.post("/api/v1/compositions", json={"modules": ids, "combine": combine})
            assert again.status_code == 200 and again.json()["id"] == comp["id"]
            net, manifest = _load_tar(
                client.get(f"/api/v1/compositions/{comp['id']}/download").content,
                tmp_path / f"server-{comp['id']}",
            )
            assert [s["module_id"] for s in manifest["sources"]] == ids
            served.append((name, combine, comp, net, dirs))
            runs.append((dirs, tmp_path / f"local-{comp['id']}", combine))
    for (name, combine, comp, net, dirs), local in zip(served, _compose_local(runs), strict=True):
        rebuilt, _ = load_artifact(local["out"])
        assert rebuilt.labels == net.labels == comp["class_names"]
        with torch.no_grad():
            diff = float((net(test_x) - rebuilt(test_x)).abs().max())
        print(f"{name}, combine={combine}: max |server - client| = {diff:.3g} "
              f"over {len(test_x)} test images")
        assert diff <= TOLERANCE, (name, combine, diff)
        assert local["accuracy"] == pytest.approx(comp["accuracy"])
        assert local["calibration_samples"] == comp["metrics"]["calibration_samples"]
        assert local["baseline_accuracy"] is None  # a client has no whole models
        if combine == "raw":  # raw logits: the stored modules side by side, nothing fitted
            with torch.no_grad():
                want = torch.cat([NormalizedInput(load_artifact(d)[0], p.spec)(test_x)
                                  for d, p in zip(dirs, net.parts, strict=True)], 1)
                assert torch.allclose(net(test_x), want, atol=1e-6)
    # A composition of modules exports like every other.
    assert client.get(f"/api/v1/compositions/{served[0][2]['id']}/export").status_code == 200


@pytest.mark.slow
def test_bad_module_lists_are_refused_with_what_to_fix(
    client: TestClient, app: FastAPI, settings: Settings, module_models: tuple[Model, Model]
) -> None:
    a, _ = module_models
    ids = _module_ids(client, a)
    with app.state.sessionmaker() as s:
        pending = seed_fake_model(s, settings, name="pending", status=ModelStatus.pending.value)
        fake = seed_fake_model(s, settings, name="unloadable")  # ready, weights not a network
        small = seed_trained_model(s, settings, arch="resnet18", name="digits-8px",
                                   with_modules=True, time_modules=False)
    pending_module = _module_ids_any(client, app, pending)
    cases = [
        ({"modules": []}, 422, "modules"),
        ({"modules": [ids[1], ids[2], ids[1]]}, 422, f"module {ids[1]} is listed twice"),
        ({"modules": [ids[1], 2_000_000]}, 404, "module 2000000 not found"),
        ({"modules": [ids[1]], "sources": [{"model_id": a.id, "classes": [1]}]}, 422, "not both"),
        ({"modules": [ids[1]], "model_id": a.id, "classes": [1]}, 422, "not both"),
        ({"modules": [ids[1]], "finetune": {"epochs": 1}}, 422, "calibrated instead"),
        ({"modules": list(range(1, MAX_MODULES + 2))}, 422, "modules"),
        ({"modules": [ids[1], ids[2]], "combine": "head", "calibration_per_class": 0}, 422,
         "calibration_per_class > 0"),
        ({"modules": [ids[1], ids[2]], "combine": "vote"}, 422, "combine"),
        ({"modules": [ids[1], pending_module]}, 409, "not ready"),
        ({"modules": [ids[1], _module_ids(client, fake)[0]]}, 409, "cannot be loaded"),
        ({"modules": [ids[1], _module_ids(client, small)[2]]}, 422, "different input shapes"),
    ]
    for body, code, message in cases:
        r = client.post("/api/v1/compositions", json=body)
        assert r.status_code == code, (body, r.json())
        assert message in str(r.json()["detail"]), (body, r.json())
    assert client.get("/api/v1/compositions").json()["total"] == 0


def _module_ids_any(client: TestClient, app: FastAPI, model: Model) -> int:
    """A module id of a model that GET /modules does not list (it lists ready models only)."""
    from sqlalchemy import select

    from app.db.models import Module

    with app.state.sessionmaker() as s:
        return int(s.scalars(select(Module.id).where(Module.model_id == model.id)).first())


@pytest.mark.slow
def test_compose_local_refuses_what_it_cannot_compose(
    client: TestClient, module_models: tuple[Model, Model], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from mwt_core.cli import app as core_cli

    a, _ = module_models
    hub = MwtClient("http://testserver", client.headers["Authorization"].split()[1],
                    transport=client._transport)
    d = _download(hub, _module_ids(client, a)[4], tmp_path / "dl")
    runner = CliRunner()
    twice = runner.invoke(core_cli, ["compose", str(d), str(d), "--out", str(tmp_path / "c")])
    assert twice.exit_code == 1 and "the same module is given twice" in twice.output
    empty = tmp_path / "not-a-module"
    empty.mkdir()
    bad = runner.invoke(core_cli, ["compose", str(empty), "--out", str(tmp_path / "c")])
    assert bad.exit_code == 1 and "MODEL_DIR:CLASSES" in bad.output and "Traceback" not in bad.output
