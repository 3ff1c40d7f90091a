"""The service CLI (`app/cli.py` + `app/client.py`) against the app, through TestClient's transport."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import app as cli
from app.client import MwtClient
from app.db.models import Model


@pytest.fixture
def use_app(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """`mwt` client commands talk to the test app."""
    token = client.headers["Authorization"].removeprefix("Bearer ")
    monkeypatch.setattr(
        "app.cli._client",
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
