"""A training job that starts from a registry model's weights (``init_from_model``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy.orm import Session, sessionmaker

from app import storage
from app.db.models import Job, JobKind, JobStatus, Model, ModelStatus
from app.services.jobs import create_job
from app.settings import Settings
from mwt_core.artifacts import WEIGHTS_FILE
from tests.support.registry import seed_trained_model
from worker.jobs import run_job


def _weights(settings: Settings, model: Model) -> dict[str, torch.Tensor]:
    assert model.artifact_path is not None
    return load_file(str(storage.resolve(settings.artifacts, model.artifact_path) / WEIGHTS_FILE))


def _submit(factory: sessionmaker[Session], base_id: int) -> str:
    with factory() as s:
        job, _ = create_job(
            s, kind=JobKind.train, queue="local", max_attempts=1, dataset="digits", arch="simcnn",
            # lr so small the network cannot move: what it ends with is what it started from
            params={"arch": "simcnn", "width": 0.125, "epochs": 1, "batch_size": 64, "lr": 1e-9,
                    "mask_lr": 1e-9, "init_from_model": base_id, "augment": False,
                    # as the API writes them (a job without these keys runs as older ones did)
                    "target_krr": 0.5, "val_fraction": 0.2},
        )
        return job.id


@pytest.mark.slow
def test_a_job_starts_from_a_registry_models_weights(
    factory: sessionmaker[Session], settings: Settings
) -> None:
    with factory() as s:
        base = seed_trained_model(s, settings, seed=3)
        base_state = _weights(settings, base)
        base_id = base.id
    job_id = _submit(factory, base_id)
    assert run_job(job_id, settings) == JobStatus.succeeded.value
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.model_id is not None
        made = s.get(Model, job.model_id)
        assert made is not None and made.status == ModelStatus.ready.value
        # lineage by reference: no path of the worker's store in the registry
        assert made.config["base_model"] == base_id and made.config["init_from"] is None
        # the registry keeps the validation accuracy and the kernel budget asked and reached
        assert made.metrics["val_acc"] is not None and job.result is not None
        assert made.metrics["kernel_budget"]["target_krr"] == made.config["target_krr"] == 0.5
        assert job.result["val_acc"] == made.metrics["val_acc"]
        state = _weights(settings, made)
    convs = [k for k in base_state if k.endswith("conv.weight")]
    assert convs and all(torch.allclose(state[k], base_state[k], atol=1e-5) for k in convs)


def test_a_deleted_base_model_fails_the_job_with_its_reason(
    factory: sessionmaker[Session], settings: Settings
) -> None:
    with factory() as s:
        base = seed_trained_model(s, settings, seed=4)
        base_id = base.id
        weights = Path(storage.resolve(settings.artifacts, base.artifact_path or "")) / WEIGHTS_FILE
    job_id = _submit(factory, base_id)
    weights.unlink()
    assert run_job(job_id, settings) == JobStatus.failed.value
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.error is not None
        assert f"weights of model {base_id} are no longer in the store" in job.error
