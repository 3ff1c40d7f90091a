"""How the API hands a queued job to whatever runs jobs: the ``Dispatcher`` protocol.

The implementations that run jobs live in ``worker.dispatch`` (the embedded executor's and
Celery's); the composition roots (``app.main``, ``app.cli``) pick one and pass it in.
``NullDispatcher``: the job stays queued until some executor polls for it.
The job row is committed before dispatch: the DB, not the broker, is the source of truth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

Requeue = Callable[[str, str], None]  # (job_id, queue) -> send the job again


class Dispatcher(Protocol):
    """Hands a committed, queued job to its runner; ``app.services.jobs.send`` records it."""

    def dispatch(self, job_id: str, queue: str) -> None: ...

    @property
    def requeue(self) -> Requeue | None:
        """What the reaper sends a stranded queued job again with; None where jobs are not
        sent (an executor that polls the DB finds them itself)."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def check(self) -> str | None:
        """None when ready, else what is wrong (for /ready)."""
        ...


class NullDispatcher:
    requeue: Requeue | None = None

    def dispatch(self, job_id: str, queue: str) -> None:
        log.info("job %s queued (no executor in this process)", job_id)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def check(self) -> str | None:
        return None
