"""Issue 14: each case an attacker or an unlucky operator found, reproduced against the API."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from numpy.lib import format as npy
from pydantic import ValidationError
from sqlalchemy import update

from app.auth import ensure_admin_key
from app.db.models import Job
from app.main import create_app
from app.settings import Settings
from tests.support.processes import REPO_ROOT
from tests.support.registry import seed_fake_model
from tests.support.services import free_port

TINY = {"epochs": 1, "width": 0.125}


def _small_npz(n: int = 40, k: int = 3, size: int = 8) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(
        buf,
        x_train=rng.integers(0, 255, (n, size, size), dtype=np.uint8),
        y_train=np.arange(n) % k,
        x_test=rng.integers(0, 255, (n // 2, size, size), dtype=np.uint8),
        y_test=np.arange(n // 2) % k,
    )
    return buf.getvalue()


def write_npz_bomb(path: Path, images: int, size: int = 512) -> None:
    """An ``np.savez_compressed``-style archive whose x_train is ``images`` zero images of
    ``size``x``size``: a few MB on disk, ``images * size * size`` bytes once inflated.
    Written in chunks, so building it takes no more memory than the chunk."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (images, 1, size, size)}
    chunk = bytes(16 * 1024 * 1024)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x_train.npy", "w", force_zip64=True) as member:
            npy.write_array_header_1_0(member, header)
            left = images * size * size
            while left > 0:
                member.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        for name, arr in (
            ("y_train", np.zeros(images, np.int64)),
            ("x_test", np.zeros((2, 1, size, size), np.uint8)),
            ("y_test", np.zeros(2, np.int64)),
        ):
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(f"{name}.npy", buf.getvalue())


# ---------------------------------------------------------------- 1. npz bomb


