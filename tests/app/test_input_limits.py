"""Issue 24: hostile input to predict and to dataset uploads, and what the dataset cache keeps.

Each reproducer of the security probe is answered 4xx quickly and without the API process
growing by more than a few hundred MB: measured on a real server process (its peak RSS,
VmHWM, reset just before each request), since an in-process figure would mix the test's
own allocations in.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import struct
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
from fastapi import FastAPI
from fastapi.testclient import TestClient
from numpy.lib import format as npy
from PIL import Image

from app.auth import ensure_admin_key
from app.main import create_app
from app.settings import MiB, Settings
from tests.support.processes import REPO_ROOT, clean_env
from tests.support.registry import seed_trained_model
from tests.support.services import free_port

GROWTH_LIMIT_MB = 300  # the most an API process may grow while refusing one hostile request
ANSWER_WITHIN_S = 2.0


def _png(width: int, height: int, mode: str = "L") -> bytes:
    """A blank image: tiny as a PNG however many pixels it has."""
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _small_npz(seed: int = 0, k: int = 3, n: int = 30) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(
        buf,
        x_train=rng.integers(0, 255, (n, 8, 8), dtype=np.uint8),
        y_train=np.arange(n) % k,
        x_test=rng.integers(0, 255, (n, 8, 8), dtype=np.uint8),
        y_test=np.arange(n) % k,
        class_names=np.array([f"s{seed}c{i}" for i in range(k)]),
    )
    return buf.getvalue()


def write_npz(path: Path, x_train_member: str, images: int, size: int = 512,
              raw: bool = False, first: str | None = None) -> None:
    """An ``.npz`` whose ``x_train`` is ``images`` zero images of ``size`` x ``size`` in a
    deflated member named ``x_train_member`` (``raw``: plain bytes, no ``.npy`` header): a
    few MB on disk, ``images * size * size`` bytes once loaded. Written in chunks. ``first``
    names a small member written before all others."""
    chunk = bytes(16 * MiB)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        if first is not None:
            zf.writestr(first, _npy(np.zeros(4, np.uint8)))
        with zf.open(x_train_member, "w", force_zip64=True) as member:
            if not raw:
                header = {"descr": "|u1", "fortran_order": False, "shape": (images, size, size)}
                npy.write_array_header_1_0(member, header)
            left = images * size * size
            while left > 0:
                member.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        for name, arr in (
            ("y_train", np.zeros(images, np.int64)),
            ("x_test", np.zeros((2, size, size), np.uint8)),
            ("y_test", np.zeros(2, np.int64)),
        ):
            zf.writestr(f"{name}.npy", _npy(arr))


# ------------------------------------------------------------------ in process: predict


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Small predict limits, so each one is cheap to reach."""
    return settings.model_copy(update={
        "predict_max_images": 8,
        "predict_max_image_side": 256,
        "predict_max_aspect_ratio": 4.0,
        "predict_max_pixels": 128 * 128,
        "predict_max_request_pixels": 3 * 128 * 128,
        "predict_max_json_mb": 1,
        "max_dataset_mb": 8,
    })


@pytest.fixture
def model_id(app: FastAPI, settings: Settings) -> int:
    with app.state.sessionmaker() as s:
        return seed_trained_model(s, settings).id


def test_predict_image_sizes_are_checked_from_the_headers(
    client: TestClient, model_id: int, settings: Settings
) -> None:
    url = f"/api/v1/models/{model_id}/predict"

    def post(*images: tuple[str, bytes]) -> httpx.Response:
        return client.post(url, files=[("files", (n, d, "image/png")) for n, d in images])

    cases = [
        (_png(1, 16 * 1024), "each side may be at most 256 pixels"),  # a strip, under the pixel cap
        (_png(200, 40), "at most 4 times the shorter"),
        (_png(63, 256), "at most 4 times the shorter"),
        (_png(150, 150), "150x150 pixels is more than the 16384 allowed"),
    ]
    for data, message in cases:
        r = post(("strip.png", data))
        assert r.status_code == 413, r.text
        assert message in r.json()["detail"] and "strip.png" in r.json()["detail"]
    square = _png(128, 128)
    r = post(*[(f"{i}.png", square) for i in range(4)])  # 4 x 16384 pixels, over 3 x 16384
    assert r.status_code == 413 and "49152 pixels together (reached at 3.png)" in r.json()["detail"]
    r = post(*[(f"{i}.png", square) for i in range(3)])
    assert r.status_code == 200, r.text
    assert [p["input"] for p in r.json()["predictions"]] == ["0.png", "1.png", "2.png"]
    r = post(("wide.png", _png(128, 32, "RGB")))  # 4:1 and RGB for a grey spec: allowed
    assert r.status_code == 200, r.text


