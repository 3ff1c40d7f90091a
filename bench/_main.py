"""The tail every benchmark shares: parse, run, a readable table, then ONE final line of JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console


def bench_main(
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    render: Callable[[dict[str, Any], Console], None],
    argv: list[str] | None = None,
) -> int:
    """Run a benchmark; bad options (unknown architecture, sizes, no CUDA) are one line, exit 1."""
    try:  # parsing fills in defaults that depend on the architecture, so it can refuse too
        result = run(parse_args(argv))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    render(result, Console(width=None if sys.stdout.isatty() else 120))
    sys.stdout.flush()
    print(json.dumps(result))
    return 0
