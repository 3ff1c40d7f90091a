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
from app.services import weights as weights_svc
from app.services.jobs import JobLost
from app.settings import Settings, get_settings
from mwt_core.config import LEGACY_VALUES, ModularizeConfig, TrainConfig

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
            elif job.kind == JobKind.compose.value:
                _compose(factory, settings, job, ctx)
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
                    s, job.id, worker, JobStatus.failed, error=_describe(exc, settings),
                    progress=ctx.progress,
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


def _describe(exc: BaseException, settings: Settings) -> str:
    """A failed job's ``error``, as the API shows it: the exception's own text with the
    server's directories replaced by their setting names (the log keeps the full text).

    The one place an exception's text becomes a job's error; every other error the job
    store writes is a sentence of its own."""
    from app.redact import path_scrubber
    from mwt_core.artifacts import ArtifactError
    from mwt_core.data.datasets import DatasetError

    if isinstance(exc, (DatasetError, ArtifactError, ValueError, compose_svc.CompositionError)):
        text = f"{type(exc).__name__}: {exc}"
    else:
        tail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        text = f"internal error: {tail}"
    return path_scrubber(settings)(text)


# ---------------------------------------------------------------------------------- train


def _train_config(settings: Settings, p: dict[str, Any], base: Path | None = None) -> TrainConfig:
    """The job's ``TrainConfig`` on this worker's device. The API wrote every setting into
    the params; a key that a job queued by an older version lacks takes the value such jobs
    ran with, not today's default. ``base``: the weights file of ``init_from_model``."""
    params = {**LEGACY_VALUES, **p}
    if params.get("init_from"):  # the job names uploaded weights; the run reads their file
        params["init_from"] = str(weights_svc.weights_path(settings, params["init_from"]))
    elif base is not None:
        params["init_from"] = str(base)
    fields = set(TrainConfig.__dataclass_fields__) - {"device"}
    return TrainConfig(**{k: params[k] for k in fields if k in params}, device=settings.device)


def _base_weights(s: Session, settings: Settings, p: dict[str, Any]) -> Path | None:
    """The weights file of the registry model the job starts from (None: it names none)."""
    model_id = p.get("init_from_model")
    if model_id is None:
        return None
    path = weights_svc.model_weights_path(settings, s.get(Model, model_id), model_id)
    if not path.is_file():
        raise ValueError(f"the {weights_svc.model_label(model_id)} are no longer in the store")
    return path


