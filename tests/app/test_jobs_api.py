from __future__ import annotations

import datetime as dt

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db.models import Job
from mwt_core.config import TrainConfig

TINY = {"dataset": "digits", "arch": "simcnn", "width": 0.125, "epochs": 2}


def test_submit_returns_202_with_id_and_location(client: TestClient) -> None:
    r = client.post("/api/v1/jobs", json=TINY)
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempts"] == 0 and job["max_attempts"] == 3
    assert job["params"]["epochs"] == 2 and job["params"]["tau"] == 0.9
    # No broker: the in-process executor runs it, so no Celery queue name is reported.
    assert job["queue"] == "embedded"
    assert client.get(f"/api/v1/jobs/{job['id']}").json()["id"] == job["id"]
    # TrainConfig's loss settings and kernel budget on every data set; what is given is stored
    # as given.
    defaults = {k: v for k, v in TrainConfig().to_json().items() if k not in ("device", "width")}
    p = job["params"]
    assert {k: p[k] for k in defaults if k not in TINY} == {k: v for k, v in defaults.items() if k not in TINY}
    synthetic = client.post("/api/v1/jobs", json={**TINY, "dataset": "synthetic"}).json()["params"]
    assert {k: synthetic[k] for k in defaults if k != "epochs"} == {k: p[k] for k in defaults if k != "epochs"}
    given = client.post("/api/v1/jobs", json={**TINY, "mask_lr": None, "gamma": 0.0}).json()
    assert given["params"]["mask_lr"] is None and given["params"]["gamma"] == 0.0
    assert given["params"]["beta"] == TrainConfig.beta


