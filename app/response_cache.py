"""A short-lived cache of the registry's read answers (module and model queries).

Registry queries are the hot path of a model hub: many clients asking the same module list.
Answering one costs a few milliseconds of CPU, most of it the framework (routing,
dependencies, validation, serialisation), so one process tops out at a few hundred answers a
second. This pure ASGI middleware keeps recent ``200`` answers of the read-only registry
routes and replays them without entering the app.

What keeps it correct:

- entries are per API key (visibility and scope depend on the key) and per exact path and
  query string; the key itself is still verified on every request (``KeyFirstMiddleware``
  runs first, so a revoked key is refused as before);
- any request that can change state (not GET/HEAD) through this process empties the cache,
  before and after it runs, and an answer computed while such a request ran is not stored;
- changes made elsewhere (a job process publishing its model, another API process) are seen
  once an entry is ``ttl_s`` old (``MWT_RESPONSE_CACHE_S``; 0 turns the cache off);
- only JSON answers of bounded size are kept, in a bounded LRU; downloads, exports, event
  streams and conditional or range requests always go to the app;
- one request computes a missing or expired answer while the others asking for it wait
  for that answer, so a popular entry's expiry does not send every waiting client to the
  database at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CACHE_HEADER = b"x-mwt-cache"
# Request headers that make an answer depend on more than the path, query and key.
_UNCACHEABLE_REQUEST_HEADERS = frozenset({b"range", b"if-none-match", b"if-modified-since"})
# How long a request waits for another one computing the same answer before computing it too.
_FILL_WAIT_S = 5.0
_SKIP_SEGMENTS = ("/download", "/export", "/events", "/torchscript", "/onnx", "/predict")


@dataclass
class _Entry:
    stored_at: float
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class ResponseCacheMiddleware:
    """Replays recent ``200`` JSON answers of GET requests under ``prefixes`` (module doc)."""

    def __init__(self, app: ASGIApp, prefixes: Iterable[str], ttl_s: float,
                 max_entries: int = 1024, max_body_bytes: int = 512 * 1024) -> None:
        self.app = app
        self.prefixes = tuple(prefixes)
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_body_bytes = max_body_bytes
        self._entries: OrderedDict[tuple[int, str, bytes], _Entry] = OrderedDict()
        self._generation = 0  # bumped by every state-changing request (start and end)
        self._writes_running = 0
        self._inflight: dict[tuple[int, str, bytes], asyncio.Event] = {}

    def clear(self) -> None:
        """Forget every entry (the registry changed)."""
        self._entries.clear()
        self._generation += 1

    def _cacheable(self, scope: Scope) -> bool:
        path: str = scope["path"]
        if not path.startswith(self.prefixes) or any(s in path for s in _SKIP_SEGMENTS):
            return False
        return not any(name in _UNCACHEABLE_REQUEST_HEADERS for name, _ in scope["headers"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.ttl_s <= 0:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await self._write(scope, receive, send)
            return
        principal = scope.get("state", {}).get("principal")
        if scope["method"] != "GET" or principal is None or not self._cacheable(scope):
            await self.app(scope, receive, send)
            return
        key = (principal.key_id, scope["path"], scope["query_string"])
        if await self._replay(key, send):
            return
        filling = self._inflight.get(key)
        if filling is not None:
            # One request computes an expired answer; the others wait for it rather than
            # all computing it at once (a stampede each time a popular entry expires).
            with suppress(TimeoutError):
                await asyncio.wait_for(filling.wait(), timeout=_FILL_WAIT_S)
            if await self._replay(key, send):
                return
            await self.app(scope, receive, send)
            return
        done = self._inflight[key] = asyncio.Event()
        try:
            await self._fill(key, time.monotonic(), scope, receive, send)
        finally:
            del self._inflight[key]
            done.set()

    async def _replay(self, key: tuple[int, str, bytes], send: Send) -> bool:
        entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry.stored_at >= self.ttl_s:
            return False
        self._entries.move_to_end(key)
        await send({"type": "http.response.start", "status": entry.status,
                    "headers": [*entry.headers, (CACHE_HEADER, b"hit")]})
        await send({"type": "http.response.body", "body": entry.body})
        return True

    async def _write(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._writes_running += 1
        self.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self._writes_running -= 1
            self.clear()

    async def _fill(self, key: tuple[int, str, bytes], now: float, scope: Scope,
                    receive: Receive, send: Send) -> None:
        generation = self._generation
        start: Message | None = None
        chunks: list[bytes] = []
        size = 0
        keep = True

        async def capture(message: Message) -> None:
            nonlocal start, size, keep
            if message["type"] == "http.response.start":
                start = message
                headers = dict(message.get("headers", []))
                keep = (message["status"] == 200
                        and headers.get(b"content-type", b"").startswith(b"application/json"))
                message = {**message, "headers": [*message.get("headers", []), (CACHE_HEADER, b"miss")]}
            elif message["type"] == "http.response.body" and keep:
                size += len(message.get("body", b""))
                keep = size <= self.max_body_bytes
                if keep:
                    chunks.append(message.get("body", b""))
                if keep and not message.get("more_body", False) and start is not None \
                        and generation == self._generation and not self._writes_running:
                    self._store(key, _Entry(now, start["status"], list(start.get("headers", [])),
                                            b"".join(chunks)))
            await send(message)

        await self.app(scope, receive, capture)

    def _store(self, key: tuple[int, str, bytes], entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