def test_npz_bomb_is_refused_from_its_headers(client: TestClient, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.npz"
    write_npz_bomb(bomb, images=64)  # 16 MiB inflated, ~16 KiB on disk
    small = Settings(data_dir=tmp_path / "d", max_dataset_mb=8)
    from app.services.datasets import DatasetTooLarge, check_npz_sizes

    with pytest.raises(DatasetTooLarge, match="MWT_MAX_DATASET_MB"):
        check_npz_sizes(bomb, small.max_dataset_mb * 1024 * 1024)
    assert check_npz_sizes(bomb, 1 << 30) == 64 * 512 * 512 + 2 * 512 * 512 + 8 * 66


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
def test_npz_bomb_upload_keeps_the_api_process_small(settings: Settings, tmp_path: Path) -> None:
    """The 2 GiB-inflating bomb of the issue, uploaded to a real API process: its peak RSS
    (VmHWM, reset to the current RSS just before the upload) stays under 300 MB above idle."""
    bomb = tmp_path / "bomb.npz"
    write_npz_bomb(bomb, images=8192)  # 8192 x 1 x 512 x 512 uint8 = 2 GiB inflated
    assert bomb.stat().st_size < 8 * 1024 * 1024
    port, key = free_port(), "mwt_test_bootstrap_" + os.urandom(8).hex()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "MWT_DATA_DIR": str(settings.data_dir),
        "MWT_DATABASE_URL": settings.database_url,  # the registry under test (SQLite or Postgres)
        "MWT_BOOTSTRAP_ADMIN_KEY": key,
        "MWT_REAPER_INTERVAL_S": "0",
        "MWT_LOG_LEVEL": "warning",
    }
    code = (
        "import uvicorn; from app.main import create_app; "
        f"uvicorn.run(create_app(run_executor=False), host='127.0.0.1', port={port}, log_level='warning')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/api/v1/datasets", headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        # Warm the upload path (imports, numpy) with a valid small upload first.
        ok = httpx.post(
            f"{url}/api/v1/datasets", headers=headers, files={"file": ("warm.npz", _small_npz())}
        )
        assert ok.status_code == 201, ok.text
        idle_kb = _rss_kb(proc.pid, "VmRSS")
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := current RSS
        with bomb.open("rb") as f:
            r = httpx.post(
                f"{url}/api/v1/datasets",
                headers=headers,
                files={"file": ("bomb.npz", f)},
                timeout=120,
            )
        peak_kb = _rss_kb(proc.pid, "VmHWM")
        growth_mb = (peak_kb - idle_kb) / 1024
        print(f"API RSS idle {idle_kb / 1024:.0f} MB, peak during the bomb upload "
              f"{peak_kb / 1024:.0f} MB (+{growth_mb:.0f} MB); answer {r.status_code}")
        assert growth_mb < 300
        assert r.status_code == 413, r.text
        assert "MWT_MAX_DATASET_MB" in r.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------- a live server (2., 3.)


@pytest.fixture
def live(app: FastAPI, settings: Settings) -> Iterator[tuple[str, str]]:
    """The app served by uvicorn in a thread: (base url, admin token)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    token = ensure_admin_key(app.state.sessionmaker, settings)
    assert token is not None
    try:
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.should_exit = True
        thread.join(10)


# ------------------------------------------- 2. unauthenticated upload, cut off early


@pytest.mark.parametrize("auth", ["", "Authorization: Bearer mwt_not_a_key\r\n"])
@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_upload_without_a_valid_key_is_refused_before_the_body(
    live: tuple[str, str], auth: str, framing: str
) -> None:
    """64 KiB of a 200 MiB multipart upload are sent, then the client waits: the answer must
    come from the headers. (Before the fix it came only after the whole body.) A declared
    length over the app's JSON body limit may be answered 413 by the body limiter before the
    key is looked at; a chunked body (no declared length) gets the 401."""
    url, _ = live
    host, port = url.removeprefix("http://").split(":")
    part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\n'
    part += bytes(64 * 1024)
    if framing == "chunked":
        framing_header, body = "Transfer-Encoding: chunked", b"%x\r\n%s\r\n" % (len(part), part)
    else:
        framing_header, body = f"Content-Length: {200 * 1024 * 1024}", part
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            (
                "POST /api/v1/datasets HTTP/1.1\r\n"
                f"Host: {host}\r\n{auth}"
                "Content-Type: multipart/form-data; boundary=xyz\r\n"
                f"{framing_header}\r\n\r\n"
            ).encode()
            + body
        )
        sock.settimeout(5)
        head = sock.recv(4096)
    expected = (b"HTTP/1.1 401",) if framing == "chunked" else (b"HTTP/1.1 401", b"HTTP/1.1 413")
    assert head.startswith(expected), head[:200]


# --------------------------------------------------------------- 3. event streams


def _queued_job(url: str, token: str) -> str:
    r = httpx.post(
        f"{url}/api/v1/jobs", json=TINY, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_event_streams_are_capped_and_do_not_hold_db_sessions(
    app: FastAPI, live: tuple[str, str], make_key: Callable[..., str]
) -> None:
    url, admin = live
    app.state.stream_slots.per_key, app.state.stream_slots.total = 2, 3
    job = _queued_job(url, admin)
    a, b, c = make_key("read"), make_key("read"), make_key("read")
    opened = []
    with httpx.Client(base_url=url, timeout=30) as http:
        try:
            for token in (a, a):
                cm = http.stream("GET", f"/api/v1/jobs/{job}/events", headers={"X-API-Key": token})
                r = cm.__enter__()
                opened.append(cm)
                assert r.status_code == 200
            third = http.get(f"/api/v1/jobs/{job}/events", headers={"X-API-Key": a})
            assert third.status_code == 429 and "PER_KEY" in third.json()["detail"]
            cm = http.stream("GET", f"/api/v1/jobs/{job}/events", headers={"X-API-Key": b})
            assert cm.__enter__().status_code == 200
            opened.append(cm)
            full = http.get(f"/api/v1/jobs/{job}/events", headers={"X-API-Key": c})
            assert full.status_code == 429 and "MWT_SSE_MAX_STREAMS" in full.json()["detail"]
            # Other requests are served at once, and the open streams hold no DB connection.
            t0 = time.monotonic()
            assert http.get("/api/v1/models", headers={"X-API-Key": c}).status_code == 200
            assert time.monotonic() - t0 < 2
            # (sampled: a stream's poll holds a connection for a moment, a held session always)
            samples = []
            for _ in range(20):
                samples.append(app.state.engine.pool.checkedout())
                time.sleep(0.02)
            assert min(samples) < len(opened), samples
        finally:
            for cm in opened:
                cm.__exit__(None, None, None)
        # Closed streams give their slots back.
        deadline = time.monotonic() + 10
        while app.state.stream_slots.open_streams():
            assert time.monotonic() < deadline, "stream slots leaked"
            time.sleep(0.1)


def test_event_stream_on_a_job_that_stays_queued_ends(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"sse_queued_timeout_s": 0.5})
    app = create_app(s, run_executor=False)
    with TestClient(app) as c:
        token = ensure_admin_key(app.state.sessionmaker, s)
        c.headers["Authorization"] = f"Bearer {token}"
        job = c.post("/api/v1/jobs", json=TINY).json()["id"]
        r = c.get(f"/api/v1/jobs/{job}/events", timeout=10)
    assert r.status_code == 200
    assert "event: end" in r.text and '"ended":"queued_too_long"' in r.text


# ------------------------------------------------------------ 4. Unicode digits


def test_unicode_digit_class_is_a_4xx(client: TestClient, app: FastAPI, settings: Settings) -> None:
    with app.state.sessionmaker() as s:
        model = seed_fake_model(s, settings)
    for cls in ("²", "٣", "①"):
        r = client.post("/api/v1/compositions", json={"model_id": model.id, "classes": [cls]})
        assert 400 <= r.status_code < 500, (cls, r.status_code, r.text)


# ------------------------------------------------------- 5. no server paths in errors


def test_error_bodies_do_not_expose_server_paths(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    data_dir = str(settings.data_dir.resolve())
    # A built-in dataset whose files are missing: the message used to name the directory.
    r = client.post("/api/v1/jobs", json={**TINY, "dataset": "cifar10", "arch": "vgg16"})
    assert r.status_code == 422 and "cifar10" in r.json()["detail"]
    assert data_dir not in r.text

    # Any route that passes an exception's text on (410 TorchScript, 409 compositions).
    missing = settings.artifacts / "compositions" / "7" / "model.safetensors"

    @app.get("/api/v1/_boom")
    def boom() -> None:
        raise HTTPException(410, f"artifact cannot be loaded: [Errno 2] No such file: '{missing}'")

    r = client.get("/api/v1/_boom")
    assert r.status_code == 410
    assert data_dir not in r.text and str(settings.data_dir) not in r.text
    assert "<MWT_ARTIFACT_DIR>/compositions/7/model.safetensors" in r.json()["detail"]


# ------------------------------------------- 7. dataset in use by a queued job


def test_dataset_used_by_a_queued_job_cannot_be_deleted(client: TestClient, app: FastAPI) -> None:
    assert client.post("/api/v1/datasets", files={"file": ("busy.npz", _small_npz())}).status_code == 201
    job = client.post("/api/v1/jobs", json={**TINY, "dataset": "busy"}).json()["id"]
    r = client.delete("/api/v1/datasets/busy")
    assert r.status_code == 409 and job in r.json()["detail"]
    with app.state.sessionmaker() as s:
        s.execute(update(Job).where(Job.id == job).values(status="running"))
        s.commit()
    assert client.delete("/api/v1/datasets/busy").status_code == 409
    with app.state.sessionmaker() as s:
        s.execute(update(Job).where(Job.id == job).values(status="cancelled"))
        s.commit()
    assert client.delete("/api/v1/datasets/busy").status_code == 204


# ------------------------------------------------- 8. weak bootstrap admin key


@pytest.mark.parametrize("weak", ["a", "aaaaaaaaaaaaaaaaaaaaaaaaaaaa", "password", "short but ok?"])
def test_weak_bootstrap_admin_key_is_refused_at_start(tmp_path: Path, weak: str) -> None:
    with pytest.raises(ValidationError, match="at least 20 characters"):
        Settings(data_dir=tmp_path, bootstrap_admin_key=weak)
    strong = "mwt_" + os.urandom(16).hex()
    assert Settings(data_dir=tmp_path, bootstrap_admin_key=strong).bootstrap_admin_key == strong


@pytest.mark.slow
def test_mwt_serve_with_a_weak_key_exits_with_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "MWT_DATA_DIR": str(tmp_path),
        "MWT_BOOTSTRAP_ADMIN_KEY": "a",
        "COLUMNS": "400",
    }
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", "0"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "MWT_BOOTSTRAP_ADMIN_KEY is refused" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


# --------------------------------------------------- 10. the spec matches the API


def test_openapi_matches_the_api(client: TestClient, settings: Settings) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ErrorOut" in schemas
    err = {"$ref": "#/components/schemas/ErrorOut"}
    submit = doc["paths"]["/api/v1/jobs"]["post"]["responses"]
    assert submit["422"]["content"]["application/json"]["schema"] == err
    # A 422 answered by the API has the declared shape.
    bad = client.post("/api/v1/jobs", json={**TINY, "epochs": "many"})
    assert bad.status_code == 422 and set(bad.json()) <= {"detail", "errors"}
    assert set(schemas["ErrorOut"]["required"]) == {"detail"}
    # Codes the routes raise are documented.
    assert {"404", "409"} <= set(doc["paths"]["/api/v1/datasets/{name}"]["delete"]["responses"])
    assert "413" in doc["paths"]["/api/v1/datasets"]["post"]["responses"]
    torchscript = doc["paths"]["/api/v1/compositions/{composition_id}/torchscript"]["get"]
    assert {"404", "409", "410"} <= set(torchscript["responses"])
    assert "429" in doc["paths"]["/api/v1/jobs/{job_id}/events"]["get"]["responses"]
    # limit: the bound in the spec is the one enforced.
    limit = next(
        p for p in doc["paths"]["/api/v1/jobs"]["get"]["parameters"] if p["name"] == "limit"
    )
    top = limit["schema"]["maximum"]
    assert top == settings.page_size_max
    assert client.get(f"/api/v1/jobs?limit={top}").status_code == 200
    assert client.get(f"/api/v1/jobs?limit={top + 1}").status_code == 422


def test_booleans_are_strict(client: TestClient) -> None:
    for value in (0, 1, "yes", "true"):
        r = client.post("/api/v1/jobs", json={**TINY, "amp": value})
        assert r.status_code == 422 and "amp" in r.json()["detail"], value
    assert client.post("/api/v1/jobs", json={**TINY, "amp": False}).status_code == 202


def test_405_allow_lists_every_method(client: TestClient) -> None:
    r = client.put("/api/v1/jobs")
    assert r.status_code == 405
    assert {"GET", "POST"} <= {m.strip() for m in r.headers["allow"].split(",")}
    r = client.put("/api/v1/models/1")
    assert {"GET", "PATCH", "DELETE"} <= {m.strip() for m in r.headers["allow"].split(",")}
