"""``run_job``: what a failed job records for the API to show."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, JobKind, JobStatus
from app.services.jobs import create_job, job_out
from app.settings import Settings
from worker.jobs import run_job


def test_a_failed_jobs_error_names_no_server_path(
    factory: sessionmaker[Session], settings: Settings
) -> None:
    """A job whose uploaded weights vanished from the store fails with the file it missed,
    named below its setting (``<MWT_DATA_DIR>/weights/...``), never by its absolute path."""
    with factory() as s:
        job, _ = create_job(
            s, kind=JobKind.train, queue="local", max_attempts=1, dataset="digits", arch="simcnn",
            params={"arch": "simcnn", "width": 0.125, "epochs": 1, "init_from": "gone"},
        )
        job_id = job.id
    assert run_job(job_id, settings) == JobStatus.failed.value
    with factory() as s:
        row = s.get(Job, job_id)
        assert row is not None
        error = job_out(row).error
    assert error is not None and "<MWT_DATA_DIR>/weights/gone.safetensors" in error, error
    for form in {str(settings.data_dir), str(settings.data_dir.resolve())}:
        assert form not in error, error
