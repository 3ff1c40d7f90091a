"""Service settings: one pydantic-settings object, read from ``MWT_*`` environment variables.

Nothing else in ``app/`` or ``worker/`` reads the environment: code receives a
``Settings`` instance (FastAPI routes through the ``get_settings`` dependency,
workers and the CLI by calling ``get_settings()`` once).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


# The queue recorded for a job when no broker runs: the in-process executor takes every job
# in order, so naming a Celery queue (``gpu``) there would tell the user something untrue.
EMBEDDED_QUEUE = "embedded"

MIN_KEY_LENGTH = 20
MIN_KEY_DISTINCT = 8


def weak_key_reason(token: str) -> str | None:
    """Why an operator-chosen admin key is too easy to guess, or None if it is acceptable.

    Rule: at least MIN_KEY_LENGTH characters, at least MIN_KEY_DISTINCT different ones,
    no whitespace. A generated ``secrets.token_urlsafe(32)`` (43 characters) passes.
    """
    if len(token) < MIN_KEY_LENGTH or len(set(token)) < MIN_KEY_DISTINCT or any(
        c.isspace() for c in token
    ):
        return (
            f"an admin key needs at least {MIN_KEY_LENGTH} characters, at least "
            f"{MIN_KEY_DISTINCT} of them different, and no whitespace (got {len(token)} "
            f"character(s), {len(set(token))} different); generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return None


class Settings(BaseSettings):
    """Every knob of the service. Environment variable = ``MWT_`` + upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="MWT_", extra="ignore", validate_default=True)

    # --- storage -------------------------------------------------------------------
    data_dir: Path = Field(
        Path(".mwt"), description="Root of local state (SQLite DB, artifacts, datasets)."
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty = sqlite:///<data_dir>/mwt.db."
    )
    artifact_dir: Path | None = Field(
        None, description="Artifact store; default <data_dir>/artifacts."
    )
    dataset_dir: Path | None = Field(
        None,
        description="Where torchvision dataset files are looked for (uploads go to <dataset_dir>/uploads); "
        "default <data_dir>, the directory mwt_core's own CLI uses for MWT_DATA_DIR.",
    )

    # --- broker / workers -------------------------------------------------------------
    broker_url: str | None = Field(
        None, description="Celery broker (redis://...). None = embedded executor."
    )
    result_backend: str | None = Field(
        None, description="Celery result backend; None = results are not stored."
    )
    train_queue: str = Field(
        "gpu",
        description="Celery queue for training jobs (without a broker jobs report queue "
        f"`{EMBEDDED_QUEUE}`).",
    )
    light_queue: str = Field(
        "cpu", description="Celery queue for light jobs (fine-tuning compositions)."
    )
    job_visibility_timeout_s: int = Field(
        7 * 24 * 3600, ge=60, description="Broker visibility timeout; must exceed the longest job."
    )
    max_job_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="A job is failed after losing its worker this many times in a row without "
        "writing a new checkpoint in between (a job that kills its worker every time).",
    )
    max_job_starts: int = Field(
        20,
        ge=1,
        le=1000,
        description="Hard ceiling on a job's starts, even when it progresses between losses.",
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="How often a running job writes its heartbeat."
    )
    stale_after_s: float = Field(
        120.0, gt=0, description="A running job whose heartbeat is older is reaped."
    )
    stall_after_s: float = Field(
        1800.0,
        ge=0,
        description="A running job that reports no progress this long looks hung: it is taken "
        "back (requeued or failed, like a lost worker) and its process exits; 0 = never.",
    )
    reaper_interval_s: float = Field(
        30.0, ge=0, description="Reaper period in the API process; 0 disables it."
    )
    redispatch_after_s: float = Field(
        1800.0,
        gt=0,
        description="A queued job not picked up this long after its last send is sent to the "
        "broker again (a lost message must not strand it; duplicates are dropped by the worker).",
    )
    executor_concurrency: int = Field(
        1, ge=1, le=64, description="Embedded executor: jobs run at once."
    )
    executor_poll_s: float = Field(1.0, gt=0, description="Embedded executor: queue poll period.")
    device: str = Field(
        "auto", description="Torch device for jobs and compositions (auto, cpu, cuda, cuda:1)."
    )

    # --- API ---------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address the API binds to.")
    api_port: int = Field(8000, ge=0, le=65535, description="Port the API listens on.")
    max_upload_mb: int = Field(256, ge=1, description="Largest accepted dataset upload.")
    max_json_kb: int = Field(256, ge=1, description="Largest accepted JSON request body.")
    bootstrap_admin_key: str | None = Field(
        None,
        description="Admin API key to install when the key table is empty (else one is generated).",
    )
    key_cache_s: float = Field(
        10.0, ge=0, description="How long a verified API key is cached in the API."
    )
    response_cache_s: float = Field(
        1.0, ge=0, description="How long the API replays a registry query's answer (models, modules, "
        "compositions, datasets, architectures) before asking the database again; a change made "
        "through the same API process is seen at once, one made elsewhere within this time. 0: off.",
    )
    sse_poll_s: float = Field(0.5, gt=0, description="SSE progress stream: DB poll period.")
    compose_inline_max_parts: int = Field(
        16, ge=1, le=1024,
        description="Compositions of up to this many sources or modules are built within the "
        "request (201); larger ones run as a job (202 with the job).",
    )
    compose_cache_models: int = Field(4, ge=0, description="Models kept loaded for compositions.")
    heavy_workers: int = Field(
        2, ge=1, le=64,
        description="Heavy requests (predict, export, composition, dataset samples) run at once in "
        "one API process.",
    )
    heavy_queue: int = Field(
        16, ge=0, le=1024,
        description="Heavy requests that may wait for a free worker; past that they get 503 with "
        "Retry-After at once.",
    )
    heavy_wait_s: float = Field(
        30.0, gt=0, description="Longest wait of a queued heavy request before it gets 503."
    )
    predict_max_images: int = Field(
        32, ge=1, le=4096, description="Predict: most images (files or JSON array items) per request."
    )
    predict_max_image_kb: int = Field(
        2048, ge=1, description="Predict: largest accepted image file (KiB); JSON bodies get this "
        "much per allowed image."
    )
    predict_max_pixels: int = Field(
        4096 * 4096, ge=1, description="Predict: most pixels of one decoded image (width x height)."
    )
    predict_top_k: int = Field(5, ge=1, description="Predict: classes answered per image by default.")
    predict_cache_size: int = Field(
        8, ge=0, description="Predict: loaded classifiers kept in memory (LRU; 0 = none)."
    )
    page_size_max: int = Field(500, ge=1, description="Largest `limit` of a list request.")
    max_dataset_mb: int = Field(
        1024,
        ge=1,
        description="Largest uploaded dataset once decompressed (sum of its arrays), checked from "
        "the .npz member headers before anything is inflated.",
    )
    sse_max_streams: int = Field(
        64, ge=1, description="Live progress streams open at once in one API process (all keys)."
    )
    sse_max_streams_per_key: int = Field(
        8, ge=1, description="Live progress streams open at once per API key."
    )
    sse_max_duration_s: float = Field(
        3600.0,
        gt=0,
        description="A progress stream ends after this long (the client reconnects if it still cares).",
    )
    sse_queued_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A progress stream on a job still queued after this long ends (event `end`, "
        "status queued).",
    )
    private_listing: bool = Field(
        False,
        description="Lists of jobs, models, compositions and uploaded datasets show a non-admin key "
        "only what it created (default: the registry is shared, every read key sees everything).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level: debug, info, warning or error."
    )

    @field_validator("database_url")
    @classmethod
    def _normalise_url(cls, v: str) -> str:
        v = v.strip()
        for prefix in ("postgres://", "postgresql://"):
            if v.startswith(prefix):
                return "postgresql+psycopg://" + v[len(prefix) :]
        return v

    @field_validator("broker_url", "result_backend", "bootstrap_admin_key")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("bootstrap_admin_key")
    @classmethod
    def _strong_bootstrap_key(cls, v: str | None) -> str | None:
        if v:
            reason = weak_key_reason(v)
            if reason:
                raise ValueError(f"MWT_BOOTSTRAP_ADMIN_KEY is refused: {reason}")
        return v

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'mwt.db').as_posix()}"
        if self.artifact_dir is None:
            self.artifact_dir = self.data_dir / "artifacts"
        if self.dataset_dir is None:
            self.dataset_dir = self.data_dir
        if self.stale_after_s <= self.heartbeat_interval_s * 2:
            raise ValueError(
                f"stale_after_s ({self.stale_after_s}) must be more than twice heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or live jobs would be reaped"
            )
        return self

    # --- derived -----------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """True when jobs run in the project's own executor (no broker)."""
        return self.broker_url is None

    def queue_for(self, kind: Literal["train", "light"]) -> str:
        """The queue a new job of this kind goes to: the Celery queue, or ``embedded``."""
        if self.embedded:
            return EMBEDDED_QUEUE
        return self.train_queue if kind == "train" else self.light_queue

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def artifacts(self) -> Path:
        assert self.artifact_dir is not None
        return self.artifact_dir

    @property
    def datasets(self) -> Path:
        assert self.dataset_dir is not None
        return self.dataset_dir

    @property
    def upload_limit_bytes(self) -> int:
        return self.max_upload_mb * MiB

    @property
    def predict_body_limit_bytes(self) -> int:
        """Largest predict request: every allowed image at its largest, plus multipart framing."""
        return self.predict_max_images * (self.predict_max_image_kb * 1024 + 1024) + 64 * 1024

    def ensure_dirs(self) -> None:
        """Create the local directories this configuration writes to."""
        for d in (self.data_dir, self.artifacts, self.datasets):
            d.mkdir(parents=True, exist_ok=True)
        if self.is_sqlite and self.database_url.startswith("sqlite:///"):
            path = self.database_url[len("sqlite:///") :]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached). FastAPI apps override this dependency in ``create_app``."""
    return Settings()
