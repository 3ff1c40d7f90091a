"""The README stays a short guide, and the documentation's generated tables equal what
scripts/readme.py writes from the code today."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = "docs/configuration.md"
DEFAULTS = "docs/defaults.md"
README_MAX_LINES = 300


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_script", ROOT / "scripts" / "readme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def readme() -> ModuleType:
    return _script()


def _page(name: str) -> str:
    return (ROOT / name).read_text()


def test_the_readme_is_a_ten_minute_read() -> None:
    """Issue 25: a newcomer's guide of at most 300 lines; reference material, the walk-through
    and benchmark figures live in docs/ and bench/results/."""
    lines = _page("README.md").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move reference "
        "material to docs/ and figures to bench/results/"
    )


def test_the_readme_quotes_no_measurement() -> None:
    """Measured figures (accuracies, ratios, timings) go stale; they live in generated pages and
    bench/results/, which the README links, not in the README."""
    text = _FENCE.sub("", _page("README.md"))
    found = re.findall(r"\b\d+(?:\.\d+)?(?: ?%| ?pp\b|x\b| ?ms\b| ?s\b| min\b)", text)
    assert not found, f"README.md quotes measurements {found}: link bench/results/ or docs/ instead"


def test_every_block_has_one_page(readme: ModuleType) -> None:
    placed = [name for names in readme.PAGES.values() for name in names]
    assert sorted(placed) == sorted(readme.BLOCKS)


def test_generated_tables_are_up_to_date(readme: ModuleType) -> None:
    for page, names in readme.PAGES.items():
        stale = readme.stale_blocks(_page(page), names, page)
        assert not stale, f"{page} is out of date ({stale}): run `python scripts/readme.py --write`"


def test_a_changed_default_makes_the_check_fail(
    readme: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reads the code, not the pages: a default changed in the one place it is
    defined flags the tables that show it (and only those)."""
    from app.settings import Settings
    from mwt_core.config import TrainConfig

    configuration, defaults = _page(CONFIGURATION), _page(DEFAULTS)
    monkeypatch.setattr(Settings.model_fields["sse_poll_s"], "default", 0.25)
    assert readme.stale_blocks(configuration, readme.PAGES[CONFIGURATION]) == ["server-settings"]
    assert readme.stale_blocks(defaults, readme.PAGES[DEFAULTS]) == []
    monkeypatch.undo()
    # A TrainConfig default reaches the core column of the defaults table.
    fields = dict(TrainConfig.__dataclass_fields__)
    monkeypatch.setattr(fields["epochs"], "default", 123)
    monkeypatch.setattr(TrainConfig, "__dataclass_fields__", fields)
    assert "training-defaults" in readme.stale_blocks(defaults, readme.PAGES[DEFAULTS])


def test_every_setting_and_client_variable_is_documented() -> None:
    from app.settings import Settings

    text = _page(CONFIGURATION)
    for name in Settings.model_fields:
        assert f"`MWT_{name.upper()}`" in text
    for env in ("MWT_URL", "MWT_API_KEY"):
        assert re.search(rf"\| `{env}` \| `--(url|key)` \|", text), env


def test_the_command_line_check_exits_non_zero_on_a_stale_page(
    readme: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "docs").mkdir()
    for page in readme.PAGES:
        shutil.copy(ROOT / page, tmp_path / page)
    text = _page(CONFIGURATION)
    stale = tmp_path / CONFIGURATION
    stale.write_text(text.replace("| `MWT_DATA_DIR` | `.mwt` |", "| `MWT_DATA_DIR` | `.old` |"))
    assert readme.main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert CONFIGURATION in err and "server-settings" in err
    assert "python scripts/readme.py --write" in err and DEFAULTS not in err
    assert readme.main(["--root", str(tmp_path), "--write"]) == 0
    assert stale.read_text() == text
    assert readme.main(["--root", str(tmp_path)]) == 0


def _number(text: str) -> float:
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1], 1.0)
    return float(text.rstrip("kMG")) * scale


def test_the_module_walk_through_shows_what_it_claims() -> None:
    """docs/cli.md's "What reusing three classes costs" output: each ratio is the module's
    figure over the model's (as printed, up to their rounding), a latency row is there, and
    the tuned model's {3,5,8} module is at most half the model's parameters and FLOPs."""
    text = _page("docs/cli.md")
    section = text.split("## What reusing three classes costs", 1)[1].split("\n## ", 1)[0]
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


# ---------------------------------------------------------------------------------- links

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _broken_links(path: Path) -> list[str]:
    broken = []
    for target in _LINK.findall(_FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # an external address
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    return broken


def _pages() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "bench" / "results").glob("*.md")),
    ]


def test_links_between_the_pages_resolve() -> None:
    """Sections moved out of the README keep working links: every relative link of the README,
    docs/ and bench/results/ names a file that exists, and a heading that exists in it."""
    broken = {str(p.relative_to(ROOT)): b for p in _pages() if (b := _broken_links(p))}
    assert not broken, broken


def test_the_link_check_finds_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Kernel budget (full)\n")
    page.write_text(
        "[a](other.md#kernel-budget-full) [b](gone.md) [c](other.md#nope) "
        "[d](https://example.org/x)\n```\n[e](inside-a-fence.md)\n```\n"
    )
    assert _broken_links(page) == ["gone.md (no such file)", "other.md#nope (no such heading)"]
