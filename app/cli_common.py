"""What every ``mwt`` service and client command shares: the Typer app, the consoles, the
``--url``/``--key``/``--json`` options, API-call error handling and tables that fit the
terminal. Commands print through ``common.out`` / ``common.err`` and make clients with
``common._client`` (looked up at call time, so tests can swap them)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="mwt",
    help="MwT Hub: modular training (MwT), per-class modules and composition, as a library CLI and a service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

SERVICE_COMMANDS = {
    "serve", "api", "worker", "migrate", "reap", "key",
    "submit", "watch", "jobs", "cancel", "models", "modules", "download", "compose",
}  # fmt: skip


# ---------------------------------------------------------------------------- helpers

UrlOpt = Annotated[str, typer.Option("--url", envvar="MWT_URL", help="API base URL.")]
KeyOpt = Annotated[
    str | None, typer.Option("--key", envvar="MWT_API_KEY", help="API key.", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


def _client(url: str, key: str | None) -> Any:
    from app.client import MwtClient

    return MwtClient(url, key)


def _call(fn: Any, *args: Any, **kw: Any) -> Any:
    import httpx

    from app.client import ApiError, ChecksumError

    try:
        return fn(*args, **kw)
    except ApiError as exc:
        _fail(f"{exc.detail} (HTTP {exc.status})")
    except ChecksumError as exc:
        _fail(str(exc), code=2)
    except httpx.TransportError as exc:
        _fail(f"cannot reach the API: {exc}; is `mwt serve` running (MWT_URL)?")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


@dataclass(frozen=True)
class Col:
    """A table column: ``kind`` "id" and "num" never wrap (a split id or number misleads);
    "text" is cut with an ellipsis at ``max_width``. Columns with ``drop`` > 0 are left out,
    highest first, while the table is wider than the terminal."""

    name: str
    kind: str = "text"
    drop: int = 0
    max_width: int | None = None


def _compact(n: float | None, unit: str = "") -> str:
    """793000 -> '793k', 11173962 -> '11.2M': a number that fits a narrow column."""
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            v = n / scale
            text = f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"
            return f"{text.removesuffix('.0')}{suffix}{unit}"
    return f"{n:g}{unit}"


def _short_id(v: str | None, n: int = 8) -> str:
    """The first ``n`` characters of a uuid or digest (what `git` shows; unique in practice)."""
    return "-" if v is None else str(v)[:n]


def _build_table(title: str, columns: list[Col], rows: list[list[str]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        if c.kind == "text":
            t.add_column(c.name, no_wrap=True, overflow="ellipsis", max_width=c.max_width)
        else:
            t.add_column(c.name, no_wrap=True, overflow="ellipsis",
                         justify="right" if c.kind == "num" else "left")
    for r in rows:
        t.add_row(*r)
    return t


def _table(
    title: str, columns: list[Col | str], rows: list[list[Any]], width: int | None = None
) -> Table:
    """A table that fits ``width`` (the terminal's) by leaving out droppable columns first."""
    cols = [c if isinstance(c, Col) else Col(c) for c in columns]
    cells = [["-" if v is None else str(v) for v in r] for r in rows]
    width = width or out.width
    keep = list(range(len(cols)))
    while True:
        table = _build_table(title, [cols[i] for i in keep], [[r[i] for i in keep] for r in cells])
        droppable = [i for i in keep if cols[i].drop > 0]
        if not droppable or out.measure(table, options=out.options.update_width(10_000)).maximum <= width:
            return table
        keep.remove(max(droppable, key=lambda i: cols[i].drop))


def _print_page(
    page: dict[str, Any],
    as_json: bool,
    title: str,
    columns: list[tuple[Col, Callable[[dict], Any]]],
) -> None:
    """A list endpoint's page: raw JSON, or a table with one column per ``columns`` entry."""
    if as_json:
        out.print_json(json.dumps(page))
        return
    rows = [[cell(item) for _, cell in columns] for item in page["items"]]
    out.print(_table(f"{title} ({page['total']})", [c for c, _ in columns], rows))
