"""The embedded flow (README, docs/walkthrough.md) against a real `mwt serve` process (SQLite,
in-process executor, no Redis): train on digits -> watch progress (SSE) -> list modules ->
download one (sha256 verified, resumed) -> compose {3,5,8} -> its accuracy; plus fine-tuning as
a job, cancellation and metrics."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.client import MwtClient
from mwt_core.config import TrainConfig
from tests.support.processes import ServiceProcess, clean_env, wait_http
from tests.support.services import free_port

# A real `mwt serve` process and jobs trained through it.
pytestmark = pytest.mark.slow

TINY = {
    "dataset": "digits",
    "arch": "simcnn",
    "width": 0.125,
    "epochs": 2,
    "batch_size": 128,
    "mask_lr": 0.1,
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MwtClient, ServiceProcess, Path]]:
    root = tmp_path_factory.mktemp("embedded")
    port = free_port()
    key_file = root / "admin.key"
    env = clean_env(
        {"MWT_DATA_DIR": str(root / "data"), "MWT_DEVICE": "cpu", "MWT_SSE_POLL_S": "0.2"}
    )
    proc = ServiceProcess(
        "serve", ["mwt", "serve", "--port", str(port), "--key-file", str(key_file)], env, root
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=proc)
        client = MwtClient(f"http://127.0.0.1:{port}", key_file.read_text().strip(), timeout=60)
        yield client, proc, root
        client.close()
    finally:
        proc.stop()


def test_full_session(stack: tuple[MwtClient, ServiceProcess, Path]) -> None:
    hub, proc, root = stack
    assert "Admin API key (shown once" in proc.log()
    assert hub.ready()["status"] == "ready"

    job = hub.submit_job(idempotency_key="readme-1", **TINY)
    assert hub.submit_job(idempotency_key="readme-1", **TINY)["id"] == job["id"]  # retried submit
    seen: list[dict[str, Any]] = []
    final = hub.wait(job["id"], timeout=600, on_update=seen.append)
    assert final["status"] == "succeeded", (final["error"], proc.log())
    epochs_seen = {
        e["progress"]["epoch"] for e in seen if e.get("progress") and e["progress"].get("epoch")
    }
    assert epochs_seen & {1, 2}, "no live progress was streamed"
    assert final["percent"] == 100.0 and final["attempts"] == 1
    model_id = final["model_id"]
    model = hub.model(model_id)
    assert model["status"] == "ready" and len(model["modules"]) == 10
    # the given mask rate kept; gamma not given: TrainConfig's, as on any data set
    assert model["config"]["mask_lr"] == TINY["mask_lr"]
    assert model["config"]["gamma"] == TrainConfig.gamma
    for metric in ("accuracy", "krr", "cohesion", "coupling", "params", "flops", "train_seconds"):
        assert model[metric] is not None, metric

    mods = hub.modules(dataset="digits", model_id=model_id, class_name="3")["items"]
    assert len(mods) == 1
    mod = mods[0]
    dl = hub.download_module(mod["id"], root / "dl")
    assert dl.sha256 == mod["sha256"]
    assert {p.name for p in dl.files} == {"manifest.json", "weights.safetensors"}
    from mwt_core.artifacts import load_artifact

    net, manifest = load_artifact(dl.files[0].parent)
    assert manifest["classes"] == [3] and manifest["kind"] == "module"

    # Resume: a partial download continues with a Range request and still verifies.
    part_dir = root / "resume"
    part_dir.mkdir()
    (part_dir / f"{dl.path.name}.part").write_bytes(dl.path.read_bytes()[:5000])
    again = hub.download_module(mod["id"], part_dir, extract=False)
    assert again.resumed_from == 5000 and again.sha256 == mod["sha256"]

    # Composition latency is measured by bench/compose.py, not asserted here (a loaded CI box
    # makes wall-clock limits flaky).
    comp = hub.compose(model_id, [3, 5, 8])
    assert comp["classes"] == [3, 5, 8] and comp["class_names"] == ["3", "5", "8"]
    assert 0.0 <= comp["accuracy"] <= 1.0 and comp["baseline_accuracy"] is not None
    assert comp["krr"] is not None and comp["params"] < model["params"]
    assert hub.compose(model_id, ["3", "5", "8"])["id"] == comp["id"]  # same composition, by names
    cdl = hub.download_composition(comp["id"], root / "comp")
    assert hashlib.sha256(cdl.path.read_bytes()).hexdigest() == comp["sha256"]
    cnet, cman = load_artifact(cdl.files[0].parent)
    assert cman["classes"] == [3, 5, 8]

    # A self-contained TorchScript export: raw [0, 1] images in, one logit per composed class out.
    import torch

    r = hub.request("GET", f"/api/v1/compositions/{comp['id']}/torchscript")
    assert hashlib.sha256(r.content).hexdigest() == r.headers["etag"].strip('"')
    ts = root / "comp.torchscript.pt"
    ts.write_bytes(r.content)
    scripted = torch.jit.load(str(ts))
    from mwt_core.data.datasets import load_dataset
    from mwt_core.models import architecture_info

    data = load_dataset("digits", min_input_size=architecture_info("simcnn").min_input_size)
    sel = (data.test_y == 3) | (data.test_y == 5) | (data.test_y == 8)
    x = data.test_x[sel].float() / 255.0
    with torch.no_grad():
        logits = scripted(x)
    assert logits.shape == (int(sel.sum()), 3)
    lookup = {3: 0, 5: 1, 8: 2}
    y = torch.tensor([lookup[int(v)] for v in data.test_y[sel]])
    ts_acc = float((logits.argmax(1) == y).float().mean())
    assert abs(ts_acc - comp["accuracy"]) < 1e-6, (ts_acc, comp["accuracy"])

    _check_client_cli(hub, model_id, job["id"])

    ft = hub.compose(model_id, [3, 5, 8], finetune={"epochs": 1})
    ft_job = hub.wait(ft["id"], timeout=300)
    assert ft_job["status"] == "succeeded", ft_job["error"]
    tuned = hub.composition(ft_job["composition_id"])
    assert tuned["finetuned"] and tuned["accuracy"] is not None

    _check_cross_model(hub, model_id)


def _check_cross_model(hub: MwtClient, model_id: int) -> None:
    """A second model, then one classifier from classes of both, through the terminal client."""
    import json

    from typer.testing import CliRunner

    from app.cli import app as cli

    second = hub.wait(hub.submit_job(**{**TINY, "seed": 1})["id"], timeout=600)
    assert second["status"] == "succeeded", second["error"]
    key = hub.http.headers["authorization"].removeprefix("Bearer ")
    auth = ["--url", str(hub.base_url), "--key", key]
    runner = CliRunner()
    args = ["compose", str(model_id), "3,5", "--with", f"{second['model_id']}:8", *auth]
    res = runner.invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    comp = json.loads(res.output)
    assert [(s["model_id"], s["classes"]) for s in comp["sources"]] == [
        (model_id, [3, 5]),
        (second["model_id"], [8]),
    ]
    from mwt_core.compose_options import DEFAULT_COMBINE, LABELLED_METHODS

    # The default combine draws 20 labelled images per class only if it is a labelled method.
    labelled = DEFAULT_COMBINE in LABELLED_METHODS
    assert 0.0 <= comp["accuracy"] <= 1.0
    assert comp["metrics"]["calibration_samples"] == (60 if labelled else 0)
    res = runner.invoke(cli, args)  # the same composition again, as a table
    assert res.exit_code == 0 and f"model(s) {model_id}, {second['model_id']}" in res.output
    res = runner.invoke(cli, ["compose", str(model_id), "3", "--with", "x8", *auth])
    assert res.exit_code != 0 and "MODEL_ID:CLASSES" in res.output


def _check_client_cli(hub: MwtClient, model_id: int, job_id: str) -> None:
    """The terminal client lists what the API holds, as tables and as JSON."""
    import json

    from typer.testing import CliRunner

    from app.cli import app as cli

    key = hub.http.headers["authorization"].removeprefix("Bearer ")
    auth = ["--url", str(hub.base_url), "--key", key]
    runner = CliRunner()
    res = runner.invoke(cli, ["modules", *auth, "--model-id", str(model_id), "--json"])
    assert res.exit_code == 0, res.output
    page = json.loads(res.output)
    assert page["total"] == 10 and {m["class_name"] for m in page["items"]} == set("0123456789")
    res = runner.invoke(cli, ["modules", *auth, "--model-id", str(model_id), "--class-name", "3"])
    # At 80 columns the table drops the dataset column first; the module's row must remain.
    row = next(m for m in page["items"] if m["class_name"] == "3")
    assert res.exit_code == 0 and "modules (1)" in res.output, res.output
    assert row["sha256"][:8] in res.output, res.output
    res = runner.invoke(cli, ["models", *auth])
    assert res.exit_code == 0 and "models (1)" in res.output, res.output
    res = runner.invoke(cli, ["jobs", *auth, "--status", "succeeded", "--json"])
    assert res.exit_code == 0, res.output
    assert job_id in {j["id"] for j in json.loads(res.output)["items"]}
    res = runner.invoke(
        cli,
        [
            "submit",
            *auth,
            "--standard",
            "--width",
            "0.125",
            "--epochs",
            "1",
            "--mask-lr",
            "0.1",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    submitted = json.loads(res.output)
    assert submitted["params"]["mask_lr"] == 0.1
    assert submitted["params"]["gamma"] == TrainConfig.gamma
    assert hub.wait(submitted["id"], timeout=300)["status"] == "succeeded"
    res = runner.invoke(cli, ["models", "--url", auth[1], "--key", "wrong"])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_cancel_a_running_job(stack: tuple[MwtClient, ServiceProcess, Path]) -> None:
    hub, proc, _ = stack
    job = hub.submit_job(**{**TINY, "epochs": 50, "seed": 7})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        cur = hub.job(job["id"])
        if cur["status"] == "running" and (cur.get("progress") or {}).get("phase") == "training":
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"job never started training: {hub.job(job['id'])}")
    assert hub.cancel(job["id"])["cancel_requested"] is True
    final = hub.wait(job["id"], timeout=60)
    assert final["status"] == "cancelled" and final["error"] == "cancelled by user"
    # The model says why it was never made, and its version number is free for the next run.
    model = hub.model(final["model_id"])
    assert model["status"] == "cancelled" and model["version"] is None, model
    assert job["queue"] == "embedded"  # no broker: the in-process executor ran it
    text = hub.http.get("/metrics").text
    assert 'mwt_jobs{state="cancelled"} 1.0' in text and 'mwt_jobs{state="succeeded"} 4.0' in text


def test_torchvision_networks_train_into_modules_that_download_and_compose(
    stack: tuple[MwtClient, ServiceProcess, Path],
) -> None:
    """Issue 11's path through the API: catalogued torchvision networks (converted to their
    masked form by torch.fx) train on digits as jobs, are cut into per-class modules, and the
    modules download (sha256 verified) and compose across the two models. One epoch: this
    checks the path, not what the networks learn (bench/archs.py measures that)."""
    from mwt_core.artifacts import load_artifact

    hub, proc, root = stack
    archs = ("tv_mobilenet_v2", "tv_efficientnet_b0")
    jobs = {a: hub.submit_job(dataset="digits", arch=a, width=1.0, epochs=1, batch_size=64)
            for a in archs}
    model_ids = {}
    for arch, job in jobs.items():
        final = hub.wait(job["id"], timeout=900)
        assert final["status"] == "succeeded", (arch, final["error"], proc.log()[-2000:])
        model = hub.model(final["model_id"])
        assert model["arch"] == arch and len(model["modules"]) == 10
        model_ids[arch] = model["id"]
        mods = sorted(hub.modules(model_id=model["id"])["items"], key=lambda m: m["class_index"])
        assert [m["class_index"] for m in mods] == list(range(10))
        # Each module is cut from the network: fewer parameters than the whole model.
        assert all(0 < m["params"] < model["params"] for m in mods)
        dl = hub.download_module(mods[3]["id"], root / arch)
        assert dl.sha256 == mods[3]["sha256"]
        net, manifest = load_artifact(dl.files[0].parent)
        assert manifest["classes"] == [3] and manifest["config"]["arch"] == arch
    comp = hub.compose_across([(model_ids["tv_mobilenet_v2"], [0, 1, 2, 3, 4]),
                               (model_ids["tv_efficientnet_b0"], [5, 6, 7, 8, 9])])
    assert comp["status"] == "ready" and comp["class_names"] == [str(c) for c in range(10)]
    assert comp["accuracy"] is not None and comp["metrics"]["test_samples"] == 360


def test_concurrent_heavy_requests_never_break_the_server(
    stack: tuple[MwtClient, ServiceProcess, Path],
) -> None:
    """32 exports, predicts and compositions at once: each is served or turned away (503 with
    Retry-After), none fails, and the server answers every kind correctly afterwards."""
    import threading

    import httpx

    hub, proc, _ = stack
    final = hub.wait(hub.submit_job(**{**TINY, "epochs": 1})["id"], timeout=600)
    assert final["status"] == "succeeded", (final["error"], proc.log())
    model = hub.model(final["model_id"])
    modules = sorted(hub.modules(model_id=model["id"])["items"], key=lambda m: m["class_index"])
    spec = model["input_spec"]
    image = [[[0.5] * spec["size"]] * spec["size"]] * spec["channels"]
    comp = hub.compose(model["id"], [0, 1])
    read = hub.request("POST", "/api/v1/keys", json={"name": "reader", "scopes": ["read"]}).json()
    base = hub.base_url
    write_token = str(hub.http.headers["Authorization"]).removeprefix("Bearer ")

    def request(kind: str, i: int) -> tuple[str, str, httpx.Response]:
        mod = modules[i % len(modules)]["id"]
        if kind == "compose":
            return "POST", "/api/v1/compositions", {"json": {"model_id": model["id"],
                                                             "classes": [i % 10, (i + 3) % 10]}}
        if kind == "predict":
            return "POST", f"/api/v1/modules/{mod}/predict", {"json": [image]}
        fmt = "onnx" if i % 2 else "torchscript"
        if kind == "comp_export":
            return "GET", f"/api/v1/compositions/{comp['id']}/export?format={fmt}", {}
        return "GET", f"/api/v1/modules/{mod}/export?format={fmt}", {}

    kinds = ["export"] * 12 + ["predict"] * 12 + ["comp_export"] * 4 + ["compose"] * 4
    answers: list[tuple[str, int, str]] = []
    start = threading.Barrier(len(kinds))

    def send(kind: str, i: int) -> None:
        method, path, kw = request(kind, i)
        token = write_token if kind == "compose" else read["token"]
        with httpx.Client(base_url=base, timeout=300,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            start.wait()
            r = c.request(method, path, **kw)
        answers.append((kind, r.status_code, r.headers.get("retry-after", "")))

    threads = [threading.Thread(target=send, args=(k, i)) for i, k in enumerate(kinds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == len(kinds)
    assert {code for _, code, _ in answers} <= {200, 201, 202, 429, 503}, (answers, proc.log())
    assert all(after for _, code, after in answers if code in (429, 503)), answers
    assert sum(code < 300 for _, code, _ in answers) >= 2, answers

    # Afterwards every kind answers, and answers right.
    predicted = hub.request("POST", f"/api/v1/modules/{modules[3]['id']}/predict", json=[image])
    assert predicted.status_code == 200
    assert predicted.json()["class_names"] == [modules[3]["class_name"]]
    for fmt in ("torchscript", "onnx"):
        r = hub.request("GET", f"/api/v1/modules/{modules[5]['id']}/export?format={fmt}")
        assert hashlib.sha256(r.content).hexdigest() == r.headers["etag"].strip('"')
    again = hub.compose(model["id"], [2, 7])
    assert again["classes"] == [2, 7]