class _ProgressSink:
    """The pipeline's progress, written to the job row (through the job's context)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def __call__(self, event: Any) -> None:
        if event.training is not None:
            self.ctx.on_train_progress(event.training)
        elif "module" in event.info:
            self.ctx.report({"phase": event.phase, **event.info})
            self.ctx.check()
        elif event.note:
            log.info("job %s: %s", self.ctx.job_id, event.note)
        else:
            self.ctx.phase(event.phase, **event.info)


def _train(factory: sessionmaker[Session], settings: Settings, job: Job, ctx: JobContext) -> None:
    from mwt_core.models import architecture_info
    from mwt_core.pipeline import Layout, run_pipeline

    p = job.params
    ctx.phase("loading data")
    with factory() as s:
        cfg = _train_config(settings, p, _base_weights(s, settings, p))
        source, _ = datasets_svc.resolve(s, settings, job.dataset or "")
        data = datasets_svc.load_bundle(
            settings, s, job.dataset or "", min_input_size=architecture_info(cfg.arch).min_input_size
        )
        if source != "upload":
            datasets_svc.record_builtin(s, data, source)
    cfg_json = cfg.to_json()
    # The registry records where the weights came from by name, not by a path on this worker.
    cfg_json["init_from"] = p.get("init_from")
    if p.get("init_from_model") is not None:
        cfg_json["base_model"] = p["init_from_model"]
    model_id = job_store.reserve_model(factory, job, ctx.worker, data, cfg_json)
    with factory() as s:
        model_row = s.get(Model, model_id)
        assert model_row is not None
        name, version = model_row.name, model_row.version
        assert version is not None  # a pending model holds its version

    root = settings.artifacts
    ckpt_dir = storage.job_dir(root, job.id) / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with factory() as s:
        job_store.fenced(s, job.id, ctx.worker, checkpoint_path=storage.relative(root, ckpt_dir))
        s.commit()
    ctx.checkpointing = True  # the pipeline checkpoints every epoch: epoch ends are progress
    layout = Layout(
        model_dir=storage.model_artifact_dir(root, model_id),
        modules_dir=storage.module_artifact_dir(root, model_id, 0).parent,
        checkpoint_dir=ckpt_dir,
        module_dirnames=tuple(str(c) for c in range(data.num_classes)),
        write_index=False,
    )
    upload = job.dataset not in datasets_svc.builtin_infos(settings)
    # Manifest keys are mwt_core's, so `mwt show/extract/evaluate` work on downloaded artifacts.
    result = run_pipeline(
        cfg,
        data,
        layout,
        tau=float(p.get("tau", ModularizeConfig.tau)),
        restart_on_mismatch=True,  # a retried job starts over rather than fail on a bad checkpoint
        dataset_ref=None if upload else data.name,
        manifest_extra={
            "registry": {
                "model_id": model_id,
                "model_name": name,
                "model_version": version,
                "job_id": job.id,
            }
        },
        created_by="mwt-hub worker",
        progress=_ProgressSink(ctx),
        should_stop=ctx.should_stop,
    )
    ctx.check()
    _publish(factory, settings, job, ctx, result, model_id, name, version)


# The model's metrics as the registry keeps them (the manifest records a few more).
_MODEL_METRICS = (
    "accuracy", "train_seconds", "params", "flops", "epochs_run", "resumed_from_epoch",
    "class_recall", "krr", "cohesion", "coupling", "module_krr", "per_class_cohesion",
    "layer_coupling", "val_acc", "kernel_budget",
)


def _publish(
    factory: sessionmaker[Session], settings: Settings, job: Job, ctx: JobContext, result: Any,
    model_id: int, name: str, version: int,
) -> None:
    """Archive the artifacts, verify them, then record job, model and modules in ONE transaction."""
    root = settings.artifacts
    art = result.layout.model_dir
    model_metrics = {k: result.metrics[k] for k in _MODEL_METRICS if k in result.metrics}
    model_sha, model_size = storage.pack(art)
    module_rows: list[dict[str, Any]] = []
    for m in result.modules:
        sha, size = storage.pack(m.dir)
        module_rows.append(
            {
                "class_index": m.class_index,
                "class_name": m.class_name,
                "kept_kernels": m.kept_kernels,
                "total_kernels": m.total_kernels,
                "artifact_path": storage.relative(root, m.dir),
                "sha256": sha,
                "size_bytes": size,
                **m.metrics,
            }
        )

    # Verify what is on disk before the registry says "ready".
    if storage.sha256_file(storage.tar_path(art)) != model_sha:
        raise RuntimeError("model archive changed on disk while it was being registered")
    for m, row in zip(result.modules, module_rows, strict=True):
        tar = storage.tar_path(m.dir)
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
        job_store.mark_succeeded(
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
    # A job queued before tau could be chosen cuts at the model's own, as it was asked then.
    tau = p.get("tau", loaded.modularization.tau)
    margin_pp = float(p.get("margin_pp", ModularizeConfig.margin_pp))
    ctx.phase("fine-tuning")
    module, metrics = compose_svc.build(
        loaded, data, classes, device=settings.device, finetune=p.get("finetune") or {},
        tau=tau, margin_pp=margin_pp,
    )
    ctx.phase("saving")
    manifest = compose_svc.manifest_for(model, loaded, classes, metrics, finetuned=True)
    stored = compose_svc.store(settings, module, manifest, token=f"job-{job.id}")
    now = utcnow()
    with factory() as s:
        comp = compose_svc.composition_row(
            [(model_id, classes, [str(class_names[c]) for c in classes])], metrics, stored,
            finetuned=True, job_id=job.id,
            key=compose_svc.classes_key(
                classes, compose_svc.tau_suffix(tau, margin_pp, loaded.modularization.tau)),
        )
        comp.api_key_id = job.api_key_id  # owned by whoever asked for the fine-tune
        s.add(comp)
        s.flush()
        job_store.mark_succeeded(
            s, job.id, ctx.worker, now, {**ctx.progress, "phase": "done"},
            {"composition_id": comp.id,
             **{k: metrics[k] for k in ("accuracy", "baseline_accuracy", "krr")}},
            composition_id=comp.id,
        )
        s.commit()



# ------------------------------------------------------------------------------- compose


def _compose(
    factory: sessionmaker[Session], settings: Settings, job: Job, ctx: JobContext
) -> None:
    """A composition too large for a request: the API's own composing, run here."""
    from sqlalchemy import select

    from app.db.models import Composition

    p = job.params
    with factory() as s:
        existing = s.scalar(select(Composition.id).where(  # as the API finds a repeat
            Composition.model_id == int(p["model_id"]), Composition.classes_key == p["key"],
            Composition.finetuned.is_(False)))
        if existing is None:
            ctx.phase("composing")
            inputs = compose_svc.Inputs(
                model=lambda m: compose_svc.load_model(settings, m),
                bundle=lambda name, size: datasets_svc.load_bundle(
                    settings, s, name, min_input_size=size),
            )
            if "modules" in p:
                rows = [_ready(s, Module, int(i)) for i in p["modules"]]
                comp = compose_svc.compose_modules(s, settings, inputs, rows,
                                                   int(p["calibration_per_class"]),
                                                   str(p["combine"]), p["key"])
            else:
                chosen = [(_ready(s, Model, int(m)), [int(c) for c in cs]) for m, cs in p["sources"]]
                comp = compose_svc.compose_sources(s, settings, inputs, chosen,
                                                   int(p["calibration_per_class"]),
                                                   str(p["combine"]), p["key"])
            comp.api_key_id = job.api_key_id
            comp.job_id = job.id
            s.add(comp)
            s.flush()
            existing = comp.id
        job_store.mark_succeeded(
            s, job.id, ctx.worker, utcnow(), {**ctx.progress, "phase": "done"},
            {"composition_id": existing}, composition_id=existing,
        )
        s.commit()


def _ready(s: Session, kind: type[Model] | type[Module], ident: int) -> Any:
    row = s.get(kind, ident)
    model = row if isinstance(row, Model) else getattr(row, "model", None)
    if row is None or model is None or model.status != ModelStatus.ready.value:
        raise ValueError(f"{kind.__name__.lower()} {ident} is gone or its model is not ready")
    return row
