"""Write (or check) the documentation's generated tables from the code that defines them.

    python scripts/readme.py           # exit 1 and a diff when a page is out of date
    python scripts/readme.py --write   # rewrite the generated blocks in place

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``;
everything else in a page is hand-written and left alone. The pages (``PAGES``), their blocks and
the blocks' sources:

- ``docs/configuration.md``: ``server-settings``, from ``app.settings.Settings`` (names,
  defaults, descriptions), and ``client-settings``, every ``mwt`` option that reads an
  environment variable;
- ``docs/defaults.md``: ``training-defaults``, ``mwt_core.config`` next to what ``mwt train``,
  ``POST /api/v1/jobs``, ``mwt submit`` and ``mwt demo`` run with when given no options, and
  ``other-defaults``, the composition and modularization entry points.

``tests/scripts/test_readme.py`` fails when a block differs from what this script writes.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REGEN = "python scripts/readme.py --write"

Table = list[list[str]]


# ------------------------------------------------------------------------------ formatting


def fmt(value: Any) -> str:
    """A default as the documentation shows it: ``code``, ``unset`` for None or an empty string."""
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    return f"`{value}`"


def markdown(header: list[str], rows: Table) -> str:
    """A GitHub table; ``|`` inside cells is escaped."""
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


# ----------------------------------------------------------------------------- the sources


def _commands() -> dict[str, Any]:
    """The ``mwt`` console script's click commands by name (mwt_core's mounted ones included)."""
    import typer.main

    from app.cli import app

    group = typer.main.get_command(app)
    return dict(group.commands)  # type: ignore[attr-defined]


def _param(command: Any, *names: str) -> Any | None:
    for p in command.params:
        if p.name in names:
            return p
    return None


def server_settings() -> str:
    """One row per ``Settings`` field: the environment variable, its default and meaning."""
    from app.settings import Settings

    prefix = str(Settings.model_config.get("env_prefix", ""))
    rows = []
    for name, field in Settings.model_fields.items():
        rows.append([f"`{prefix}{name.upper()}`", fmt(field.default), field.description or ""])
    return markdown(["variable", "default", "meaning"], rows)


def client_settings() -> str:
    """Every ``mwt`` option read from an environment variable, with the commands that take it."""
    found: dict[str, dict[str, Any]] = {}
    for cmd_name, cmd in sorted(_commands().items()):
        for p in cmd.params:
            envvars = [p.envvar] if isinstance(p.envvar, str) else list(p.envvar or [])
            for env in envvars:
                entry = found.setdefault(
                    env, {"opts": p.opts, "default": p.default, "help": p.help, "commands": []}
                )
                entry["commands"].append(cmd_name)
    rows = [
        [f"`{env}`", ", ".join(f"`{o}`" for o in e["opts"]), fmt(e["default"]), e["help"] or "",
         ", ".join(e["commands"])]
        for env, e in sorted(found.items())
    ]
    return markdown(["variable", "option", "default", "meaning", "commands"], rows)


def _job_schema_defaults() -> dict[str, Any]:
    from app.schemas.jobs import JobCreate

    return {n: f.default for n, f in JobCreate.model_fields.items() if not f.is_required()}


def training_defaults() -> str:
    """What each entry point trains when given no options; ``*`` marks values it cannot change."""
    from app.settings import Settings
    from mwt_core.cli import DEMO_DATASET, demo_config
    from mwt_core.config import DEFAULT_DATASET, ModularizeConfig, TrainConfig

    core: dict[str, Any] = {"dataset": DEFAULT_DATASET}
    core.update({f.name: f.default for f in fields(TrainConfig)})
    core["tau"] = ModularizeConfig.tau
    commands = _commands()

    def from_cli(command: str, fallback: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
        cmd = commands[command]
        out: dict[str, tuple[Any, bool]] = {}
        for key in core:
            p = _param(cmd, key)
            if p is not None:
                out[key] = (p.default, True)
            elif key == "modular" and (flag := _param(cmd, "standard")) is not None:
                out[key] = (not flag.default, True)  # `--standard` turns MwT off
            else:
                out[key] = (fallback[key], False)
        return out

    api_defaults = _job_schema_defaults()
    api = {k: (api_defaults[k], True) if k in api_defaults else (core[k], False) for k in core}
    api["device"] = (Settings.model_fields["device"].default, False)  # MWT_DEVICE of the worker
    train = from_cli("train", core)
    submit = from_cli("submit", {k: v for k, (v, _) in api.items()})
    demo_cmd = commands["demo"]

    def demo_default(name: str) -> Any:
        p = _param(demo_cmd, name)
        if p is None:
            raise SystemExit(f"error: `mwt demo` has no option {name!r}; update scripts/readme.py")
        return p.default

    demo_cfg = demo_config(**{k: demo_default(k) for k in ("epochs", "width", "seed", "device")})
    demo_values = {"dataset": DEMO_DATASET, "tau": demo_default("tau"),
                   **{f.name: getattr(demo_cfg, f.name) for f in fields(TrainConfig)}}
    demo = {k: (demo_values[k], _param(demo_cmd, k) is not None) for k in core}

    # What ``None`` means differs per field: mask_lr falls back to lr, width to the
    # architecture's default, target_krr to no kernel budget, init_from to no weights.
    from mwt_core.models import default_width

    none_means = {"mask_lr": "= lr", "width": f"{fmt(default_width(core['arch']))} ({core['arch']}'s)",
                  "target_krr": "none (no budget)"}

    def cell(key: str, value: Any, option: bool) -> str:
        text = none_means.get(key, "none") if value is None else fmt(value)
        return text if option else text + " *"

    rows = [
        [f"`{k}`", cell(k, core[k], True), *(cell(k, *col[k]) for col in (train, api, submit, demo))]
        for k in core
    ]
    return markdown(
        ["setting", "`mwt_core.config`", "`mwt train`", "`POST /api/v1/jobs {}`", "`mwt submit`",
         "`mwt demo`"],
        rows,
    )


def other_defaults() -> str:
    """Composition and re-modularization defaults at each entry point, with their source."""
    from app.schemas.compositions import CompositionCreate
    from mwt_core.compose_options import DEFAULT_COMBINE, DEFAULT_PER_CLASS
    from mwt_core.config import ModularizeConfig

    commands = _commands()
    api = CompositionCreate.model_fields
    rows: Table = []

    def add(entry: str, option: str, value: Any, source: str) -> None:
        rows.append([entry, option, fmt(value), source])

    for command in ("compose", "compose-local"):
        cmd = commands[command]
        for names, source in (
            (("combine",), "`mwt_core.compose_options.DEFAULT_COMBINE`"),
            (("calibration", "calibration_per_class", "calibrate"),
             "`mwt_core.compose_options.DEFAULT_PER_CLASS`"),
        ):
            p = _param(cmd, *names)
            if p is not None:
                add(f"`mwt {command}`", f"`{p.opts[0]}`", p.default, source)
    add("`POST /api/v1/compositions`", "`combine`", api["combine"].default,
        "`mwt_core.compose_options.DEFAULT_COMBINE`")
    add("`POST /api/v1/compositions`", "`calibration_per_class`",
        api["calibration_per_class"].default, "`mwt_core.compose_options.DEFAULT_PER_CLASS`")
    for command in ("modularize", "train", "demo"):
        p = _param(commands[command], "tau")
        if p is not None:
            add(f"`mwt {command}`", "`--tau`", p.default, "`mwt_core.config.ModularizeConfig.tau`")
    # A class set's module: tau chosen on the validation slice where the model has one.
    auto_tau = "`auto` with a validation slice, else the model's"
    p = _param(commands["extract"], "tau")
    if p is not None:
        rows.append(["`mwt extract`", "`--tau`", auto_tau, "`mwt_core.pipeline.module_tau`"])
    p = _param(commands["extract"], "margin_pp")
    if p is not None:
        add("`mwt extract`", f"`{p.opts[0]}`", p.default,
            "`mwt_core.config.ModularizeConfig.margin_pp`")
    rows.append(["`POST /api/v1/compositions`", "`tau`", auto_tau,
                 "`mwt_core.pipeline.module_tau`"])
    add("`POST /api/v1/compositions`", "`margin_pp`", api["margin_pp"].default,
        "`mwt_core.config.ModularizeConfig.margin_pp`")
    # The sources themselves, so a differing entry point shows against them.
    add("(library)", "`combine`, per class", f"{DEFAULT_COMBINE}, {DEFAULT_PER_CLASS}",
        "`mwt_core.compose_options`")
    add("(library)", "`tau`", ModularizeConfig.tau, "`mwt_core.config.ModularizeConfig`")
    add("(library)", "`margin_pp`", ModularizeConfig.margin_pp,
        "`mwt_core.config.ModularizeConfig`")
    return markdown(["entry point", "option", "default", "defined in"], rows)


BLOCKS: dict[str, Callable[[], str]] = {
    "server-settings": server_settings,
    "client-settings": client_settings,
    "training-defaults": training_defaults,
    "other-defaults": other_defaults,
}

# The page (relative to the repository root) that holds each block; every block is in one page.
PAGES: dict[str, tuple[str, ...]] = {
    "docs/configuration.md": ("server-settings", "client-settings"),
    "docs/defaults.md": ("training-defaults", "other-defaults"),
}


# ------------------------------------------------------------------------------- the pages


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- generated: {re.escape(name)} .*?-->\n)(.*?)(<!-- end generated: {re.escape(name)} -->)",
        re.S,
    )


def render(text: str, names: Iterable[str], page: str = "the page") -> str:
    """``text`` (``page``) with each block of ``names`` replaced by what its source gives today."""
    for name in names:
        pattern = _pattern(name)
        if not pattern.search(text):
            raise SystemExit(f"error: {page} has no block `<!-- generated: {name} ... -->`")
        body = BLOCKS[name]()

        def fill(m: re.Match[str], body: str = body) -> str:
            return m.group(1) + body + "\n" + m.group(3)

        text = pattern.sub(fill, text)
    return text


def stale_blocks(text: str, names: Iterable[str], page: str = "the page") -> list[str]:
    """Names of the blocks of ``names`` in ``text`` whose content differs from their source."""
    names = list(names)
    fresh = render(text, names, page)
    return [
        name for name in names
        if _pattern(name).search(text).group(2) != _pattern(name).search(fresh).group(2)  # type: ignore[union-attr]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the pages' generated blocks")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the tree whose pages (docs/...) are read and written")
    args = parser.parse_args(argv)
    stale_pages = 0
    for page, names in PAGES.items():
        path = args.root / page
        text = path.read_text()
        fresh = render(text, names, page)
        if args.write:
            if fresh != text:
                path.write_text(fresh)
            print(f"{page}: {len(names)} generated blocks written")
        elif fresh == text:
            print(f"{page}: {len(names)} generated blocks up to date")
        else:
            stale_pages += 1
            sys.stdout.writelines(difflib.unified_diff(
                text.splitlines(True), fresh.splitlines(True), page, "generated"))
            print(f"error: {page} is out of date ({', '.join(stale_blocks(text, names, page))}); "
                  f"run `{REGEN}`", file=sys.stderr)
    return 1 if stale_pages else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from anywhere: the project's packages first
    raise SystemExit(main())
