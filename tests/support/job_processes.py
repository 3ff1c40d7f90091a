"""Job processes that misbehave, as targets for the embedded executor (``Executor(target=...)``).

Each is called in a spawned process with ``(job_id, settings_data, log_level)`` like the real one.
"""

from __future__ import annotations

import os
from typing import Any

from app.settings import Settings


def crash_after_claim(job_id: str, settings_data: dict[str, Any], log_level: str) -> None:
    """Executor target for tests: claim the job like a real run, then die without finishing it."""
    from app.db.session import make_engine, make_sessionmaker
    from app.services.jobs import claim
    from worker.jobs import worker_identity

    settings = Settings(**settings_data)
    engine = make_engine(settings)
    claim(make_sessionmaker(engine), job_id, worker_identity())
    os._exit(3)


def claim_and_hang(job_id: str, settings_data: dict[str, Any], log_level: str) -> None:
    """Executor target for tests: claim the job, then hang as a stuck training would."""
    import time

    from app.db.session import make_engine, make_sessionmaker
    from app.services.jobs import claim
    from worker.jobs import worker_identity

    settings = Settings(**settings_data)
    claim(make_sessionmaker(make_engine(settings)), job_id, worker_identity())
    time.sleep(3600)


def claim_report_and_hang(job_id: str, settings_data: dict[str, Any], log_level: str) -> None:
    """Executor target for tests: claim the job, report progress once under the real job context
    (heartbeat thread, stall watchdog that exits the process), then hang."""
    import time

    from app.db.session import make_engine, make_sessionmaker
    from app.services.jobs import claim
    from worker.jobs import JobContext, exit_hung_process, worker_identity

    settings = Settings(**settings_data)
    factory = make_sessionmaker(make_engine(settings))
    worker = worker_identity()
    job = claim(factory, job_id, worker)
    if job is None:
        return
    with JobContext(factory, settings, job, worker, on_stall=exit_hung_process) as ctx:
        ctx.report({"phase": "training", "epoch": 1}, force=True)
        time.sleep(3600)


def record_pid_and_hang(job_id: str, settings_data: dict[str, Any], log_level: str) -> None:
    """Executor target for tests: write this process's pid to ``<data_dir>/<job_id>.pid``, hang."""
    import time
    from pathlib import Path

    settings = Settings(**settings_data)
    (Path(settings.data_dir) / f"{job_id}.pid").write_text(str(os.getpid()))
    time.sleep(3600)


def watchdog_only_child(parent_pid: int, pid_file: str) -> None:
    """Spawned by a test's parent process: bind to the parent with the portable watchdog
    alone (as on a platform without ``prctl``), record this pid, hang."""
    import sys
    import time
    from pathlib import Path

    from worker.executor import exit_with_parent

    sys.platform = "unknown"  # skip the Linux death signal: only the watchdog is left
    exit_with_parent(parent_pid, poll_s=0.2)
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(3600)
