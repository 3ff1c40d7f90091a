"""One run of the method: train -> modularize -> export the model and its class modules.

``run_pipeline`` is what ``mwt train``, the service's training job and the benchmarks
run. The caller supplies the data (already loaded: a CLI reads a name, the service may
read an upload), where to write (a :class:`Layout`, or none to keep everything in
memory), a progress callback and a cancellation check; it gets a :class:`PipelineResult`
with the model, its modularization, its metrics and the manifests written.

Artifact layout written for a ``Layout``::

    model_dir/                     weights.safetensors + manifest.json (kind "model")
    modules_dir/<dirname of c>/    one module per class c (kind "module")
    modules_dir/index.json         (if asked) class, name, dir, KRR, params, FLOPs, sha256
    checkpoint_dir/last.pt         the training checkpoint (resumed from when present)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mwt_core import __version__
from mwt_core.artifacts import ArtifactError, caller_fields, save_artifact
from mwt_core.config import (
    AUTO_TAU,
    ModularizeConfig,
    TrainConfig,
    check_margin,
    check_tau,
    validation_fraction,
)
from mwt_core.data.batches import ImageBatches
from mwt_core.data.bundle import split_validation
from mwt_core.data.datasets import DatasetBundle, DatasetError, InputSpec, load_dataset
from mwt_core.devices import resolve_device
from mwt_core.evaluation import class_recall, predictions
from mwt_core.metrics import count_flops, count_params, paired_latency
from mwt_core.models import MwTNet, architecture_info
from mwt_core.modularize import Modularization, modularize
from mwt_core.reuse import (
    ModuleClassifier,
    choose_tau,
    evaluate,
    extract_module,
    finetune_head,
    restrict,
)
from mwt_core.slimming import channels_last
from mwt_core.training import (
    CHECKPOINT_NAME,
    Progress,
    TrainingCancelled,
    TrainResult,
    load_checkpoint,
    same_run,
    train,
)

CREATED_BY = f"mwt_core {__version__}"


# --------------------------------------------------------------------------- data


def dataset_ref(name: str) -> str:
    """What ``load_dataset`` needs to find ``name`` again (an absolute path for files)."""
    path = Path(name).expanduser()
    if path.is_file():
        return str(path.resolve())
    return name


def load_training_data(name: str, arch: str, data_dir: Path | None = None,
                       train_limit: int | None = None, download: bool = False) -> DatasetBundle:
    """Dataset ``name`` shaped for ``arch`` (the ``min_input_size`` rule), optionally cut
    to its first ``train_limit`` training images."""
    data = load_dataset(name, data_dir, min_input_size=architecture_info(arch).min_input_size,
                        download=download)
    return _cut(data, train_limit)


def _cut(data: DatasetBundle, train_limit: int | None) -> DatasetBundle:
    if train_limit is None:
        return data
    if train_limit < data.num_classes:
        raise DatasetError(
            f"train_limit must be at least the number of classes ({data.num_classes})")
    return dataclasses.replace(data, train_x=data.train_x[:train_limit],
                               train_y=data.train_y[:train_limit])


def data_for_manifest(manifest: dict[str, Any], data_dir: Path | None = None) -> DatasetBundle:
    """The dataset an artifact was trained on, normalised with the artifact's input spec."""
    ref = manifest.get("dataset_ref") or manifest.get("dataset")
    if not isinstance(ref, str) or not ref:
        raise ArtifactError("the manifest names no dataset; cannot evaluate this artifact")
    arch = str((manifest.get("config") or {}).get("arch", ""))
    return as_trained(load_training_data(ref, arch, data_dir), manifest, ref)


def as_trained(data: DatasetBundle, manifest: dict[str, Any], ref: str | None = None
               ) -> DatasetBundle:
    """``data`` (the full dataset an artifact names, shaped for its architecture) as the
    artifact was trained on it: cut to the manifest's ``train_limit``, normalised with its
    input spec. The registry and a client holding the same artifact derive the same images
    from it (what a composition of modules fits on)."""
    ref = ref or str(manifest.get("dataset") or data.name)
    data = _cut(data, manifest.get("train_limit"))
    config = manifest.get("config") or {}
    if "input_spec" in manifest:
        spec = InputSpec.from_json(manifest["input_spec"])
        if spec.shape != data.spec.shape:
            raise DatasetError(
                f"dataset {ref!r} now gives {data.spec.shape} images but the artifact expects "
                f"{spec.shape}; it is not the data this artifact was trained on"
            )
        data = dataclasses.replace(data, spec=spec)
    expected = config.get("num_classes")
    if expected is not None and int(expected) != data.num_classes:
        raise DatasetError(
            f"dataset {ref!r} has {data.num_classes} classes but the artifact was trained on {expected}"
        )
    return data


