"""README.md's generated tables equal what scripts/readme.py writes from the code today."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_script", ROOT / "scripts" / "readme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def readme() -> ModuleType:
    return _script()


def test_readme_tables_are_up_to_date(readme: ModuleType) -> None:
    text = (ROOT / "README.md").read_text()
    stale = readme.stale_blocks(text)
    assert not stale, f"README.md is out of date ({stale}): run `python scripts/readme.py --write`"


def test_a_changed_default_makes_the_check_fail(
    readme: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The check reads the code, not the README: a default changed in the one place it is
    defined flags the tables that show it (and only those)."""
    from app.settings import Settings
    from mwt_core.config import TrainConfig

    text = (ROOT / "README.md").read_text()
    monkeypatch.setattr(Settings.model_fields["sse_poll_s"], "default", 0.25)
    assert readme.stale_blocks(text) == ["server-settings"]
    monkeypatch.undo()
    # A TrainConfig default reaches the core column of the defaults table.
    fields = dict(TrainConfig.__dataclass_fields__)
    monkeypatch.setattr(fields["epochs"], "default", 123)
    monkeypatch.setattr(TrainConfig, "__dataclass_fields__", fields)
    assert "training-defaults" in readme.stale_blocks(text)


def test_every_setting_and_client_variable_is_documented(readme: ModuleType) -> None:
    from app.settings import Settings

    text = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`MWT_{name.upper()}`" in text
    for env in ("MWT_URL", "MWT_API_KEY"):
        assert re.search(rf"\| `{env}` \| `--(url|key)` \|", text), env


def test_the_command_line_check_exits_non_zero_on_a_stale_readme(
    readme: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    stale.write_text(text.replace("| `MWT_DATA_DIR` | `.mwt` |", "| `MWT_DATA_DIR` | `.old` |"))
    assert readme.main(["--readme", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "server-settings" in err and "python scripts/readme.py --write" in err
    assert readme.main(["--readme", str(stale), "--write"]) == 0
    assert stale.read_text() == text
