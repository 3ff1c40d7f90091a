"""Where the API lives: its path prefix, the one place it is written (routers, the client, error
messages and Location headers derive from it)."""

from __future__ import annotations

API_PREFIX = "/api/v1"
