"""``run_job(job_id, settings)``: the one function every executor runs (Celery task or embedded).

The DB is the source of truth. A job is *claimed* with a compare-and-set (queued ->
running, attempts + 1, worker = a unique id of this attempt); every later write of this
attempt is fenced on that worker id, so an attempt that the reaper gave up on can never
overwrite the job's new owner. Progress and heartbeats go to the job row while it runs;
the model, its modules and their metrics are written in one transaction at the end, after
the artifacts are on disk and their checksums verified. Every one of those state changes is
made by the job store, ``app.services.jobs``; this module runs the attempt.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app import storage
from app.db.models import Job, JobKind, JobStatus, Model, ModelStatus, Module, utcnow
from app.db.session import make_engine, make_sessionmaker
from app.services import compose as compose_svc
from app.services import datasets as datasets_svc
from app.services import jobs as job_store
from app.services.jobs import JobLost
from app.settings import Settings, get_settings

# The store's fenced writes under the names _train and _finetune call them by.
_fenced = job_store.fenced
_mark_succeeded = job_store.mark_succeeded
_reserve_model = job_store.reserve_model

log = logging.getLogger(__name__)


class JobCancelled(RuntimeError):
    pass


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------ heartbeat


class JobContext:
    """Progress, heartbeat and cancellation of one claimed attempt."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        settings: Settings,
        job: Job,
        worker: str,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self.factory = factory
        self.on_stall = on_stall
        self.settings = settings
        self.job_id = job.id
        self.worker = worker
        self.progress: dict[str, Any] = dict(job.progress or {})
        self.cancelled = False
        self.lost = False
        self.checkpointing = False  # set by the training path: epoch ends follow a checkpoint
        self._dirty = False
        self._last_write = time.monotonic()
        self._last_progress = time.monotonic()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"heartbeat-{job.id[:8]}", daemon=True
        )
        self.progress_interval = min(1.0, settings.heartbeat_interval_s)

    def __enter__(self) -> JobContext:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        period = self.settings.heartbeat_interval_s
        stall = self.settings.stall_after_s
        while not self._stop.wait(min(period / 2, 1.0)):
            idle = time.monotonic() - self._last_progress
            if stall and idle > stall:
                # The heartbeat runs on its own thread, so a hung training would otherwise beat
                # forever and hold its worker: stop vouching for it and hand the job back.
                self._give_up_hung(idle)
                return
            if time.monotonic() - self._last_write >= period:
                try:
                    self.flush()
                except Exception:  # a DB hiccup must not kill the job; the next beat retries
                    log.exception("heartbeat of job %s failed", self.job_id)

    def flush(self) -> None:
        """Write heartbeat (+ progress if changed) and read the cancel flag."""
        with self._write_lock:
            progress = _finite(self.progress) if self._dirty else None
            flag = job_store.heartbeat(self.factory, self.job_id, self.worker, progress)
            if flag is None:
                self.lost = True
                return
            self._dirty = False
            self._last_write = time.monotonic()
            self.cancelled = flag

    def _give_up_hung(self, idle: float) -> None:
        reason = (
            f"no progress for {idle:.0f} s (MWT_STALL_AFTER_S={self.settings.stall_after_s:g}): "
            f"the job looked hung on {self.worker}"
        )
        action = job_store.release_job(self.factory, self.job_id, self.worker, reason)
        self.lost = True
        log.error("job %s: %s -> %s", self.job_id, reason, action)
        if self.on_stall is not None:
            self.on_stall()

    def report(self, progress: dict[str, Any], force: bool = False) -> None:
        self._last_progress = time.monotonic()
        self.progress = {**self.progress, **progress}
        self._dirty = True
        if force or time.monotonic() - self._last_write >= self.progress_interval:
            try:
                self.flush()
            except (
                Exception
            ):  # a DB hiccup must not fail the training; the heartbeat thread retries
                log.exception("progress write of job %s failed", self.job_id)

    def on_train_progress(self, p: Any) -> None:
        """``progress`` callback of ``mwt_core.training.train``."""
        data = p.to_json() if hasattr(p, "to_json") else dict(p)
        data["phase"] = "training"
        if self.checkpointing and data.get("test_acc") is not None:
            # train() reports an epoch end right after saving its checkpoint: progress made.
            data["checkpoint_epoch"] = data.get("epoch")
        # Epoch ends (with a test accuracy) are always written at once.
        self.report(data, force=data.get("test_acc") is not None)

    def phase(self, name: str, **extra: Any) -> None:
        self.report({"phase": name, **extra}, force=True)
        self.check()

    def should_stop(self) -> bool:
        return self.cancelled or self.lost

    def check(self) -> None:
        if self.lost:
            raise JobLost(self.job_id)
        if self.cancelled:
            raise JobCancelled(self.job_id)


