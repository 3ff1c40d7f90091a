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


def _number(text: str) -> float:
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1], 1.0)
    return float(text.rstrip("kMG")) * scale


def test_the_module_walk_through_shows_what_it_claims() -> None:
    """The README's "What reusing three classes costs" output: each ratio is the module's
    figure over the model's (as printed, up to their rounding), a latency row is there, and
    the tuned model's {3,5,8} module is at most half the model's parameters and FLOPs."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### What reusing three classes costs", 1)[1].split("\n## ", 1)[0]
    tables = re.findall(r"module for classes 3, 5, 8\n(.*?)\n└", section, re.S)
    assert len(tables) == 2, "expected the tuned and the default model's tables"
    ratios = []
    for table in tables:
        rows = {
            cells[0]: cells[1:]
            for line in table.splitlines()
            if (cells := [c.strip() for c in line.strip("│ ").split("│")]) and len(cells) == 4
        }
        assert any(name.startswith("CPU ms / image") for name in rows), rows
        figures = {}
        for name in ("parameters", "FLOPs / image"):
            module, full, ratio = rows[name]
            assert _number(module) / _number(full) == pytest.approx(float(ratio), abs=0.01)
            figures[name] = float(ratio)
        ratios.append(figures)
    tuned = ratios[0]
    assert tuned["parameters"] <= 0.5 and tuned["FLOPs / image"] <= 0.5, tuned
