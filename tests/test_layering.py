"""The layering rules of the code base, read from the source (no import needed).

- ``mwt_core`` knows nothing of HTTP, SQL or Celery, and has no import cycle (a cycle through
  a function-level import counts too: it is still two modules that need each other);
- ``app/`` imports ``worker/`` only where the process is wired together (the composition roots);
- test helpers live under ``tests/``, not in the product packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("app", "mwt_core", "worker")
# Where the process is wired together: the server's app factory and the CLI.
COMPOSITION_ROOTS = {"app/main.py", "app/cli.py", "app/cli_server.py"}
SERVICE_LIBRARIES = {"fastapi", "starlette", "sqlalchemy", "alembic", "celery", "kombu", "redis",
                     "psycopg", "uvicorn", "app", "worker"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[str]:
    """Every module name ``path`` imports, at any depth of the file (absolute names)."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_core_imports_no_service_library() -> None:
    found = [f"{p.relative_to(ROOT)}: {name}" for p in _files("mwt_core") for name in _imports(p)
             if name.split(".")[0] in SERVICE_LIBRARIES]
    assert found == [], "mwt_core must not know HTTP, SQL or Celery"


def test_app_imports_worker_only_at_composition_roots() -> None:
    found = sorted({str(p.relative_to(ROOT)) for p in _files("app") for name in _imports(p)
                    if name.split(".")[0] == "worker"} - COMPOSITION_ROOTS)
    assert found == [], "app/ reaches into worker/ outside app/main.py and the CLI's process wiring (app/cli.py, app/cli_server.py)"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_core_has_no_import_cycle() -> None:
    files = {_module_name(p): p for p in _files("mwt_core")}
    graph = {m: {n for n in _imports(p) if n in files and n != m} for m, p in files.items()}
    # A package importing its own submodules (re-exports) is not a cycle between concepts.
    for m in graph:
        graph[m] = {n for n in graph[m] if not n.startswith(m + ".")}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    # The check above must be able to fail: a two-module cycle and a self-contained chain.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_test_helpers_in_product_packages() -> None:
    helpers = [str(p.relative_to(ROOT)) for package in PRODUCT for p in _files(package)
               if p.stem in {"testing", "conftest", "fixtures"} or p.stem.startswith("test_")]
    assert helpers == []
    uses_pytest = [str(p.relative_to(ROOT)) for package in PRODUCT for p in _files(package)
                   if any(n.split(".")[0] == "pytest" for n in _imports(p))]
    assert uses_pytest == []


def test_the_api_prefix_is_written_once() -> None:
    """Routes, the client, Location headers and error messages derive the API's path from
    ``app.paths.API_PREFIX``: a literal elsewhere would keep the old path after a version bump."""
    from app.paths import API_PREFIX

    home = ROOT / "app" / "paths.py"
    literal = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "app").rglob("*.py"))
               if p != home and API_PREFIX in p.read_text()]
    assert API_PREFIX in home.read_text() and not literal, literal
