"""Issue 14, case 9: a job process never outlives the executor that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.settings import Settings
from tests.support.processes import REPO_ROOT

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# The parent of the first case: an embedded executor (as in `mwt serve`) running one job whose
# process records its pid and hangs.
EXECUTOR_PARENT = """
import time
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from tests.support.job_processes import record_pid_and_hang
from worker.executor import Executor

if __name__ == "__main__":
    settings = Settings(data_dir={data_dir!r}, executor_poll_s=0.2, reaper_interval_s=0)
    Executor(settings, make_sessionmaker(make_engine(settings)), target=record_pid_and_hang).start()
    time.sleep(3600)
"""

# The second: a spawned child bound with the portable watchdog only (no prctl).
WATCHDOG_PARENT = """
import multiprocessing, os, time
from tests.support.job_processes import watchdog_only_child

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    ctx.Process(target=watchdog_only_child, args=(os.getpid(), {pid_file!r}), daemon=False).start()
    time.sleep(3600)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in ("Z", "X")  # a zombie has exited; only its reaping is left


@pytest.mark.slow
@pytest.mark.parametrize("how", ["executor", "watchdog"])
def test_job_process_exits_when_its_parent_is_killed(
    settings: Settings, submit_job: Callable[..., str], how: str, tmp_path: Path
) -> None:
    """SIGKILL the parent: the job process exits within seconds (before the fix it ran on)."""
    job_id = submit_job()
    pid_file = Path(settings.data_dir) / f"{job_id}.pid"
    if how == "executor":
        script = tmp_path / "parent.py"
        script.write_text(EXECUTOR_PARENT.format(data_dir=str(settings.data_dir)))
    else:
        script = tmp_path / "parent.py"
        script.write_text(WATCHDOG_PARENT.format(pid_file=str(pid_file)))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert parent.poll() is None, "the parent exited early"
            assert time.monotonic() < deadline, "the job process never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not _gone(child):
            assert time.monotonic() < deadline, f"job process {child} outlived its parent"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if pid_file.exists() and pid_file.read_text():
            child = int(pid_file.read_text())
            if not _gone(child):
                os.kill(child, signal.SIGKILL)
