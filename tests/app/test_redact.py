"""Messages clients read name the server's directories by their settings, never by path."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from app.redact import path_scrubber
from app.settings import Settings


def test_each_directory_is_named_by_its_setting_in_every_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    settings = Settings(data_dir=Path("state"), artifact_dir=tmp_path / "store" / "art")
    scrub = path_scrubber(settings)
    data = (tmp_path / "state").resolve()
    assert scrub(f"no weights file at {data}/weights/a.safetensors") == (
        "no weights file at <MWT_DATA_DIR>/weights/a.safetensors"
    )
    assert scrub("cannot read state/uploads/x.npz") == "cannot read <MWT_DATA_DIR>/uploads/x.npz"
    assert scrub(f"'{tmp_path}/store/art/models/3/model'") == "'<MWT_ARTIFACT_DIR>/models/3/model'"
    tmp = Path(tempfile.gettempdir()).resolve()
    assert scrub(f"[Errno 28] No space left on device: '{tmp}/export-x.onnx'") == (
        "[Errno 28] No space left on device: '<TMPDIR>/export-x.onnx'"
    )


def test_only_whole_directory_names_are_replaced() -> None:
    scrub = path_scrubber(Settings(data_dir=Path("/srv/mwt")))
    other = "/srv/mwt2/x and /home/srv/mwt/y"
    assert scrub(other) == other  # a longer name, and the same name inside another path
    assert scrub("/srv/mwt") == "<MWT_DATA_DIR>"
    assert scrub("/srv/mwt2/x or /srv/mwt/artifacts2") == "/srv/mwt2/x or <MWT_DATA_DIR>/artifacts2"
    assert scrub("PUT weights to /api/v1/weights/{name}") == "PUT weights to /api/v1/weights/{name}"
