"""Admission for the heavy work of requests: loading networks, inference, export, composition.

Each such request holds one of ``workers`` slots while it runs; up to ``queue`` more wait
for one, at most ``wait_s`` each. Past that the request is turned away at once with 503 and
``Retry-After`` rather than piling up threads and memory until the process falls over: the
client learns to come back, and the requests already admitted finish. The counts are per
API process (``mwt api --workers N`` has N pools).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

RETRY_AFTER_S = 5


class Busy(HTTPException):
    """503 with ``Retry-After``: the pool and its queue are full, or the wait ran out."""

    def __init__(self, detail: str) -> None:
        super().__init__(status.HTTP_503_SERVICE_UNAVAILABLE, detail,
                         headers={"Retry-After": str(RETRY_AFTER_S)})


class WorkPool:
    """``workers`` slots and a waiting line of ``queue``, on the event loop of the server."""

    def __init__(self, workers: int, queue: int, wait_s: float) -> None:
        self.workers = workers
        self.queue = queue
        self.wait_s = wait_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(workers)
        self._admitted = 0  # running + waiting; only touched on the event loop

    def _bind(self) -> None:
        # asyncio primitives belong to one loop; a server has one for its life, a test
        # client starts a new one per session, which starts a fresh count.
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._slots, self._admitted = loop, asyncio.Semaphore(self.workers), 0

    @property
    def admitted(self) -> int:
        """Requests running or waiting now."""
        return self._admitted

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the caller's work; raises :class:`Busy` when none comes."""
        self._bind()
        if self._admitted >= self.workers + self.queue:
            raise Busy(f"the server is busy with {self._admitted} heavy requests (MWT_HEAVY_WORKERS "
                       f"{self.workers}, MWT_HEAVY_QUEUE {self.queue}); retry after "
                       f"{RETRY_AFTER_S} s")
        self._admitted += 1
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), self.wait_s)
            except TimeoutError:
                raise Busy(f"no worker became free within {self.wait_s:g} s "
                           f"(MWT_HEAVY_WAIT_S); retry after {RETRY_AFTER_S} s") from None
            try:
                yield
            finally:
                self._slots.release()
        finally:
            self._admitted -= 1


async def heavy_slot(request: Request) -> AsyncIterator[None]:
    """Dependency: the route's work runs while it holds a slot of the app's :class:`WorkPool`."""
    pool: WorkPool = request.app.state.work_pool
    async with pool.slot():
        yield


HeavyWork = Annotated[None, Depends(heavy_slot)]