def test_bad_input_says_what_to_fix(client: TestClient) -> None:
    cases = [
        ({**TINY, "arch": "alexnet"}, "unknown architecture 'alexnet'; choose one of"),
        ({**TINY, "dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({**TINY, "dataset": "cifar10"}, "files are not in"),
        ({**TINY, "epochs": 0}, "epochs: Input should be greater than or equal to 1"),
        ({**TINY, "width": -1}, "width: Input should be greater than 0"),
        ({**TINY, "tau": 1.5}, "tau: Input should be less than or equal to 1"),
        ({**TINY, "mask_lr": 0}, "mask_lr: Input should be greater than 0"),
        ({**TINY, "gamma": -1}, "gamma: Input should be greater than or equal to 0"),
        ({**TINY, "optimizer": "adam"}, "optimizer: Extra inputs are not permitted"),
        ({**TINY, "name": "bad name!"}, "name: String should match pattern"),
        # the kernel budget is a share of kernels in (0, 1] (1: off), bounded as TrainConfig checks
        ({**TINY, "target_krr": 0}, "target_krr: Input should be greater than 0"),
        ({**TINY, "target_krr": -1}, "target_krr: Input should be greater than 0"),
        ({**TINY, "target_krr": 2}, "target_krr: Input should be less than or equal to 1"),
        ({**TINY, "val_fraction": 0.9}, "val_fraction: Input should be less than or equal to 0.5"),
        ({**TINY, "guard_pp": -1}, "guard_pp: Input should be greater than or equal to 0"),
        ({**TINY, "budget_rate": -1}, "budget_rate: Input should be greater than or equal to 0"),
    ]
    for body, message in cases:
        r = client.post("/api/v1/jobs", json=body)
        assert r.status_code == 422, body
        assert message in r.json()["detail"], r.json()
    r = client.post(
        "/api/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422
    r = client.post(
        "/api/v1/jobs", content=b"x" * (300 * 1024), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413


def test_budget_off_and_budget_settings_are_stored_as_given(client: TestClient) -> None:
    for value in (None, 1, 0.5):  # null and 1: no budget; anything in (0, 1) is one
        r = client.post("/api/v1/jobs", json={**TINY, "target_krr": value})
        assert r.status_code == 202, r.text
        assert r.json()["params"]["target_krr"] == value
    given = {"budget_rate": 10.0, "val_fraction": 0.2, "guard_pp": 2.5}
    r = client.post("/api/v1/jobs", json={**TINY, **given})
    assert r.status_code == 202, r.text
    assert {k: r.json()["params"][k] for k in given} == given
    # the schema publishes TrainConfig's defaults and bounds (the dashboard's form reads them)
    props = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]
    assert props["target_krr"]["default"] == TrainConfig.target_krr
    assert props["val_fraction"]["default"] == TrainConfig.val_fraction
    assert "no budget" in props["target_krr"]["description"]


def test_idempotency_key(client: TestClient) -> None:
    h = {"Idempotency-Key": "submit-42"}
    first = client.post("/api/v1/jobs", json=TINY, headers=h)
    again = client.post("/api/v1/jobs", json=TINY, headers=h)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/api/v1/jobs", json={**TINY, "epochs": 3}, headers=h)
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    assert client.get("/api/v1/jobs").json()["total"] == 1


def test_list_filter_and_paging(client: TestClient) -> None:
    ids = [client.post("/api/v1/jobs", json={**TINY, "seed": i}).json()["id"] for i in range(5)]
    client.post("/api/v1/jobs", json={**TINY, "arch": "resnet18"})
    page = client.get("/api/v1/jobs", params={"limit": 2}).json()
    assert page["total"] == 6 and len(page["items"]) == 2 and page["next_offset"] == 2
    last = client.get("/api/v1/jobs", params={"limit": 2, "offset": 4}).json()
    assert last["next_offset"] is None and len(last["items"]) == 2
    assert client.get("/api/v1/jobs", params={"arch": "resnet18"}).json()["total"] == 1
    client.post(f"/api/v1/jobs/{ids[0]}/cancel")
    assert client.get("/api/v1/jobs", params={"status": "cancelled"}).json()["total"] == 1
    assert (
        client.get("/api/v1/jobs", params=[("status", "cancelled"), ("status", "queued")]).json()[
            "total"
        ]
        == 6
    )
    assert client.get("/api/v1/jobs", params={"status": "bogus"}).status_code == 422
    assert client.get("/api/v1/jobs", params={"limit": 10_000}).status_code == 422
    assert client.get("/api/v1/jobs", params={"offset": -1}).status_code == 422


def test_unknown_job_is_404(client: TestClient) -> None:
    for method, path in [
        ("GET", "/api/v1/jobs/nope"),
        ("POST", "/api/v1/jobs/nope/cancel"),
        ("GET", "/api/v1/jobs/nope/events"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 404 and r.json()["detail"] == "job nope not found"


def test_cancel(client: TestClient, app: FastAPI) -> None:
    queued = client.post("/api/v1/jobs", json=TINY).json()["id"]
    r = client.post(f"/api/v1/jobs/{queued}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert client.post(f"/api/v1/jobs/{queued}/cancel").status_code == 409
    running = client.post("/api/v1/jobs", json={**TINY, "seed": 1}).json()["id"]
    with app.state.sessionmaker() as s:
        s.execute(update(Job).where(Job.id == running).values(status="running", worker="w"))
        s.commit()
    r = client.post(f"/api/v1/jobs/{running}/cancel").json()
    assert (
        r["status"] == "running" and r["cancel_requested"] is True
    )  # the worker stops at its next check


def test_progress_percent_and_eta(client: TestClient, app: FastAPI) -> None:
    job_id = client.post("/api/v1/jobs", json=TINY).json()["id"]
    now = dt.datetime.now(dt.UTC)
    progress = {
        "phase": "training",
        "epoch": 2,
        "epochs": 2,
        "step": 6,
        "steps": 12,
        "loss": 1.5,
        "ce": 1.0,
        "cohesion_loss": 0.1,
        "coupling_loss": 0.2,
        "train_acc": 0.5,
        "test_acc": None,
        "kernel_rate": 0.7,
        "val_acc": 0.9,
        "kernel_budget": 0.35,
        "elapsed_s": 30.0,
        "eta_s": 10.0,
    }
    with app.state.sessionmaker() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status="running", progress=progress, heartbeat_at=now, attempts=1, worker="w")
        )
        s.commit()
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["progress"]["epoch"] == 2 and job["progress"]["loss"] == 1.5
    assert job["progress"]["val_acc"] == 0.9 and job["progress"]["kernel_budget"] == 0.35
    assert job["percent"] == 71.25  # (1 + 6/12) / 2 of the 95 % training share
    assert job["eta_s"] == 10.0
    eta_at = dt.datetime.fromisoformat(job["eta_at"])
    assert abs((eta_at - now).total_seconds() - 10.0) < 1


def test_progress_names_loss_terms_as_losses(client: TestClient, app: FastAPI) -> None:
    """Job progress says `cohesion_loss`/`coupling_loss` (the model's `cohesion` is a metric);
    a row written before the rename, with the old keys, reads back under the new names."""
    job_id = client.post("/api/v1/jobs", json=TINY).json()["id"]
    old_row = {"phase": "training", "epoch": 1, "epochs": 2, "loss": 1.0, "cohesion": 0.01,
               "coupling": 0.9}
    with app.state.sessionmaker() as s:
        s.execute(update(Job).where(Job.id == job_id).values(progress=old_row))
        s.commit()
    progress = client.get(f"/api/v1/jobs/{job_id}").json()["progress"]
    assert progress["cohesion_loss"] == 0.01 and progress["coupling_loss"] == 0.9
    assert "cohesion" not in progress and "coupling" not in progress
    assert progress["val_acc"] is None and progress["kernel_budget"] is None  # not recorded then
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ProgressOut"]
    assert {"cohesion_loss", "coupling_loss"} <= set(schema["properties"])
    assert not {"cohesion", "coupling"} & set(schema["properties"])


def _sse(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
        if data:
            events.append((name, data))
    return events


def test_sse_stream_ends_with_the_final_state(client: TestClient, app: FastAPI) -> None:
    job_id = client.post("/api/v1/jobs", json=TINY).json()["id"]
    with app.state.sessionmaker() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="failed", error="boom"))
        s.commit()
    r = client.get(f"/api/v1/jobs/{job_id}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert [e[0] for e in events] == ["progress", "end"]
    assert '"status":"failed"' in events[-1][1] and '"error":"boom"' in events[-1][1]


class _DownBroker:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.down = True

    def dispatch(self, job_id: str, queue: str) -> None:
        if self.down:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.sent.append(job_id)


def test_submit_while_the_broker_is_down_keeps_the_job_and_sends_it_later(
    client: TestClient, app: FastAPI
) -> None:
    broker = _DownBroker()
    app.state.dispatcher = broker
    h = {"Idempotency-Key": "broker-down-1"}
    r = client.post("/api/v1/jobs", json=TINY, headers=h)
    assert r.status_code == 202, r.text  # stored: not a 500, not lost
    job = r.json()
    assert job["status"] == "queued" and job["dispatched_at"] is None
    # A retried submit also retries the send; once it works, the time is recorded.
    broker.down = False
    again = client.post("/api/v1/jobs", json=TINY, headers=h)
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    assert broker.sent == [job["id"]] and again.json()["dispatched_at"] is not None
    client.post("/api/v1/jobs", json=TINY, headers=h)
    assert broker.sent == [job["id"]]  # sent once: a later retry does not send it twice