def per_class_recall(model: torch.nn.Module, data: DatasetBundle, device: str = "auto") -> list[float]:
    """Per class: the fraction of its test images that ``model`` classifies correctly."""
    dev = resolve_device(device)
    model.to(dev)
    pred, y = predictions(model, ImageBatches(data.test_x, data.test_y, data.spec, dev).ordered(512))
    return class_recall(pred, y, data.num_classes)


# --------------------------------------------------------------------------- checkpoints


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot be resumed: unreadable, or written for other settings."""


def checkpoint_epoch(checkpoint_dir: Path, cfg: TrainConfig, *, restart_on_mismatch: bool
                     ) -> tuple[int, str | None]:
    """Epochs done by the checkpoint in ``checkpoint_dir`` (0 if none) and a note for the user.

    A checkpoint that is unreadable or was written for other settings is deleted (training
    starts over) when ``restart_on_mismatch``, else :class:`CheckpointMismatch` is raised.
    """
    path = checkpoint_dir / CHECKPOINT_NAME
    if not path.is_file():
        return 0, None
    try:
        state = load_checkpoint(path)
        same = same_run(state.get("config") or {}, cfg.to_json())
        done = int(state.get("epoch", 0))
        problem = None if same else "was written for other settings"
    except Exception as exc:  # torch raises many kinds of errors on a damaged file
        done, problem = 0, f"is unreadable ({' '.join(str(exc).split()) or type(exc).__name__})"
    if problem is None:
        return done, f"resuming from {path} (epoch {done}/{cfg.epochs})"
    if not restart_on_mismatch:
        raise CheckpointMismatch(f"checkpoint {path} {problem}")
    path.unlink(missing_ok=True)
    return 0, f"checkpoint {path} {problem}; starting over"


# --------------------------------------------------------------------------- manifests


def modularization_metrics(mod: Modularization) -> dict[str, Any]:
    """The model-level modularity figures recorded with a modularization."""
    return {"krr": mod.model_krr, "cohesion": mod.cohesion, "coupling": mod.coupling, "tau": mod.tau}


# Facts about the run that every module inherits from its model's manifest.
_INHERITED = ("dataset", "dataset_ref", "input_spec", "train_config")
_INHERITED_IF_SET = ("train_limit", "registry")


def module_manifest(base: dict[str, Any], module: ModuleClassifier, *, metrics: dict[str, Any],
                    created_by: str | None = None, extra: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Manifest of a module cut from the model whose (written) manifest is ``base``."""
    names = [str(n) for n in base.get("class_names") or []]
    manifest: dict[str, Any] = {key: base.get(key) for key in _INHERITED}
    manifest.update({
        "class_names": [names[c] if c < len(names) else str(c) for c in module.classes],
        "classes": list(module.classes),
        "dataset_class_names": names,
        "source_model": {
            "sha256": base.get("sha256"),
            "tau": (base.get("modularization") or {}).get("tau"),
        },
        "metrics": metrics,
        "created_by": created_by or base.get("created_by") or CREATED_BY,
    })
    manifest.update({key: base[key] for key in _INHERITED_IF_SET if base.get(key) is not None})
    manifest.update(extra or {})
    return manifest


def class_dirnames(class_names: Sequence[str]) -> list[str]:
    """A distinct, filesystem-safe directory name per class (its name where possible)."""
    used: set[str] = set()
    out = []
    for c, name in enumerate(class_names):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")[:64] or str(c)
        if safe in used:
            safe = f"{c}_{safe}"
        used.add(safe)
        out.append(safe)
    return out


# --------------------------------------------------------------------------- progress


@dataclass
class PipelineEvent:
    """What the pipeline is doing: a phase, a training report or a module being written.

    ``phase`` is "training", "modularizing" or "saving"; ``training`` is set on training
    reports; ``info`` carries the rest (``epoch``/``epochs``/``resumed_from_epoch`` when
    training starts, ``module``/``modules`` (1-based) while class modules are written).
    ``note`` is a sentence for a person (e.g. a checkpoint resumed or discarded).
    """

    phase: str
    training: Progress | None = None
    info: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