# ------------------------------------------------------------------------------ run_job


def run_job(job_id: str, settings: Settings | None = None) -> str:
    """Run one job to a terminal state (or give it up if this attempt loses it). Returns the outcome."""
    settings = settings or get_settings()
    engine = make_engine(settings, pool_size=2, max_overflow=2)
    factory = make_sessionmaker(engine)
    try:
        worker = worker_identity()
        job = job_store.claim(factory, job_id, worker)
        if job is None:
            return "skipped"
        log.info(
            "job %s (%s) claimed by %s, attempt %d/%d",
            job.id,
            job.kind,
            worker,
            job.attempts,
            job.max_attempts,
        )
        return _execute(factory, settings, job, worker)
    finally:
        engine.dispose()


def _execute(factory: sessionmaker[Session], settings: Settings, job: Job, worker: str) -> str:
    from mwt_core.training import TrainingCancelled

    ctx = JobContext(factory, settings, job, worker, on_stall=exit_hung_process)
    with ctx:
        try:
            if job.kind == JobKind.train.value:
                _train(factory, settings, job, ctx)
            elif job.kind == JobKind.finetune.value:
                _finetune(factory, settings, job, ctx)
            else:
                raise ValueError(f"unknown job kind {job.kind!r}")
            return JobStatus.succeeded.value
        except JobLost:
            log.warning(
                "job %s: this attempt (%s) lost the job; leaving it to its new owner",
                job.id,
                worker,
            )
            return "lost"
        except (JobCancelled, TrainingCancelled):
            if ctx.lost:
                return "lost"
            with factory() as s:
                job_store.finish(
                    s,
                    job.id,
                    worker,
                    JobStatus.cancelled,
                    error="cancelled by user",
                    progress=ctx.progress,
                )
            return JobStatus.cancelled.value
        except Exception as exc:
            log.exception("job %s failed", job.id)
            with factory() as s:
                job_store.finish(
                    s, job.id, worker, JobStatus.failed, error=_describe(exc), progress=ctx.progress
                )
            return JobStatus.failed.value


EXIT_HUNG = 75  # EX_TEMPFAIL: the job was handed back; whatever runs workers starts a fresh one


def exit_hung_process() -> None:
    """A hung job cannot be interrupted from another thread; free its worker (and GPU) by exiting.

    Job processes are dedicated (a spawned child of the embedded executor, a Celery pool
    process or a solo worker that its supervisor restarts), and the job row is already handed
    back, so nothing else is lost.
    """
    logging.shutdown()
    os._exit(EXIT_HUNG)


def _describe(exc: BaseException) -> str:
    from mwt_core.artifacts import ArtifactError
    from mwt_core.data.datasets import DatasetError

    if isinstance(exc, (DatasetError, ArtifactError, ValueError, compose_svc.CompositionError)):
        return f"{type(exc).__name__}: {exc}"
    tail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return f"internal error: {tail}"


# ---------------------------------------------------------------------------------- train


def _checkpoint_epoch(ckpt_dir: Path) -> int:
    from mwt_core.training import CHECKPOINT_NAME, load_checkpoint

    path = ckpt_dir / CHECKPOINT_NAME
    if not path.is_file():
        return 0
    try:
        return int(load_checkpoint(path)["epoch"])
    except Exception:  # an unreadable checkpoint: training starts over
        log.warning("checkpoint %s is unreadable; starting from scratch", path)
        path.unlink(missing_ok=True)
        return 0


def _class_recall(model: Any, data: Any, device: str) -> list[float]:
    """Per class: fraction of its test samples the full model classifies correctly."""
    import torch

    from mwt_core.devices import resolve_device

    dev = resolve_device(device)
    model = model.to(dev).eval()
    preds = []
    with torch.no_grad():
        for start in range(0, data.test_x.shape[0], 512):
            x = data.spec.normalize(data.test_x[start : start + 512].to(dev))
            preds.append(model(x).argmax(1).cpu())
    pred = torch.cat(preds)
    out = []
    for c in range(data.num_classes):
        sel = data.test_y == c
        n = int(sel.sum())
        out.append(float((pred[sel] == c).sum()) / n if n else 0.0)
    return out


