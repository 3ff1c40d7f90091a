"""Service processes for integration tests and benchmarks: ``mwt`` commands in their own process
group, waiting for HTTP, and the docker-compose services' commands and environment."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.services import REDIS_HOST, REDIS_PORT

REPO_ROOT = Path(__file__).resolve().parents[2]


def mwt_command(args: list[str]) -> list[str]:
    """``mwt ...`` as this environment runs it: the console script if it is ours, else ``python -m app.cli``."""
    import sys

    if args and args[0] == "mwt":
        script = Path(sys.executable).parent / "mwt"
        if script.is_file() and "app.cli" in script.read_text(errors="ignore"):
            return [str(script), *args[1:]]
        return [sys.executable, "-m", "app.cli", *args[1:]]
    return list(args)


class ServiceProcess:
    """A service started in its own session (process group), output to a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        import subprocess

        self.name = name
        self.args = mwt_command(args)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args,
            env=env,
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]

    def kill(self) -> None:
        """SIGKILL the whole process group (what an OOM kill or a lost node looks like)."""
        import signal

        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self, timeout: float = 20.0) -> int | None:
        import signal
        import subprocess

        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def wait_http(url: str, timeout: float = 60.0, proc: ServiceProcess | None = None) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log()}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(
        f"{url} did not answer within {timeout:.0f} s" + (f":\n{proc.log()}" if proc else "")
    )


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without MWT_* variables, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MWT_") or k.startswith("MWT_TEST_")
    }
    env.update(extra or {})
    return env


# ----------------------------------------------------------------------------- docker-compose

_INTERPOLATION = __import__("re").compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def compose_service(
    name: str, compose_file: Path | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command and environment docker compose would give service ``name`` (anchors, merges and
    ``${VAR:-default}`` interpolation resolved against this process's environment)."""
    import yaml

    data = yaml.safe_load((compose_file or REPO_ROOT / "docker-compose.yml").read_text())
    service = data["services"][name]

    def interpolate(value: object) -> str:
        text = str(value)
        return _INTERPOLATION.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), text)

    env_spec = service.get("environment") or {}
    if isinstance(env_spec, list):
        env_spec = dict(item.split("=", 1) for item in env_spec)
    env = {k: interpolate(v) for k, v in env_spec.items()}
    command = service["command"]
    if isinstance(command, str):
        import shlex

        command = shlex.split(command)
    return [interpolate(c) for c in command], env


def localize_env(
    env: dict[str, str], *, database_url: str, redis_db: int, data_dir: Path
) -> dict[str, str]:
    """Point a compose environment at this machine: only host names, ports, database names and the
    volume path change."""
    from urllib.parse import urlsplit, urlunsplit

    from sqlalchemy.engine import make_url

    out = dict(env)
    if "MWT_DATABASE_URL" in out:
        local = make_url(database_url)
        out["MWT_DATABASE_URL"] = (
            make_url(out["MWT_DATABASE_URL"])
            .set(host=local.host, port=local.port, database=local.database)
            .render_as_string(hide_password=False)
        )
    for key in ("MWT_BROKER_URL", "MWT_RESULT_BACKEND"):
        if out.get(key):
            parts = urlsplit(out[key])
            netloc = parts.netloc.rsplit("@", 1)
            auth = netloc[0] + "@" if len(netloc) == 2 else ""
            out[key] = urlunsplit(
                (parts.scheme, f"{auth}{REDIS_HOST}:{REDIS_PORT}", f"/{redis_db}", "", "")
            )
    for key in ("MWT_DATA_DIR", "MWT_ARTIFACT_DIR", "MWT_DATASET_DIR"):
        if out.get(key, "").startswith("/data"):
            out[key] = str(data_dir) + out[key][len("/data") :]
    return out
