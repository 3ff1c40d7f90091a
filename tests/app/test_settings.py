from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.auth import ensure_admin_key
from app.main import create_app
from app.settings import Settings, get_settings


def test_defaults_are_embedded_sqlite_under_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert s.embedded and s.is_sqlite
    assert s.database_url == f"sqlite:///{tmp_path.as_posix()}/mwt.db"
    assert s.artifacts == tmp_path / "artifacts"
    assert s.datasets == tmp_path
    assert s.upload_limit_bytes == s.max_upload_mb * 1024 * 1024


def test_env_prefix_and_normalisation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MWT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MWT_DATABASE_URL", "postgresql://u:p@db:5432/x")
    monkeypatch.setenv("MWT_BROKER_URL", "redis://r:6379/0")
    monkeypatch.setenv("MWT_MAX_JOB_ATTEMPTS", "5")
    s = Settings()
    assert s.database_url == "postgresql+psycopg://u:p@db:5432/x"
    assert not s.embedded and not s.is_sqlite
    assert s.max_job_attempts == 5
    monkeypatch.setenv("MWT_BROKER_URL", "")
    assert Settings().embedded  # empty = unset


def test_invalid_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="stale_after_s"):
        Settings(data_dir=tmp_path, heartbeat_interval_s=10, stale_after_s=15)
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, max_job_attempts=0)


def test_get_settings_is_cached_and_apps_use_their_own(settings: Settings) -> None:
    get_settings.cache_clear()
    assert get_settings() is get_settings()
    small = settings.model_copy(update={"page_size_max": 7})
    app = create_app(small, run_executor=False)
    assert app.state.settings is small and not app.dependency_overrides
    with TestClient(app) as c:
        assert c.get("/ready").json()["mode"] == "embedded"
        token = ensure_admin_key(app.state.sessionmaker, small)
        c.headers["Authorization"] = f"Bearer {token}"
        # Routes read the app's own settings, not the process-wide ones (whose maximum is larger).
        assert get_settings().page_size_max > 7
        assert c.get("/api/v1/modules", params={"limit": 7}).status_code == 200
        r = c.get("/api/v1/modules", params={"limit": 8})
        assert r.status_code == 422 and "at most 7" in r.json()["detail"]