ProgressSink = Callable[[PipelineEvent], None]


class _Run:
    """Progress and cancellation plumbing of one pipeline run."""

    def __init__(self, progress: ProgressSink | None, should_stop: Callable[[], bool] | None) -> None:
        self.progress = progress
        self.should_stop = should_stop

    def emit(self, event: PipelineEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def check(self, where: str) -> None:
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled(f"stopped before {where}")


# --------------------------------------------------------------------------- export


@dataclass
class ModuleResult:
    """One exported class module."""

    class_index: int
    class_name: str
    dir: Path
    manifest: dict[str, Any]  # as written (with sha256)
    metrics: dict[str, Any]  # krr, cohesion, params, flops (+ accuracy: the model's class recall)
    kept_kernels: int
    total_kernels: int


# CPU latency of a module is timed at this batch, in rounds that run the module and the
# full model alternately (metrics.paired_latency). A job times every class's module, so it
# uses fewer rounds and a time budget: on a large network or one with hundreds of classes
# the modules past the budget are recorded as not timed rather than holding the job for hours.
LATENCY_BATCH = 64
EXPORT_LATENCY_ROUNDS = 5
EXPORT_LATENCY_BUDGET_S = 30.0


def _baseline(model: torch.nn.Module) -> torch.nn.Module:
    """The full model as modules are timed against it: a channels_last copy (the layout
    modules always run in; an NCHW model is slower on the CPU, which would flatter them)."""
    return channels_last(copy.deepcopy(model))


def _latencies(module: torch.nn.Module, baseline: torch.nn.Module, shape: tuple[int, int, int],
               batch: int, rounds: int = 15) -> dict[str, float]:
    """CPU milliseconds per image of ``module`` and of the full model (``baseline``, from
    :func:`_baseline`), timed together."""
    seconds = paired_latency([module, baseline], shape, batch=batch, rounds=rounds, warmup=1)
    return {"latency_ms": 1e3 * seconds[0] / batch, "full_latency_ms": 1e3 * seconds[1] / batch}


def export_class_modules(model: MwTNet, mod: Modularization, model_manifest: dict[str, Any],
                         modules_dir: Path, *, dirnames: Sequence[str] | None = None,
                         recall: Sequence[float] | None = None, created_by: str | None = None,
                         write_index: bool = True, progress: ProgressSink | None = None,
                         should_stop: Callable[[], bool] | None = None,
                         latency_batch: int = LATENCY_BATCH) -> list[ModuleResult]:
    """One module per class under ``modules_dir/<dirname>/`` (plus ``index.json`` if asked).

    ``model_manifest`` is the model's manifest as written (its sha256 identifies the
    source); ``recall`` (the model's per-class test recall) becomes each module's accuracy.
    Each module's CPU latency per image is timed beside the full model's (``latency_ms``,
    ``full_latency_ms``) unless ``latency_batch`` is 0, until ``EXPORT_LATENCY_BUDGET_S`` of
    timing is spent (later modules: not timed).
    """
    run = _Run(progress, should_stop)
    names = [str(n) for n in model_manifest.get("class_names") or range(mod.num_classes)]
    dirnames = list(dirnames) if dirnames is not None else class_dirnames(names)
    shape = InputSpec.from_json(model_manifest["input_spec"]).shape
    total = sum(int(m.numel()) for m in mod.class_masks[0])
    model.cpu().eval()
    modules_dir.mkdir(parents=True, exist_ok=True)
    out: list[ModuleResult] = []
    timing_spent = 0.0
    baseline: torch.nn.Module | None = None
    for c in range(mod.num_classes):
        run.emit(PipelineEvent("saving", info={"module": c + 1, "modules": mod.num_classes}))
        run.check(f"writing module {c + 1}/{mod.num_classes}")
        module = extract_module(model, mod, [c])
        metrics: dict[str, Any] = {"krr": float(mod.krr[c])}
        if recall is not None:
            metrics["accuracy"] = float(recall[c])
        metrics.update({"cohesion": float(mod.per_class_cohesion[c]),
                        "params": int(count_params(module)), "flops": int(count_flops(module, shape))})
        if latency_batch > 0 and timing_spent < EXPORT_LATENCY_BUDGET_S:
            started = time.perf_counter()
            if baseline is None:
                baseline = _baseline(model)  # once per export, not per class
            metrics.update(_latencies(module, baseline, shape, latency_batch, EXPORT_LATENCY_ROUNDS))
            timing_spent += time.perf_counter() - started
        directory = modules_dir / dirnames[c]
        written = save_artifact(directory, module, module_manifest(
            model_manifest, module, metrics=metrics, created_by=created_by))
        out.append(ModuleResult(
            class_index=c, class_name=names[c], dir=directory, manifest=written, metrics=metrics,
            kept_kernels=int(sum(int(m.sum()) for m in mod.class_masks[c])), total_kernels=total))
    if write_index:
        index = [{"class": m.class_index, "name": m.class_name, "dir": m.dir.name,
                  "krr": m.metrics["krr"], "params": m.metrics["params"],
                  "flops": m.metrics["flops"], "sha256": m.manifest["sha256"]} for m in out]
        (modules_dir / "index.json").write_text(json.dumps(index, indent=2))
    return out


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class Layout:
    """Where a run writes. ``modules_dir`` None: no class modules; ``checkpoint_dir`` None:
    no checkpoint (no resuming)."""

    model_dir: Path
    modules_dir: Path | None = None
    checkpoint_dir: Path | None = None
    module_dirnames: tuple[str, ...] | None = None  # default: from the class names
    write_index: bool = True

    @classmethod
    def run_dir(cls, out: Path) -> Layout:
        """``mwt train``'s layout: ``out/model``, ``out/modules``, ``out/checkpoint``."""
        return cls(out / "model", out / "modules", out / "checkpoint")

    @staticmethod
    def modules_beside(model_dir: Path) -> Path | None:
        """The class modules ``mwt train`` wrote next to ``model_dir`` (``out/modules`` of
        ``out/model``), or None: the modules a re-modularization must re-cut."""
        beside = Layout.run_dir(model_dir.parent)
        if model_dir.name != beside.model_dir.name or beside.modules_dir is None:
            return None
        return beside.modules_dir if (beside.modules_dir / "index.json").is_file() else None


@dataclass
class PipelineResult:
    """Everything one run produced."""

    config: TrainConfig
    data: DatasetBundle
    model: MwTNet  # on the CPU, in eval mode
    training: TrainResult
    modularization: Modularization | None
    metrics: dict[str, Any]  # the model's (also in its manifest)
    resumed_from_epoch: int
    manifest: dict[str, Any] | None = None  # the model's manifest as written (None: not saved)
    modules: list[ModuleResult] = field(default_factory=list)
    layout: Layout | None = None


def run_pipeline(
    cfg: TrainConfig,
    data: DatasetBundle,
    layout: Layout | None = None,
    *,
    tau: float = ModularizeConfig.tau,
    resume: bool = True,
    restart_on_mismatch: bool = False,
    dataset_ref: str | None = None,
    manifest_extra: dict[str, Any] | None = None,
    created_by: str = CREATED_BY,
    modularize_on: DatasetBundle | None = None,
    progress: ProgressSink | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PipelineResult:
    """Train ``cfg`` on ``data``; if MwT, modularize at ``tau``; save per ``layout``.

    Resumes from ``layout.checkpoint_dir`` unless ``resume`` is false; a checkpoint for
    other settings fails the run (:class:`CheckpointMismatch`) unless
    ``restart_on_mismatch``. ``manifest_extra`` goes into the model's manifest (and, for
    ``train_limit`` and ``registry``, its modules'). ``modularize_on`` modularizes over
    another dataset's training split (default: ``data``). ``should_stop()`` returning
    true ends the run with :class:`~mwt_core.training.TrainingCancelled`, checked during
    training and between phases and modules.
    """
    check_tau(tau)
    run = _Run(progress, should_stop)
    ckpt_dir = layout.checkpoint_dir if layout is not None else None
    resumed = 0
    if ckpt_dir is not None and resume:
        resumed, note = checkpoint_epoch(ckpt_dir, cfg, restart_on_mismatch=restart_on_mismatch)
        if note:
            run.emit(PipelineEvent("training", note=note))
    run.emit(PipelineEvent("training", info={"epoch": resumed, "epochs": cfg.epochs,
                                             "resumed_from_epoch": resumed}))
    result = train(cfg, data, progress=(lambda p: run.emit(PipelineEvent("training", training=p))),
                   checkpoint_dir=ckpt_dir, resume=resume, should_stop=should_stop)
    run.check("modularization")
    model = result.model
    recall = per_class_recall(model, data, cfg.device)

    mod = None
    modularize_s = None
    if cfg.modular:
        run.emit(PipelineEvent("modularizing", info={"tau": tau}))
        t0 = time.perf_counter()
        mod = modularize(model, modularize_on or data, tau=tau, device=cfg.device)
        modularize_s = time.perf_counter() - t0
    model = model.cpu().eval()
    shape = data.spec.shape
    metrics: dict[str, Any] = {
        "test_acc": float(result.test_acc),
        "accuracy": float(result.test_acc),
        "train_seconds": float(result.train_seconds),
        "epochs": cfg.epochs,
        "epochs_run": int(result.epochs_run),
        "resumed_from_epoch": resumed,
        "params": int(count_params(model)),
        "flops": int(count_flops(model, shape)),
        "class_recall": recall,
        # On the validation slice (TrainConfig.val_fraction); None: no slice.
        "val_acc": result.val_acc,
        # The budget asked and reached (KernelBudget.report); None for standard training.
        "kernel_budget": result.budget,
    }
    if mod is not None:
        metrics.update(modularization_metrics(mod))
        metrics.update({
            "modularize_seconds": modularize_s,
            "module_krr": mod.krr,
            "per_class_cohesion": mod.per_class_cohesion,
            "layer_coupling": mod.layer_coupling(),
        })
    out = PipelineResult(config=cfg, data=data, model=model, training=result, modularization=mod,
                         metrics=metrics, resumed_from_epoch=resumed, layout=layout)
    if layout is None:
        return out

    run.check("saving")
    run.emit(PipelineEvent("saving"))
    manifest: dict[str, Any] = {
        "dataset": data.name,
        "dataset_ref": dataset_ref,
        "class_names": [str(n) for n in data.class_names],
        "input_spec": data.spec.to_json(),
        "train_config": cfg.to_json(),
        "metrics": metrics,
        "history": result.history,
        "created_by": created_by,
        **(manifest_extra or {}),
    }
    if mod is not None:
        manifest["modularization"] = mod.to_json()
    out.manifest = save_artifact(layout.model_dir, model, manifest)
    if mod is not None and layout.modules_dir is not None:
        out.modules = export_class_modules(
            model, mod, out.manifest, layout.modules_dir, dirnames=layout.module_dirnames,
            recall=recall, created_by=created_by, write_index=layout.write_index,
            progress=progress, should_stop=should_stop)
    return out


# --------------------------------------------------------------------------- reuse of a class set


def _ratio(part: float, whole: float) -> float:
    return float(part) / float(whole) if whole else float("nan")


class NoValidationSlice(ValueError):
    """tau "auto" was asked of a model trained without a validation slice."""


def validation_slice(manifest: dict[str, Any], data: DatasetBundle
                     ) -> tuple[DatasetBundle, DatasetBundle] | None:
    """``(fit, val)``: the validation slice the model of ``manifest`` held out of ``data``
    (its training split as trained: :func:`as_trained`), recomputed from its recorded
    ``val_fraction`` and seed; None where it held none."""
    cfg = manifest.get("train_config") or {}
    fraction = validation_fraction(cfg)
    if fraction <= 0:
        return None
    fit, val = split_validation(data, fraction, int(cfg.get("seed", 0)))
    return None if val is None else (fit, val)


def composition_validation(sources: Sequence[tuple[dict[str, Any], DatasetBundle, list[int]]]
                           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The validation slices of a composition's sources as one labelled set (what
    ``combine="auto"`` chooses its method on): ``sources[i]`` is part i's manifest (a model's,
    or a module's, which inherits its model's training config), its data as trained
    (:func:`as_trained`) and its classes. None where a source's model held no slice. The
    registry and a client holding the same artifacts derive the same images."""
    from mwt_core.compose import validation_union

    slices: list[tuple[DatasetBundle, list[int]] | None] = []
    for manifest, trained_on, classes in sources:
        split = validation_slice(manifest, trained_on)
        slices.append(None if split is None else (split[1], list(classes)))
    return validation_union(slices)


@dataclass
class ModuleTau:
    """The modularization a class set's module is cut from, and how its tau was decided.

    ``record`` goes into the module's metrics and manifest: ``tau``; ``tau_mode`` ("auto":
    chosen on the validation slice, "fixed": given, "model": the model's own, where "auto"
    could not choose); ``margin_pp``, ``module_val_acc``, ``full_val_acc``, ``val_samples``
    and ``met_margin`` (auto only, else None); ``tau_note`` (why "auto" did not choose).
    """

    modularization: Modularization
    record: dict[str, Any]
    tried: list[tuple[float, float]] = field(default_factory=list)


def module_tau(model: MwTNet, manifest: dict[str, Any], mod: Modularization, data: DatasetBundle,
               classes: list[int], tau: float | str | None = None,
               margin_pp: float = ModularizeConfig.margin_pp, device: str = "auto") -> ModuleTau:
    """Decide the threshold of the module of ``classes`` of a saved model (``manifest``, its
    stored modularization ``mod``, ``data`` its dataset as trained).

    ``tau`` a number: that threshold (the stored modularization if it is the model's own,
    else the training split modularized again at it). ``"auto"``:
    :func:`mwt_core.reuse.choose_tau` on the model's validation slice with ``margin_pp``;
    :class:`NoValidationSlice` if the model was trained without one. None (the default):
    "auto" where the model has a slice, else its own tau.

    "auto" cannot choose for one class (its module's accuracy among its classes is 100%
    whatever it keeps) nor without validation images of the classes: the model's own
    modularization is used, and ``tau_note`` says why.
    """
    check_margin(margin_pp)
    split = validation_slice(manifest, data)
    record: dict[str, Any] = {"tau": mod.tau, "tau_mode": "model", "margin_pp": None,
                              "module_val_acc": None, "full_val_acc": None, "val_samples": None,
                              "met_margin": None, "tau_note": None}
    if tau is None:
        if split is None:
            return ModuleTau(mod, record)
        tau = AUTO_TAU
    if tau != AUTO_TAU:
        if isinstance(tau, str):
            raise ValueError(f"tau must be {AUTO_TAU!r} or a number in (0, 1], got {tau!r}")
        value = check_tau(float(tau))
        if abs(value - mod.tau) > 1e-9:
            mod = modularize(model, data, tau=value, device=device)
        return ModuleTau(mod, {**record, "tau": mod.tau, "tau_mode": "fixed"})
    if split is None:
        raise NoValidationSlice(
            f"the model was trained without a validation slice (val_fraction 0, or recorded "
            f"before the slice existed), so tau {AUTO_TAU!r} has nothing to choose on: give a "
            f"fixed tau (a number in (0, 1]; the model's own is {mod.tau:g}) or retrain it with "
            "val_fraction > 0")
    fit, val = split
    unjudged = None
    if len(classes) < 2:
        unjudged = "one class: its module always answers that class, so accuracy cannot size it"
    elif not bool(torch.isin(val.test_y, torch.tensor(classes)).any()):
        unjudged = "the validation slice holds no images of these classes"
    if unjudged is not None:
        return ModuleTau(mod, {**record, "margin_pp": float(margin_pp),
                               "tau_note": f"not chosen ({unjudged}); the model's own tau is used"})
    choice = choose_tau(model, fit, val, classes, margin_pp, device=device)
    return ModuleTau(choice.modularization, {
        **record, "tau": choice.tau, "tau_mode": AUTO_TAU, "margin_pp": choice.margin_pp,
        "module_val_acc": choice.module_val_acc, "full_val_acc": choice.full_val_acc,
        "val_samples": choice.val_samples, "met_margin": choice.met_margin,
        "tau_note": None if choice.met_margin else (
            f"no tau of the grid kept the module within {choice.margin_pp:g} pp on the "
            f"validation slice; the grid's smallest ({choice.tau:g}) is used")}, choice.tried)


def extract_classes(model: MwTNet, manifest: dict[str, Any], mod: Modularization,
                    data: DatasetBundle, classes: list[int], out: Path, *, finetune_epochs: int = 0,
                    mask_generators: bool = True, device: str = "auto",
                    created_by: str | None = None, progress: ProgressSink | None = None,
                    latency_batch: int = LATENCY_BATCH, tau: float | str | None = None,
                    margin_pp: float = ModularizeConfig.margin_pp) -> dict[str, Any]:
    """Cut the module of ``classes`` from a saved model (``manifest``), measure it against
    the full model restricted to the same classes (accuracy, size and, unless
    ``latency_batch`` is 0, CPU latency), optionally fine-tune its head, save it to ``out``;
    returns the figures. ``tau`` and ``margin_pp``: which threshold the module is cut at
    (:func:`module_tau`; by default chosen on the validation slice where the model has one),
    recorded in the module's metrics and manifest (``tau_choice``)."""
    if finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
    run = _Run(progress, None)
    shape = data.spec.shape
    run.emit(PipelineEvent("deciding tau"))
    decided = module_tau(model, manifest, mod, data, classes, tau, margin_pp, device)
    mod = decided.modularization
    run.emit(PipelineEvent("extracting the module"))
    module = extract_module(model, mod, classes, keep_mask_generators=mask_generators)
    run.emit(PipelineEvent("evaluating"))
    zero_acc = evaluate(module, data, classes, device=device)
    full_acc = evaluate(restrict(model, classes, data.num_classes), data, classes, device=device)
    ft_acc = None
    if finetune_epochs:
        run.emit(PipelineEvent(f"fine-tuning the head ({finetune_epochs} epochs)"))
        module = finetune_head(module, data, epochs=finetune_epochs, device=device)
        ft_acc = evaluate(module, data, classes, device=device)
    module.cpu()
    model.cpu()
    params, full_params = count_params(module), count_params(model)
    flops, full_flops = count_flops(module, shape), count_flops(model, shape)
    latency = full_latency = None
    if latency_batch > 0:
        run.emit(PipelineEvent("timing module and model"))
        timed = _latencies(module, _baseline(model), shape, latency_batch)
        latency, full_latency = timed["latency_ms"], timed["full_latency_ms"]
    acc = ft_acc if ft_acc is not None else zero_acc
    metrics = {
        "test_acc": acc, "zero_shot_acc": zero_acc, "finetuned_acc": ft_acc,
        "full_model_acc": full_acc, "krr": module.krr, "params": params, "flops": flops,
        "full_params": full_params, "full_flops": full_flops, **decided.record,
    }
    written = save_artifact(out, module, module_manifest(
        manifest, module, metrics=metrics, created_by=created_by,
        extra={"finetune_epochs": finetune_epochs, "mask_generators": mask_generators,
               "tau_choice": {**decided.record, "tried": [[t, a] for t, a in decided.tried]}}))
    return {
        **decided.record,
        "out": str(out), "classes": classes, "class_names": written["class_names"], "krr": module.krr,
        "accuracy": acc, "zero_shot_acc": zero_acc, "finetuned_acc": ft_acc,
        "full_model_acc": full_acc, "accuracy_loss": full_acc - acc,
        "params": params, "full_params": full_params, "params_ratio": _ratio(params, full_params),
        "flops": flops, "full_flops": full_flops, "flops_ratio": _ratio(flops, full_flops),
        "finetune_epochs": finetune_epochs, "mask_generators": mask_generators,
        "latency_ms": latency, "full_latency_ms": full_latency, "latency_batch": latency_batch,
        "latency_ratio": None if latency is None or full_latency is None
        else _ratio(latency, full_latency),
        "sha256": written["sha256"],
    }