def _train(factory: sessionmaker[Session], settings: Settings, job: Job, ctx: JobContext) -> None:
    from mwt_core.artifacts import save_artifact
    from mwt_core.metrics import count_flops, count_params
    from mwt_core.models import architecture_info
    from mwt_core.modularize import modularize
    from mwt_core.reuse import extract_module
    from mwt_core.training import TrainConfig, train

    p = job.params
    ctx.phase("loading data")
    cfg = TrainConfig(
        arch=p["arch"],
        width=float(p["width"]),
        epochs=int(p["epochs"]),
        batch_size=int(p["batch_size"]),
        lr=float(p["lr"]),
        momentum=float(p.get("momentum", 0.9)),
        weight_decay=float(p.get("weight_decay", 0.0)),
        mask_lr=None if p.get("mask_lr") is None else float(p["mask_lr"]),
        alpha=float(p["alpha"]),
        beta=float(p["beta"]),
        gamma=float(p.get("gamma", 0.0)),
        modular=bool(p["modular"]),
        seed=int(p["seed"]),
        device=settings.device,
        amp=bool(p.get("amp", True)),
        augment=bool(p.get("augment", True)),
    )
    min_size = architecture_info(cfg.arch).min_input_size
    with factory() as s:
        source, _ = datasets_svc.resolve(s, settings, job.dataset or "")
        data = datasets_svc.load_bundle(settings, s, job.dataset or "", min_input_size=min_size)
        if source != "upload":
            datasets_svc.record_builtin(s, data, source)
    cfg_json = cfg.to_json()
    model_id = _reserve_model(factory, job, ctx.worker, data, cfg_json)

    root = settings.artifacts
    ckpt_dir = storage.job_dir(root, job.id) / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with factory() as s:
        _fenced(s, job.id, ctx.worker, checkpoint_path=storage.relative(root, ckpt_dir))
        s.commit()
    resumed_from = _checkpoint_epoch(ckpt_dir)
    ctx.checkpointing = True
    ctx.phase("training", epoch=resumed_from, epochs=cfg.epochs, resumed_from_epoch=resumed_from)

    result = train(
        cfg,
        data,
        progress=ctx.on_train_progress,
        checkpoint_dir=ckpt_dir,
        resume=True,
        should_stop=ctx.should_stop,
    )
    ctx.check()
    net = result.model.cpu().eval()
    shape = tuple(data.spec.shape)
    recall = _class_recall(net, data, "cpu")

    mod = None
    if cfg.modular:
        ctx.phase("modularizing")
        mod = modularize(net, data, tau=float(p.get("tau", 0.9)), device=settings.device)
        net = net.cpu().eval()

    ctx.phase("saving")
    with factory() as s:
        model_row = s.get(Model, model_id)
        assert model_row is not None
        name, version = model_row.name, model_row.version
    mdir = storage.model_dir(root, model_id)
    model_metrics = {
        "accuracy": float(result.test_acc),
        "train_seconds": float(result.train_seconds),
        "params": int(count_params(net)),
        "flops": int(count_flops(net, shape)),
        "epochs_run": int(result.epochs_run),
        "resumed_from_epoch": resumed_from,
        "class_recall": recall,
    }
    if mod is not None:
        model_metrics.update(
            {
                "krr": mod.model_krr,
                "cohesion": mod.cohesion,
                "coupling": mod.coupling,
                "module_krr": mod.krr,
                "per_class_cohesion": mod.per_class_cohesion,
                "layer_coupling": mod.layer_coupling(),
            }
        )
    # Manifest keys follow mwt_core's CLI, so `mwt show/extract/evaluate` work on downloaded artifacts.
    upload = job.dataset not in datasets_svc.builtin_infos(settings)
    common = {
        "dataset": data.name,
        "dataset_ref": None if upload else data.name,
        "input_spec": data.spec.to_json(),
        "train_config": cfg_json,
        "registry": {
            "model_id": model_id,
            "model_name": name,
            "model_version": version,
            "job_id": job.id,
        },
        "created_by": "mwt-hub worker",
    }
    art = mdir / "model"
    model_manifest = {
        **common,
        "class_names": list(data.class_names),
        "metrics": {**model_metrics, "test_acc": model_metrics["accuracy"], "epochs": cfg.epochs},
        "history": result.history,
    }
    if mod is not None:
        model_manifest["modularization"] = mod.to_json()
    written = save_artifact(art, net, model_manifest)
    model_sha, model_size = storage.write_tar(art, mdir / "model.tar")

    module_rows: list[dict[str, Any]] = []
    if mod is not None:
        total = sum(int(m.numel()) for m in mod.class_masks[0])
        for c in range(data.num_classes):
            ctx.report({"phase": "saving", "module": c + 1, "modules": data.num_classes})
            ctx.check()
            module = extract_module(net, mod, [c])
            mdir_c = mdir / "modules" / str(c)
            metrics = {
                "krr": float(mod.krr[c]),
                "accuracy": recall[c],
                "cohesion": float(mod.per_class_cohesion[c]),
                "params": int(count_params(module)),
                "flops": int(count_flops(module, shape)),
            }
            save_artifact(
                mdir_c,
                module,
                {
                    **common,
                    "class_names": [str(data.class_names[c])],
                    "classes": [c],
                    "dataset_class_names": list(data.class_names),
                    "source_model": {"sha256": written["sha256"], "tau": mod.tau},
                    "metrics": metrics,
                },
            )
            sha, size = storage.write_tar(mdir_c, mdir / "modules" / f"{c}.tar")
            module_rows.append(
                {
                    "class_index": c,
                    "class_name": str(data.class_names[c]),
                    "kept_kernels": int(sum(int(m.sum()) for m in mod.class_masks[c])),
                    "total_kernels": total,
                    "artifact_path": storage.relative(root, mdir_c),
                    "sha256": sha,
                    "size_bytes": size,
                    **metrics,
                }
            )

    # Verify what is on disk before the registry says "ready".
    if storage.sha256_file(mdir / "model.tar") != model_sha:
        raise RuntimeError("model archive changed on disk while it was being registered")
    for row in module_rows:
        tar = mdir / "modules" / f"{row['class_index']}.tar"
        if storage.sha256_file(tar) != row["sha256"]:
            raise RuntimeError(
                f"module archive {tar} changed on disk while it was being registered"
            )

    final_progress = {**ctx.progress, "phase": "done"}
    job_result = {
        k: v
        for k, v in model_metrics.items()
        if k not in ("class_recall", "module_krr", "per_class_cohesion", "layer_coupling")
    }
    job_result.update(
        {
            "model_id": model_id,
            "model_name": name,
            "model_version": version,
            "modules": len(module_rows),
        }
    )
    now = utcnow()
    with factory() as s:
        # ONE transaction: job succeeded + model ready with metrics + its modules.
        _mark_succeeded(
            s, job.id, ctx.worker, now, _finite(final_progress), job_result, heartbeat_at=now
        )
        model_row = s.get(Model, model_id)
        assert model_row is not None
        model_row.status = ModelStatus.ready.value
        model_row.ready_at = now
        model_row.accuracy = model_metrics["accuracy"]
        model_row.train_seconds = model_metrics["train_seconds"]
        model_row.params = model_metrics["params"]
        model_row.flops = model_metrics["flops"]
        model_row.krr = model_metrics.get("krr")
        model_row.cohesion = model_metrics.get("cohesion")
        model_row.coupling = model_metrics.get("coupling")
        model_row.metrics = {
            k: v
            for k, v in model_metrics.items()
            if k not in ("accuracy", "params", "flops", "krr", "cohesion", "coupling")
        }
        model_row.artifact_path = storage.relative(root, art)
        model_row.sha256 = model_sha
        model_row.size_bytes = model_size
        for row in module_rows:
            s.add(Module(model_id=model_id, dataset=model_row.dataset, arch=model_row.arch, **row))
        s.commit()
    storage.remove_tree(storage.job_dir(root, job.id))
    log.info(
        "job %s succeeded: model %s v%d (id %d), %d modules",
        job.id,
        name,
        version,
        model_id,
        len(module_rows),
    )


