"""Registry rows for tests and benchmarks: fake models (stand-in weights) and tiny real ones."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app import storage
from app.db.models import Model, ModelStatus, Module, utcnow
from app.settings import Settings


def fake_artifact(directory: Path, payload: bytes, manifest: dict[str, Any]) -> tuple[str, int]:
    """A stand-in artifact dir + tar (not loadable as a network): for registry/API tests."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "weights.safetensors").write_bytes(payload)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return storage.pack(directory)


def seed_fake_model(
    session: Session,
    settings: Settings,
    *,
    name: str = "digits-simcnn",
    dataset: str = "digits",
    arch: str = "simcnn",
    num_classes: int = 10,
    accuracy: float = 0.9,
    payload_bytes: int = 4096,
    status: str = ModelStatus.ready.value,
) -> Model:
    """Insert a ready model with one fake module per class (random weights bytes)."""
    from sqlalchemy import func, select

    version = (session.scalar(select(func.max(Model.version)).where(Model.name == name)) or 0) + 1
    model = Model(
        name=name,
        version=version,
        status=status,
        dataset=dataset,
        arch=arch,
        width=0.125,
        modular=True,
        tau=0.9,
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        input_spec={"channels": 3, "size": 32},
        config={"arch": arch},
        tags={"seed": "fake"},
        accuracy=accuracy,
        krr=0.3,
        cohesion=0.9,
        coupling=0.2,
        params=1000,
        flops=20000,
        train_seconds=1.0,
        epochs=1,
        created_at=utcnow(),
        ready_at=utcnow(),
    )
    session.add(model)
    session.flush()
    art = storage.model_artifact_dir(settings.artifacts, model.id)
    sha, size = fake_artifact(art, os.urandom(payload_bytes), {"kind": "model"})
    model.artifact_path = storage.relative(settings.artifacts, art)
    model.sha256, model.size_bytes = sha, size
    for c in range(num_classes):
        d = storage.module_artifact_dir(settings.artifacts, model.id, c)
        sha, size = fake_artifact(
            d, os.urandom(payload_bytes), {"kind": "module", "class_index": c}
        )
        session.add(
            Module(
                model_id=model.id,
                class_index=c,
                class_name=str(c),
                dataset=dataset,
                arch=arch,
                krr=0.1 + 0.05 * c,
                accuracy=accuracy - 0.01 * c,
                cohesion=0.9,
                kept_kernels=10 + c,
                total_kernels=100,
                params=100,
                flops=2000,
                artifact_path=storage.relative(settings.artifacts, d),
                sha256=sha,
                size_bytes=size,
            )
        )
    session.commit()
    return model


def seed_trained_model(
    session: Session,
    settings: Settings,
    *,
    seed: int = 0,
    arch: str = "simcnn",
    train_images: int = 256,
    name: str = "digits-tiny",
    with_modules: bool = False,
    time_modules: bool = True,
    record_config: bool = False,
) -> Model:
    """Train a tiny real MwT model on part of digits (about a second) and register it as ready.

    The registry row and the artifact are real (safetensors + manifest with its modularization),
    so compositions can load and measure it. With ``with_modules`` its per-class modules are
    written and registered as the worker does (``mwt_core.pipeline.export_class_modules``);
    without ``time_modules`` their CPU latency is not timed (that timing is most of the time
    a seeding takes, and only the modules' ``latency_ms`` shows it). With ``record_config`` the
    training config (its validation slice among it) and the training images used are recorded
    as the worker records them, so the slice can be recomputed; without, the model reads as one
    trained before the slice existed.
    """
    from dataclasses import replace

    from sqlalchemy import func, select

    from mwt_core.artifacts import save_artifact
    from mwt_core.data.datasets import load_dataset
    from mwt_core.models import architecture_info
    from mwt_core.modularize import modularize
    from mwt_core.training import TrainConfig, train

    data = load_dataset("digits", min_input_size=architecture_info(arch).min_input_size)
    small = replace(data, train_x=data.train_x[:train_images], train_y=data.train_y[:train_images])
    cfg = TrainConfig(
        arch=arch, width=0.125, epochs=1, batch_size=64, seed=seed, device="cpu", mask_lr=0.1
    )
    result = train(cfg, small)
    mz = modularize(result.model, small, device="cpu")
    version = (session.scalar(select(func.max(Model.version)).where(Model.name == name)) or 0) + 1
    model = Model(
        name=name,
        version=version,
        status=ModelStatus.pending.value,
        dataset="digits",
        arch=arch,
        width=cfg.width,
        modular=True,
        tau=mz.tau,
        num_classes=data.num_classes,
        class_names=list(data.class_names),
        input_spec=data.spec.to_json(),
        config=cfg.to_json() if record_config else {"arch": arch},
        tags={"seed": str(seed)},
        accuracy=result.test_acc,
        krr=mz.model_krr,
        cohesion=mz.cohesion,
        coupling=mz.coupling,
        epochs=1,
        created_at=utcnow(),
    )
    session.add(model)
    session.flush()
    art = storage.model_artifact_dir(settings.artifacts, model.id)
    written = save_artifact(
        art,
        result.model,
        {
            "dataset": "digits",
            "dataset_ref": "digits",
            "input_spec": data.spec.to_json(),
            "class_names": list(data.class_names),
            "modularization": mz.to_json(),
            "registry": {"model_id": model.id, "model_name": name, "model_version": version},
            **({"train_config": cfg.to_json(), "train_limit": train_images}
               if record_config else {}),
        },
    )
    model.sha256, model.size_bytes = storage.pack(art)
    if with_modules:
        _register_modules(session, settings, model, result.model, mz, written, time_modules)
    model.artifact_path = storage.relative(settings.artifacts, art)
    model.status, model.ready_at = ModelStatus.ready.value, utcnow()
    session.commit()
    return model


def _register_modules(
    session: Session, settings: Settings, model: Model, net: Any, mz: Any, written: dict[str, Any],
    time_modules: bool = True,
) -> None:
    from mwt_core.pipeline import LATENCY_BATCH, export_class_modules

    modules_dir = storage.module_artifact_dir(settings.artifacts, model.id, 0).parent
    names = [str(c) for c in range(mz.num_classes)]
    for m in export_class_modules(net, mz, written, modules_dir, dirnames=names, write_index=False,
                                  latency_batch=LATENCY_BATCH if time_modules else 0):
        sha, size = storage.pack(m.dir)
        session.add(
            Module(
                model_id=model.id,
                class_index=m.class_index,
                class_name=m.class_name,
                dataset=model.dataset,
                arch=model.arch,
                kept_kernels=m.kept_kernels,
                total_kernels=m.total_kernels,
                artifact_path=storage.relative(settings.artifacts, m.dir),
                sha256=sha,
                size_bytes=size,
                **m.metrics,
            )
        )