def test_predict_json_body_is_capped_and_counted_before_parsing(
    client: TestClient, app: FastAPI, settings: Settings, model_id: int
) -> None:
    url = f"/api/v1/models/{model_id}/predict"
    json_type = {"content-type": "application/json"}
    limit = settings.predict_json_limit_bytes
    big = b"[" + b"0," * (limit // 2) + b"0]"
    r = client.post(url, content=big, headers=json_type)  # declared length over the cap
    assert r.status_code == 413 and "MWT_PREDICT_MAX_JSON_MB" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no declared length: counted as it arrives
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    r = client.post(url, content=chunks(), headers=json_type)
    assert r.status_code == 413 and "MWT_PREDICT_MAX_JSON_MB" in r.json()["detail"]
    # Under the byte cap, but more numbers than 8 images in the spec's shape can hold.
    spec = client.get(f"/api/v1/models/{model_id}").json()["input_spec"]
    c, h, w = spec["channels"], spec["size"], spec["size"]
    r = client.post(url, content=b"[" + b"0," * (8 * c * h * w) + b"0]", headers=json_type)
    assert r.status_code == 413 and "at most 8 images" in r.json()["detail"], r.text
    assert client.post(url, json=[[[[0.5] * w] * h] * c] * 8).status_code == 200

    # Nesting deeper than Python's recursion limit, within what the spec's largest batch
    # allows in brackets (many images per request make room for it): 422, not a 500.
    roomy = settings.model_copy(update={"predict_max_images": 4096})
    with TestClient(create_app(roomy, run_executor=False)) as c:
        c.headers["Authorization"] = client.headers["Authorization"]
        deep = b"[" * 20_000 + b"]" * 20_000
        r = c.post(url, content=deep, headers=json_type)
        assert r.status_code == 422 and "nested too deeply" in r.json()["detail"], r.text


# ------------------------------------------------------------- in process: dataset uploads


def test_every_npz_member_numpy_loads_counts_toward_the_size_limit(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    from app.services.datasets import DatasetTooLarge, check_npz_sizes

    limit = settings.max_dataset_mb * MiB
    for member, raw in (("x_train", False), ("x_train", True), ("x_train.npy", False)):
        bomb = tmp_path / f"{member}-{raw}.npz"
        write_npz(bomb, member, images=64, raw=raw)  # 16 MiB once loaded, over 8 MiB
        assert bomb.stat().st_size < MiB
        with np.load(bomb) as loaded:  # numpy itself finds x_train under either name
            assert "x_train" in loaded.files
        with pytest.raises(DatasetTooLarge, match="MWT_MAX_DATASET_MB"):
            check_npz_sizes(bomb, limit)
        r = client.post("/api/v1/datasets", files={"file": ("bomb.npz", bomb.read_bytes())})
        assert r.status_code == 413, (member, raw, r.text)
        assert "x_train" in r.json()["detail"] and "MWT_MAX_DATASET_MB" in r.json()["detail"]


def test_malformed_npz_archives_are_4xx(client: TestClient, tmp_path: Path) -> None:
    def upload(data: bytes) -> httpx.Response:
        return client.post("/api/v1/datasets", files={"file": ("odd.npz", data)})

    # A .npy header that claims 4 GiB: numpy would inflate it whole before checking it.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x_train.npy", npy.MAGIC_PREFIX + b"\x02\x00" + struct.pack("<I", 2**32 - 1)
                    + bytes(1024))
    r = upload(buf.getvalue())
    assert r.status_code == 422 and "header claims 4294967295 bytes" in r.json()["detail"]

    # Many empty members: zipfile would build an object for each before anything is checked.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(30_000):
            zf.writestr(zipfile.ZipInfo(f"m{i:05d}"), b"")
    r = upload(buf.getvalue())
    assert r.status_code == 422 and "zip directory is" in r.json()["detail"], r.text

    # Corrupt deflated data behind a valid directory: zlib fails on the member's first bytes.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x_train.npy", _npy(np.arange(4096, dtype=np.uint8)))
        start = zf.getinfo("x_train.npy").header_offset + 30 + len("x_train.npy")
    data = bytearray(buf.getvalue())
    data[start : start + 4] = b"\xff" * 4  # a deflate block of the reserved type
    r = upload(bytes(data))
    assert r.status_code == 422 and "not a readable .npz archive" in r.json()["detail"], r.text

    # A member that cannot be opened (its local header names another file) ahead of one over
    # the size limit: the check must not stop at the first and let numpy load the second.
    archive = tmp_path / "broken-first.npz"
    write_npz(archive, "x_train.npy", images=64, first="aaa.npy")  # 16 MiB, over 8
    data = bytearray(archive.read_bytes())
    data[30:37] = b"aab.npy"  # the first local header's file name
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf, pytest.raises(zipfile.BadZipFile):
        zf.open("aaa.npy")
    with np.load(io.BytesIO(bytes(data))) as loaded:
        assert loaded["x_train"].nbytes == 64 * 512 * 512
    r = upload(bytes(data))
    assert r.status_code == 422 and "BadZipFile" in r.json()["detail"], r.text


# ----------------------------------------------------------- in process: the dataset cache


def _sample_classes(client: TestClient, name: str) -> list[str]:
    r = client.get(f"/api/v1/datasets/{name}/samples", params={"per_class": 1})
    assert r.status_code == 200, r.text
    return list(r.json()["class_names"])


def test_samples_follow_a_dataset_deleted_and_uploaded_again(
    client: TestClient, app: FastAPI
) -> None:
    cache = app.state.bundle_cache
    assert client.post("/api/v1/datasets", files={"file": ("ds.npz", _small_npz(0))}).status_code == 201
    assert _sample_classes(client, "ds") == ["s0c0", "s0c1", "s0c2"]
    assert any(key[0] == "ds" for key in cache.held_keys())
    assert client.delete("/api/v1/datasets/ds").status_code == 204
    assert not any(key[0] == "ds" for key in cache.held_keys())  # its arrays went with it
    assert client.post("/api/v1/datasets", files={"file": ("ds.npz", _small_npz(1))}).status_code == 201
    assert _sample_classes(client, "ds") == ["s1c0", "s1c1", "s1c2"]


def test_samples_of_an_upload_whose_file_is_gone_are_410(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    r = client.post("/api/v1/datasets", files={"file": ("lost.npz", _small_npz())})
    assert r.status_code == 201
    (settings.datasets / "uploads" / "lost.npz").unlink()
    r = client.get("/api/v1/datasets/lost/samples")
    assert r.status_code == 410, r.text
    assert "file is missing" in r.json()["detail"] and "upload it again" in r.json()["detail"]
    assert str(settings.datasets) not in r.text


def test_unknown_dataset_message_names_only_what_the_caller_may_list(settings: Settings) -> None:
    private = settings.model_copy(update={"private_listing": True})
    app = create_app(private, run_executor=False)
    with TestClient(app) as c:
        admin = ensure_admin_key(app.state.sessionmaker, private)
        c.headers["Authorization"] = f"Bearer {admin}"
        alice, bob = (
            {"Authorization": "Bearer " + c.post(
                "/api/v1/keys", json={"name": n, "scopes": ["write"]}).json()["token"]}
            for n in ("alice", "bob")
        )
        r = c.post("/api/v1/datasets", files={"file": ("alices.npz", _small_npz())}, headers=alice)
        assert r.status_code == 201
        for who, sees in ((alice, True), (bob, False)):
            samples = c.get("/api/v1/datasets/nope/samples", headers=who)
            job = c.post("/api/v1/jobs", json={"dataset": "nope", "arch": "simcnn"}, headers=who)
            assert (samples.status_code, job.status_code) == (404, 422)
            for detail in (samples.json()["detail"], job.json()["detail"]):
                assert "unknown dataset 'nope'" in detail and ("alices" in detail) == sees, detail


# ------------------------------------------------------------- a real API process, measured


def _proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


class ApiProcess:
    """``create_app`` served by uvicorn in a process of its own, on a registry with one tiny
    trained model. Started again when a request killed it."""

    def __init__(self, root: Path, template: Path) -> None:
        self.data = root / "data"
        self.data.mkdir()
        for f in template.glob("mwt.db*"):
            shutil.copy(f, self.data / f.name)
        self.settings = Settings(data_dir=self.data, max_dataset_mb=64)
        from app.db.session import make_engine, make_sessionmaker

        engine = make_engine(self.settings)
        with make_sessionmaker(engine)() as s:
            self.model_id = seed_trained_model(s, self.settings).id
        engine.dispose()
        self.key = "mwt_test_bootstrap_" + os.urandom(8).hex()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        env = clean_env({
            "PYTHONPATH": str(REPO_ROOT),
            "MWT_DATA_DIR": str(self.data),
            "MWT_MAX_DATASET_MB": str(self.settings.max_dataset_mb),
            "MWT_BOOTSTRAP_ADMIN_KEY": self.key,
            "MWT_REAPER_INTERVAL_S": "0",
            "MWT_LOG_LEVEL": "warning",
        })
        code = ("import uvicorn; from app.main import create_app; uvicorn.run(create_app("
                f"run_executor=False), host='127.0.0.1', port={port}, log_level='warning')")
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{self.url}/api/v1/datasets", headers=self.headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, "the API process exited"
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        # Warm the paths under test (imports, the classifier cache) with ordinary requests.
        r = httpx.post(f"{self.url}/api/v1/models/{self.model_id}/predict", headers=self.headers,
                       files={"files": ("warm.png", _png(64, 64))}, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{self.url}/api/v1/datasets", headers=self.headers, timeout=60,
                       files={"file": (f"warm{port}.npz", _small_npz())})
        assert r.status_code == 201, r.text

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def measure(self, send: Callable[[], httpx.Response]
                ) -> tuple[httpx.Response | None, float, float]:
        """``(answer, seconds, growth in MB)`` of one request: peak RSS (VmHWM, reset to the
        current RSS first) over idle. A process that grows far past the limit is killed
        before it takes the machine with it (the answer is then None)."""
        assert self.proc is not None
        pid = self.proc.pid
        idle_kb = _proc_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS
        done = threading.Event()
        killed: list[int] = []

        def watch() -> None:
            while not done.wait(0.01):
                try:
                    rss = _proc_kb(pid, "VmRSS")
                except (FileNotFoundError, ProcessLookupError, AssertionError):
                    return
                if rss - idle_kb > 8 * GROWTH_LIMIT_MB * 1024:
                    killed.append(rss)
                    os.kill(pid, signal.SIGKILL)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.monotonic()
        try:
            r: httpx.Response | None = send()
        except httpx.TransportError:
            r = None
        seconds = time.monotonic() - start
        done.set()
        watcher.join()
        if killed:
            return None, seconds, (killed[0] - idle_kb) / 1024
        return r, seconds, (_proc_kb(pid, "VmHWM") - idle_kb) / 1024


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[ApiProcess]:
    server = ApiProcess(tmp_path_factory.mktemp("api"), sqlite_template)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def running(api: ApiProcess) -> ApiProcess:
    if not api.alive():
        api.start()
    return api


Send = Callable[[], httpx.Response]


def _predict_files(server: ApiProcess, files: list[tuple[str, bytes]]) -> Send:
    url = f"{server.url}/api/v1/models/{server.model_id}/predict"
    parts = [("files", (n, d, "image/png")) for n, d in files]
    return lambda: httpx.post(url, headers=server.headers, files=parts, timeout=180)


def _strip_png(server: ApiProcess, _: Path) -> Send:
    """1 x 16,777,216 pixels: exactly the default pixel cap, and a few dozen KB."""
    return _predict_files(server, [("strip.png", _png(1, server.settings.predict_max_pixels))])


def _many_pngs(server: ApiProcess, _: Path) -> Send:
    """As many images as allowed, each at the pixel cap, each a few dozen KB."""
    side = math.isqrt(server.settings.predict_max_pixels)
    image = _png(side, side)
    return _predict_files(server, [(f"{i}.png", image) for i in range(server.settings.predict_max_images)])


def _big_json(server: ApiProcess, _: Path) -> Send:
    body = b"[" + b"0.5," * (16 * MiB - 2) + b"0.5, 0]"  # 64 MiB: within the route's limit
    assert len(body) == 64 * MiB <= server.settings.predict_body_limit_bytes
    url = f"{server.url}/api/v1/models/{server.model_id}/predict"
    headers = {**server.headers, "content-type": "application/json"}
    return lambda: httpx.post(url, content=body, headers=headers, timeout=180)


def _x_train_bomb(server: ApiProcess, tmp: Path) -> Send:
    bomb = tmp / "bomb.npz"
    write_npz(bomb, "x_train", images=2048)  # 512 MiB once loaded, over MWT_MAX_DATASET_MB=64
    assert bomb.stat().st_size < 2 * MiB
    data = bomb.read_bytes()
    return lambda: httpx.post(f"{server.url}/api/v1/datasets", headers=server.headers,
                              timeout=180, files={"file": ("bomb.npz", data)})


CASES: dict[str, tuple[Callable[[ApiProcess, Path], Send], str]] = {
    "1x16777216 png": (_strip_png, "each side may be at most"),
    "32 4096x4096 pngs": (_many_pngs, "pixels together"),
    "64 MiB json": (_big_json, "MWT_PREDICT_MAX_JSON_MB"),
    "npz member x_train": (_x_train_bomb, "MWT_MAX_DATASET_MB"),
}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_fast_and_small(
    running: ApiProcess, case: str, tmp_path: Path
) -> None:
    prepare, message = CASES[case]
    r, seconds, growth = running.measure(prepare(running, tmp_path))
    print(f"{case}: {r.status_code if r is not None else 'killed'} in {seconds:.2f} s, "
          f"API peak +{growth:.0f} MB")
    assert r is not None, f"the API process grew by {growth:.0f} MB and was stopped"
    assert 400 <= r.status_code < 500 and message in r.json()["detail"], r.text[:500]
    assert growth < GROWTH_LIMIT_MB, f"the API process grew by {growth:.0f} MB"
    assert seconds < ANSWER_WITHIN_S


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
def test_a_large_legal_image_is_answered_without_gigabytes(running: ApiProcess) -> None:
    """4096 x 4096 RGB at the pixel cap: decoded once, shrunk in strips."""
    x = np.linspace(0, 255, 4096, dtype=np.float32)
    gradient = np.stack([np.add.outer(x, x) / 2, np.add.outer(x, 255 - x) / 2,
                         np.broadcast_to(x[:, None], (4096, 4096))], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gradient, mode="RGB").save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) <= running.settings.predict_max_image_kb * 1024
    r, seconds, growth = running.measure(_predict_files(running, [("photo.png", data)]))
    print(f"4096x4096 RGB: {r.status_code if r is not None else 'killed'} in {seconds:.2f} s, "
          f"API peak +{growth:.0f} MB")
    assert r is not None and r.status_code == 200, r.text[:500] if r is not None else growth
    assert growth < GROWTH_LIMIT_MB