# ------------------------------------------------------------------------------- finetune


def _finetune(
    factory: sessionmaker[Session], settings: Settings, job: Job, ctx: JobContext
) -> None:
    from mwt_core.models import architecture_info

    p = job.params
    ctx.phase("loading model")
    with factory() as s:
        model = s.get(Model, int(p["model_id"]))
        if model is None or model.status != ModelStatus.ready.value:
            raise ValueError(f"model {p['model_id']} is gone or not ready")
        loaded = compose_svc.load_model(settings, model)
        data = datasets_svc.load_bundle(
            settings, s, model.dataset, min_input_size=architecture_info(model.arch).min_input_size
        )
        model_id, class_names = model.id, list(model.class_names)
    classes = [int(c) for c in p["classes"]]
    ctx.phase("fine-tuning")
    module, metrics = compose_svc.build(
        loaded, data, classes, device=settings.device, finetune=p.get("finetune") or {}
    )
    ctx.phase("saving")
    manifest = compose_svc.manifest_for(model, loaded, classes, metrics, finetuned=True)
    stored = compose_svc.store(settings, module, manifest, token=f"job-{job.id}")
    now = utcnow()
    with factory() as s:
        comp = compose_svc.composition_row(
            [(model_id, classes, [str(class_names[c]) for c in classes])], metrics, stored,
            finetuned=True, key=compose_svc.classes_key(classes), job_id=job.id,
        )
        comp.api_key_id = job.api_key_id  # owned by whoever asked for the fine-tune
        s.add(comp)
        s.flush()
        _mark_succeeded(
            s, job.id, ctx.worker, now, {**ctx.progress, "phase": "done"},
            {"composition_id": comp.id,
             **{k: metrics[k] for k in ("accuracy", "baseline_accuracy", "krr")}},
            composition_id=comp.id,
        )
        s.commit()

