"""``mwt``: mwt_core's commands (train, modularize, extract, ...) plus the service's.

Service (app/cli_server.py):  serve (embedded: API + executor + SQLite), api, worker, migrate, reap, key
Client (app/cli_client.py):   submit, upload-weights, weights, watch, jobs, cancel, models, modules,
                              download, compose
Client commands talk to ``--url`` (MWT_URL, default http://127.0.0.1:8000) with ``--key``
(MWT_API_KEY).
"""

from __future__ import annotations

import copy
import logging

from app import cli_client, cli_server  # noqa: F401  (importing registers their commands)
from app.cli_common import SERVICE_COMMANDS, app

__all__ = ["app", "main"]


def _mount_core() -> None:
    """Add mwt_core's commands and groups at the top level (a clash keeps ours, theirs gets '-local')."""
    try:
        from mwt_core.cli import app as core_app
    except ImportError as exc:  # pragma: no cover - the core CLI is part of the project
        logging.getLogger(__name__).debug("mwt_core.cli not importable: %s", exc)
        return
    # Copies: renaming must not change mwt_core's own CLI (`python -m mwt_core.cli compose`).
    for info in core_app.registered_commands:
        name = info.name or (info.callback.__name__.replace("_", "-") if info.callback else None)
        if name in SERVICE_COMMANDS:
            info = copy.copy(info)
            info.name = f"{name}-local"
        app.registered_commands.append(info)
    for group in core_app.registered_groups:
        if group.name in SERVICE_COMMANDS:
            group = copy.copy(group)
            group.name = f"{group.name}-local"
        app.registered_groups.append(group)


# Service commands first in `mwt --help`, then the client's (each module registered its
# commands when imported; the sort is stable).
app.registered_commands.sort(key=lambda c: getattr(c.callback, "__module__", "") != cli_server.__name__)
_mount_core()


def main() -> None:
    """Console-script entry point (``mwt = app.cli:main``)."""
    app(prog_name="mwt")


if __name__ == "__main__":
    main()