# --------------------------------------------------------------------------- re-modularization


@dataclass
class Remodularized:
    """A saved model modularized again."""

    modularization: Modularization
    manifest: dict[str, Any]  # the model's manifest as rewritten
    seconds: float
    modules: list[ModuleResult]


def remodularize(model: MwTNet, manifest: dict[str, Any], data: DatasetBundle, model_dir: Path, *,
                 tau: float = ModularizeConfig.tau, device: str = "auto",
                 modules_dir: Path | None = None, progress: ProgressSink | None = None
                 ) -> Remodularized:
    """Modularize the saved model in ``model_dir`` (loaded: ``model``, ``manifest``) at
    ``tau``, rewrite its manifest (weights unchanged) and optionally export class modules."""
    check_tau(tau)
    run = _Run(progress, None)
    run.emit(PipelineEvent("modularizing", info={"tau": tau}))
    t0 = time.perf_counter()
    mod = modularize(model, data, tau=tau, device=device)
    seconds = time.perf_counter() - t0
    new = caller_fields(manifest)
    new["modularization"] = mod.to_json()
    new["metrics"] = {**(manifest.get("metrics") or {}), **modularization_metrics(mod),
                      "modularize_seconds": seconds}
    model.cpu()
    written = save_artifact(model_dir, model, new)
    modules: list[ModuleResult] = []
    if modules_dir is not None:
        recall = (manifest.get("metrics") or {}).get("class_recall")
        modules = export_class_modules(model, mod, written, modules_dir, recall=recall,
                                       progress=progress)
    return Remodularized(mod, written, seconds, modules)
