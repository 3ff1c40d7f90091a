"""The dashboard in a real browser: Playwright drives Debian's Chromium (headless) against a live
`mwt serve` (SQLite, embedded executor). One walk through the pages, as a user would:
sign in (a bad key first), train on digits and watch the curve grow, open the model card,
find a module and download it (sha256 checked), compose three classes, upload a bad dataset,
and read /docs, with every request that would leave the machine failing the test.
Screenshots of each page at 1280 and 390 px go to docs/screenshots/ (or $MWT_TEST_SCREENSHOTS)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from playwright import sync_api

from mwt_core.config import TrainConfig
from tests.support.processes import ServiceProcess, clean_env, wait_http
from tests.support.services import free_port

# A served registry, a training job and a browser.
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("MWT_TEST_SCREENSHOTS", REPO / "docs" / "screenshots"))
WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


@pytest.fixture(autouse=True, scope="module")
def _chromium_installed() -> None:
    # `make test` installs Chromium (scripts/system-deps.sh): a missing one is a failure, not a
    # skip, or the suite would pass with the dashboard untested.
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: run scripts/system-deps.sh (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    root = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    key_file = root / "admin.key"
    env = clean_env(
        {
            "MWT_DATA_DIR": str(root / "data"),
            "MWT_DEVICE": "cpu",
            "MWT_SSE_POLL_S": "0.2",
            "MWT_HEARTBEAT_INTERVAL_S": "0.2",  # progress written often enough to see the curve move
        }
    )
    proc = ServiceProcess(
        "serve", ["mwt", "serve", "--port", str(port), "--key-file", str(key_file)], env, root
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=proc)
        yield f"http://127.0.0.1:{port}", key_file.read_text().strip(), root
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Watch:
    """What the page did that it should not: requests leaving the machine, console errors."""

    def __init__(self) -> None:
        self.outside: list[str] = []
        self.errors: list[str] = []


def _new_page(browser: Any, base: str, watch: Watch, width: str = "desktop") -> Any:
    w, h = WIDTHS[width]
    ctx = browser.new_context(viewport={"width": w, "height": h}, base_url=base, accept_downloads=True)

    def guard(route: Any) -> None:
        host = urlparse(route.request.url).hostname or ""
        if route.request.url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            route.continue_()
        else:
            watch.outside.append(route.request.url)
            route.abort()

    ctx.route("**/*", guard)
    page = ctx.new_page()
    page.on("console", lambda m: m.type == "error" and watch.errors.append(m.text))
    page.on("pageerror", lambda e: watch.errors.append(f"uncaught: {e}"))
    return page


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _sign_in(page: Any, key: str) -> None:
    page.goto("/")
    page.fill("#api-key", key)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])")


def _points(page: Any) -> int:
    """Vertices of the live loss curve (0 while it is not drawn)."""
    d = page.eval_on_selector_all(
        "#job-curves [data-curve=loss] path[data-series=loss]", "els => els.map(e => e.getAttribute('d'))"
    )
    return d[0].count("L") + 1 if d else 0


def test_dashboard_walkthrough(server: tuple[str, str, Path], browser: Any, tmp_path: Path) -> None:
    base, key, root = server
    watch = Watch()
    page = _new_page(browser, base, watch)
    expect = sync_api.expect

    # A bad key: the 401 message shows inline, and the page stays on the sign-in form.
    page.goto("/")
    page.fill("#api-key", "mwt_not-a-key")
    page.click("#login button[type=submit]")
    expect(page.locator("#login .error")).to_contain_text("invalid or revoked API key")
    _sign_in(page, key)
    expect(page.locator("#who")).to_contain_text("admin")

    # Submit a 1-epoch job; the form's defaults come from the API schema.
    page.wait_for_selector("#job-form")
    assert page.input_value("#job-form [name=epochs]") == "200"  # JobCreate's default, not hard-coded here
    budget = TrainConfig.target_krr  # the kernel budget field shows TrainConfig's, via the schema
    assert page.input_value("#job-form [name=target_krr]") == ("" if budget is None else f"{budget:g}")
    expect(page.locator("#job-form")).to_contain_text("kernel budget (target KRR)")
    page.fill("#job-form [name=epochs]", "1")
    page.fill("#job-form [name=width]", "0.125")
    page.fill("#job-form [name=batch_size]", "32")  # more steps, so more live points in one epoch
    page.fill("#job-form [name=mask_lr]", "0.1")
    page.select_option("#job-form [name=dataset]", "digits")
    page.click("#job-form button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/[\w-]+$"))
    seen: list[int] = []
    status = page.locator("#job-status")
    for _ in range(1200):  # at most ~240 s
        seen.append(_points(page))
        if status.get_attribute("data-status") in ("succeeded", "failed", "cancelled"):
            break
        page.wait_for_timeout(200)
    assert status.get_attribute("data-status") == "succeeded", page.inner_text("main")
    live = [n for n in seen if n]
    assert live and max(live) > min(live), f"the curve never grew while training: {seen}"
    page.wait_for_selector(
        "#job-curves [data-curve=acc] path[data-series=test_acc]", state="attached"
    )
    _shot(page, "job-desktop")
    job_url = page.url
    # The loss weights the form showed are TrainConfig's, on digits as anywhere; the typed one stayed.
    params = httpx.get(f"{base}/api/v1/jobs/{job_url.rsplit('/', 1)[1]}",
                       headers={"X-API-Key": key}).json()["params"]
    assert params["mask_lr"] == 0.1
    assert {k: params[k] for k in ("alpha", "beta", "gamma")} == {
        k: getattr(TrainConfig, k) for k in ("alpha", "beta", "gamma")}

    # The model card: metrics, the class x layer heatmap, the coupling matrix.
    page.click("#job-model-link")
    page.wait_for_selector("#kept-heatmap svg")
    # the budget asked and reached, and validation accuracy beside test accuracy
    expect(page.locator("#model-budget")).to_contain_text("none" if TrainConfig.target_krr is None else "asked")
    expect(page.locator("#model-metrics")).to_contain_text("validation accuracy")
    model_id = int(page.url.rsplit("/", 1)[1])
    insights = httpx.get(
        f"{base}/api/v1/models/{model_id}/insights", headers={"X-API-Key": key}
    ).json()
    # one cell per class and masked layer, each labelled with the kernels that class keeps
    cells = page.locator("#kept-heatmap rect.cell")
    assert cells.count() == 10 * len(insights["layers"]) > 0
    first_row = [str(k) for k in insights["kept"][0]]
    texts = page.locator("#kept-heatmap text.cell-text").all_text_contents()
    assert texts[: len(first_row)] == first_row
    assert page.locator("#coupling-matrix rect.cell").count() == 100
    expect(page.locator("#class-accuracy svg")).to_be_visible()
    model_url = page.url
    _shot(page, "model-desktop")

    # Search the module of class "3", download it; the browser verified its sha256, and so do we.
    page.goto("/#/modules")
    page.fill("#module-search [name=dataset]", "digits")
    page.fill("#module-search [name=class_name]", "3")
    page.click("#module-search button[type=submit]")
    expect(page.locator("table tbody tr")).to_have_count(1)
    expect(page.locator("table tbody tr td").nth(1)).to_have_text("3")
    page.locator("table tbody tr").first.click()
    page.wait_for_selector("#module-card")
    sha = page.inner_text("#module-sha").strip()
    # The card shows the module's CPU latency beside its model's, as the registry recorded it.
    mod = httpx.get(f"{base}/api/v1{page.url.split('#', 1)[1]}", headers={"X-API-Key": key}).json()
    assert mod["latency_ms"] > 0 and mod["full_latency_ms"] > 0
    expect(page.locator("#module-latency")).to_contain_text(f"{mod['latency_ms']:.3f} ms/image")
    with page.expect_download() as dl_info:
        page.get_by_role("button", name="Download module").click()
    path = tmp_path / "module.tar"
    dl_info.value.save_as(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    expect(page.locator(".download-result")).to_contain_text("verified")
    _shot(page, "module-desktop")
    module_url = page.url

    # Compose three classes; the accuracy is shown beside the baseline.
    page.goto("/#/compose")
    page.wait_for_selector("#picker")
    for c in ("3", "5", "8"):
        page.check(f"#picker details[open] input[data-class='{c}']")
    page.click("#compose-btn")
    acc = page.locator("#composition-accuracy")
    acc.wait_for(timeout=120_000)
    api = httpx.Client(base_url=f"{base}/api/v1", headers={"X-API-Key": key}, timeout=60)
    comp = api.get("/compositions").json()["items"][0]
    assert comp["class_names"] == ["3", "5", "8"]
    assert acc.inner_text() == f"{100 * comp['accuracy']:.1f}%"
    expect(page.locator("#composition > h2")).to_contain_text("3, 5, 8")
    # Try it: an image of a 5 from the test split, through the predict endpoint.
    sample = api.get("/datasets/digits/samples", params={"per_class": 1}).json()["images"][5][0]
    png = tmp_path / "five.png"
    png.write_bytes(base64.b64decode(sample.split(",", 1)[1]))
    page.set_input_files("#composition #drop-zone input[type=file]", str(png))
    expect(page.locator("#composition .predict-result")).to_contain_text("five.png")
    top = api.post(
        f"/compositions/{comp['id']}/predict", files={"files": ("five.png", png.read_bytes())}
    ).json()["predictions"][0]["top"][0]["class_name"]
    expect(page.locator("#composition .predict-result td").nth(1)).to_contain_text(top)
    _shot(page, "compose-desktop")

    # Bad inputs: a dataset that is not an .npz; a job with an impossible value.
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip archive")
    page.goto("/#/datasets/digits")
    page.wait_for_selector("#samples img")
    assert page.locator("#samples img").count() == 10 * 8
    _shot(page, "datasets-desktop")
    page.set_input_files("#upload-form input[type=file]", str(bad))
    page.click("#upload-form button[type=submit]")
    upload_error = page.locator("#main .error:not([hidden])")
    expect(upload_error).to_contain_text("4")
    assert re.match(r"4\d\d: ", upload_error.inner_text()), upload_error.inner_text()
    page.goto("/#/jobs")
    page.wait_for_selector("#job-form")
    page.fill("#job-form [name=tau]", "7")
    page.click("#job-form button[type=submit]")
    expect(page.locator("#submit-job .error")).to_contain_text("tau")
    # The browser logs each refused request itself; those are expected, nothing else is.
    unexpected = [e for e in watch.errors if not re.search(r"status of 4\d\d", e)]
    assert not unexpected, unexpected
    watch.errors.clear()

    # /docs renders the operations from the locally served Swagger UI.
    page.goto("/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    assert page.locator(".opblock").count() >= 20
    expect(page.locator("body")).to_contain_text("/api/v1/jobs/{job_id}/events")

    # Every page at phone width (and the lists at desktop width too), once its data is drawn.
    phone = _new_page(browser, base, watch, "phone")
    _sign_in(phone, key)
    pages = {  # name: (url, what shows the page is drawn)
        "jobs": ("/#/jobs", "table tbody tr"),
        "job": (job_url.removeprefix(base), "#job-curves path[data-series=loss]"),
        "models": ("/#/models", "table tbody tr"),
        "model": (model_url.removeprefix(base), "#coupling-matrix svg"),
        "modules": ("/#/modules", "table tbody tr"),
        "module": (module_url.removeprefix(base), "#module-layers svg"),
        "compose": ("/#/compose", "#picker input"),
        "datasets": ("/#/datasets/digits", "#samples img"),
    }
    for name, (url, ready) in pages.items():
        phone.goto(url)
        phone.wait_for_selector(ready, state="attached")
        _shot(phone, f"{name}-phone")
        width = phone.evaluate("document.documentElement.scrollWidth")
        assert width <= 390 + 1, f"{name}: the page is {width} px wide at 390 px"
        if name in ("jobs", "models", "modules"):
            page.goto(url)
            page.wait_for_selector(ready)
            _shot(page, f"{name}-desktop")

    # A read-only key: what needs write is not offered (the API would answer 403).
    read_key = api.post("/keys", json={"name": "viewer", "scopes": ["read"]}).json()["token"]
    viewer = _new_page(browser, base, watch)
    _sign_in(viewer, read_key)
    viewer.wait_for_selector("table tbody tr")
    expect(viewer.locator("#submit-job")).to_be_hidden()
    viewer.goto("/#/compose")
    viewer.wait_for_selector("#picker input")
    expect(viewer.locator("#compose-btn")).to_be_hidden()
    viewer.goto(job_url.removeprefix(base))
    viewer.wait_for_selector("#job-status")
    expect(viewer.locator("#cancel-job")).to_have_count(0)

    assert not watch.outside, f"requests tried to leave the machine: {watch.outside}"
    assert not watch.errors, watch.errors
