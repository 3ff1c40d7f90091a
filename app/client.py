"""A small Python client for the MwT Hub REST API (httpx).

from app.client import MwtClient
hub = MwtClient("http://127.0.0.1:8000", api_key="mwt_...")
job = hub.submit_job(dataset="digits", arch="simcnn", width=0.125, epochs=2)
job = hub.wait(job["id"])
mod = hub.modules(dataset="digits", class_name="3")["items"][0]
hub.download_module(mod["id"], "module-3")          # sha256 verified, resumable
comp = hub.compose(job["model_id"], [3, 5, 8])      # accuracy on the test split
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.paths import API_PREFIX
from mwt_core.checksums import sha256_file

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: str, method: str = "", url: str = "") -> None:
        super().__init__(f"HTTP {status} from {method} {url}: {detail}")
        self.status = status
        self.detail = detail


class ChecksumError(RuntimeError):
    pass


@dataclass
class Download:
    path: Path  # the archive
    sha256: str
    size: int
    files: list[Path]  # extracted files (empty when extract=False)
    resumed_from: int = 0
    skipped: bool = False  # the file on disk already had the expected sha256


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        d = body["detail"]
        return d if isinstance(d, str) else json.dumps(d)
    return json.dumps(body)[:500]


class MwtClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("MWT_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("MWT_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> MwtClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        resp = self.http.request(method, path, **kw)
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, _detail(resp), method, str(resp.request.url))
        return resp

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()

    @staticmethod
    def _params(**filters: Any) -> dict[str, Any]:
        return {k: v for k, v in filters.items() if v is not None}

    # ------------------------------------------------------------------ service
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def ready(self) -> dict[str, Any]:
        resp = self.http.get("/ready")
        return resp.json()

    def architectures(self) -> list[dict[str, Any]]:
        return self._json("GET", f"{API_PREFIX}/architectures")

    # ------------------------------------------------------------------ datasets
    def datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", f"{API_PREFIX}/datasets")

    def upload_dataset(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        path = Path(path)
        with open(path, "rb") as fh:
            data = {"name": name} if name else {}
            return self._json(
                "POST",
                f"{API_PREFIX}/datasets",
                files={"file": (path.name, fh, "application/octet-stream")},
                data=data,
            )

    def upload_weights(self, name: str, path: str | Path) -> dict[str, Any]:
        """Upload a safetensors state dict that jobs can start from (``init_from=name``)."""
        with open(path, "rb") as fh:
            return self._json("PUT", f"{API_PREFIX}/weights/{name}", content=fh,
                              headers={"Content-Type": "application/octet-stream"})

    def weights(self) -> list[dict[str, Any]]:
        """The uploaded weights (name, tensors, size)."""
        return self._json("GET", f"{API_PREFIX}/weights")

    def delete_weights(self, name: str) -> None:
        """Delete uploaded weights (admin key; refused while a queued or running job uses them)."""
        self.request("DELETE", f"{API_PREFIX}/weights/{name}")

    # ------------------------------------------------------------------ jobs
    def submit_job(self, idempotency_key: str | None = None, **params: Any) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", f"{API_PREFIX}/jobs", json=self._params(**params), headers=headers)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"{API_PREFIX}/jobs/{job_id}")

    def jobs(self, **filters: Any) -> dict[str, Any]:
        return self._json("GET", f"{API_PREFIX}/jobs", params=self._params(**filters))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"{API_PREFIX}/jobs/{job_id}/cancel")

    def events(
        self, job_id: str, timeout: float | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Server-Sent Events of a job: ``(event, job)`` pairs until the ``end`` event."""
        with self.http.stream(
            "GET", f"{API_PREFIX}/jobs/{job_id}/events", timeout=httpx.Timeout(timeout, connect=10.0)
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiError(resp.status_code, _detail(resp), "GET", str(resp.request.url))
            event, data = "message", list[str]()
            for line in resp.iter_lines():
                if line == "":
                    if data:
                        payload = json.loads("\n".join(data))
                        yield event, payload
                        if event == "end":
                            return
                    event, data = "message", []
                elif line.startswith(":"):
                    continue
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())

    def wait(
        self,
        job_id: str,
        timeout: float = 3600.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 1.0,
    ) -> dict[str, Any]:
        """Follow a job until it ends (SSE, falling back to polling); returns the final job."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                for _, job in self.events(job_id, timeout=max(1.0, deadline - time.monotonic())):
                    if on_update:
                        on_update(job)
                    if job.get("status") in TERMINAL:
                        return self.job(job_id)
            except (httpx.TransportError, json.JSONDecodeError):
                pass
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f} s")

    # ------------------------------------------------------------------ registry
    def models(self, **filters: Any) -> dict[str, Any]:
        return self._json("GET", f"{API_PREFIX}/models", params=self._params(**filters))

    def model(self, model_id: int) -> dict[str, Any]:
        return self._json("GET", f"{API_PREFIX}/models/{model_id}")

    def delete_model(self, model_id: int, force: bool = False) -> None:
        self.request("DELETE", f"{API_PREFIX}/models/{model_id}", params={"force": str(force).lower()})

    def modules(self, **filters: Any) -> dict[str, Any]:
        return self._json("GET", f"{API_PREFIX}/modules", params=self._params(**filters))

    def module(self, module_id: int) -> dict[str, Any]:
        return self._json("GET", f"{API_PREFIX}/modules/{module_id}")

    def compose(
        self, model_id: int, classes: list[int | str], finetune: dict[str, Any] | None = None,
        tau: float | str | None = None, margin_pp: float | None = None,
    ) -> dict[str, Any]:
        """The module of ``classes`` of one model; ``tau`` ("auto" or a number) and
        ``margin_pp`` default to the server's (auto where the model has a validation slice)."""
        body: dict[str, Any] = {"model_id": model_id, "classes": classes}
        if finetune is not None:
            body["finetune"] = finetune
        if tau is not None:
            body["tau"] = tau
        if margin_pp is not None:
            body["margin_pp"] = margin_pp
        return self._json("POST", f"{API_PREFIX}/compositions", json=body)

    def compose_across(
        self,
        sources: list[tuple[int, list[int | str]]],
        calibration_per_class: int | None = None,
        combine: str | None = None,
    ) -> dict[str, Any]:
        """Compose classes of several models: ``[(model_id, classes), ...]`` in output order;
        ``combine`` and ``calibration_per_class`` default to the server's (the best measured)."""
        body: dict[str, Any] = {
            "sources": [{"model_id": m, "classes": list(c)} for m, c in sources],
        }
        if calibration_per_class is not None:
            body["calibration_per_class"] = calibration_per_class
        if combine is not None:
            body["combine"] = combine
        return self._json("POST", f"{API_PREFIX}/compositions", json=body)

    def compose_modules(
        self,
        module_ids: list[int],
        calibration_per_class: int | None = None,
        combine: str | None = None,
    ) -> dict[str, Any]:
        """Compose stored per-class modules (ids, in output order) as the parts of one
        classifier; ``mwt_core.module_parts.compose_modules`` rebuilds it from their downloads."""
        body: dict[str, Any] = {"modules": list(module_ids)}
        if calibration_per_class is not None:
            body["calibration_per_class"] = calibration_per_class
        if combine is not None:
            body["combine"] = combine
        return self._json("POST", f"{API_PREFIX}/compositions", json=body)

    def composition(self, composition_id: int) -> dict[str, Any]:
        return self._json("GET", f"{API_PREFIX}/compositions/{composition_id}")

    # ------------------------------------------------------------------ downloads
    def download(
        self,
        url: str,
        dest_dir: str | Path,
        expected_sha256: str | None = None,
        extract: bool = True,
    ) -> Download:
        """Download an artifact archive into ``dest_dir``, resuming a partial file, checking sha256."""
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        head = self.request("HEAD", url)
        etag = head.headers.get("etag", "").strip('"')
        expected = expected_sha256 or etag
        name = _filename(head.headers.get("content-disposition")) or "artifact.tar"
        final = dest_dir / name
        part = dest_dir / f"{name}.part"
        if expected and final.is_file() and sha256_file(final) == expected:
            # Already downloaded and verified: reuse it rather than fetch the same bytes again.
            return Download(final, expected, final.stat().st_size, _extract(final, dest_dir, extract),
                            skipped=True)
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-", "If-Range": f'"{etag}"'} if offset and etag else {}
        resumed = 0
        with self.http.stream("GET", url, headers=headers) as resp:
            if resp.status_code == 416:  # the part file is complete (or stale): start over
                part.unlink(missing_ok=True)
                return self.download(url, dest_dir, expected_sha256, extract)
            if resp.status_code >= 400:
                resp.read()
                raise ApiError(resp.status_code, _detail(resp), "GET", url)
            mode = "ab" if resp.status_code == 206 else "wb"
            resumed = offset if resp.status_code == 206 else 0
            with open(part, mode) as fh:
                for chunk in resp.iter_bytes(1 << 20):
                    fh.write(chunk)
        digest = sha256_file(part)
        if expected and digest != expected:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"checksum mismatch for {name}: expected {expected}, got {digest}")
        os.replace(part, final)
        return Download(
            final, digest, final.stat().st_size, _extract(final, dest_dir, extract), resumed
        )

    def download_module(
        self, module_id: int, dest_dir: str | Path, extract: bool = True
    ) -> Download:
        meta = self.module(module_id)
        return self.download(
            f"{API_PREFIX}/modules/{module_id}/download", dest_dir, meta["sha256"], extract
        )

    def download_model(self, model_id: int, dest_dir: str | Path, extract: bool = True) -> Download:
        meta = self.model(model_id)
        return self.download(
            f"{API_PREFIX}/models/{model_id}/download", dest_dir, meta.get("sha256"), extract
        )

    def download_composition(
        self, composition_id: int, dest_dir: str | Path, extract: bool = True
    ) -> Download:
        meta = self.composition(composition_id)
        return self.download(
            f"{API_PREFIX}/compositions/{composition_id}/download", dest_dir, meta.get("sha256"), extract
        )


def _extract(archive: Path, dest_dir: Path, extract: bool) -> list[Path]:
    """Unpack ``archive`` next to itself (into ``dest_dir/<stem>``) when asked; the files."""
    if not extract:
        return []
    from app.storage import safe_extract

    return safe_extract(archive, dest_dir / archive.stem)


def _filename(disposition: str | None) -> str | None:
    if not disposition:
        return None
    for part in disposition.split(";"):
        part = part.strip()
        if part.startswith("filename="):
            name = part[len("filename=") :].strip('"')
            return Path(name).name or None
    return None

