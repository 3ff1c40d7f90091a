"""Composition: a classifier for some classes of one model or several, from their modules.

One model (DESIGN §1.5): the module of the classes' union, measured against the full model.
Several models (DESIGN §2): one module per model side by side, their outputs combined by a
``combine`` method fitted on the models' training images. Stored per-class modules (the
``modules`` form): each stored module is a part as it is, so a client holding the same
downloaded modules rebuilds the same classifier (``mwt_core.module_parts``). Used
synchronously by the API (zero-training composition) and by the fine-tuning job.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, select

from app import storage
from app.db.models import Composition, CompositionSource, Model, ModelStatus, Module
from app.lru import Lru
from app.settings import Settings
from mwt_core.compose_options import AUTO_COMBINE, CompositionError
from mwt_core.config import AUTO_TAU, ModularizeConfig

__all__ = ["CompositionError"]  # re-exported: the router and the worker catch it from here

if TYPE_CHECKING:
    from torch import nn

    from mwt_core.compose import Part
    from mwt_core.data.datasets import DatasetBundle
    from mwt_core.models import MwTNet
    from mwt_core.modularize import Modularization




def resolve_classes(model: Model, classes: list[int | str]) -> list[int]:
    """Class indices (or names) -> indices, validated against the model's classes."""
    from mwt_core.data.classes import ClassListError
    from mwt_core.data.classes import resolve_classes as resolve

    try:
        return resolve(classes, list(model.class_names), owner=f"model {model.id}")
    except ClassListError as exc:
        raise CompositionError(str(exc)) from None


def standard_model_for(db: Any, picks: list[Pick] | list[ModulePick]) -> Model | None:
    """A ready standard (``modular=false``) model of the dataset and architecture every source
    shares, if the registry holds one (the newest): the paper's baseline for accuracy loss."""
    datasets = {p.model.dataset for p in picks}
    archs = {p.model.arch for p in picks}
    if len(datasets) != 1 or len(archs) != 1:
        return None
    return db.scalar(
        select(Model)
        .where(
            Model.dataset == datasets.pop(),
            Model.arch == archs.pop(),
            Model.modular.is_(False),
            Model.status == ModelStatus.ready.value,
            Model.artifact_path.is_not(None),
        )
        .order_by(Model.id.desc())
        .limit(1)
    )


def load_standard(settings: Settings, model: Model) -> nn.Module:
    """A standard model's network (only its logits are used, so no modules are needed)."""
    from mwt_core.artifacts import load_artifact

    assert model.artifact_path is not None  # the query asked for one
    net, _ = load_artifact(storage.resolve(settings.artifacts, model.artifact_path), device="cpu")
    return net


@dataclass
class LoadedModel:
    net: MwTNet
    modularization: Modularization
    manifest: dict[str, Any]
    lock: threading.Lock


def load_model(settings: Settings, model: Model) -> LoadedModel:
    from mwt_core.artifacts import load_artifact
    from mwt_core.models import MwTNet
    from mwt_core.modularize import Modularization

    if model.artifact_path is None:
        raise CompositionError(f"model {model.id} has no artifact (status {model.status})")
    directory = storage.resolve(settings.artifacts, model.artifact_path)
    net, manifest = load_artifact(directory, device="cpu")
    if not manifest.get("modularization"):
        raise CompositionError(
            f"model {model.id} was trained without MwT: it has no modules to compose"
        )
    modularization = Modularization.from_json(manifest["modularization"])
    if not isinstance(net, MwTNet):
        raise CompositionError(f"model {model.id}'s artifact is not a full model ({manifest.get('kind')})")
    return LoadedModel(net, modularization, manifest, threading.Lock())


class ModelCache(Lru[tuple[int, str], LoadedModel]):
    """Recently used models, loaded once per process (compositions must answer fast)."""

    def load(self, settings: Settings, model: Model) -> LoadedModel:
        return self.get((model.id, model.sha256 or ""), lambda: load_model(settings, model))

    def forget_model(self, model_id: int) -> None:
        self.forget(lambda key: key[0] == model_id)


def build(
    loaded: LoadedModel,
    data: DatasetBundle,
    classes: list[int],
    *,
    device: str = "cpu",
    finetune: dict[str, Any] | None = None,
    tau: float | str | None = None,
    margin_pp: float = ModularizeConfig.margin_pp,
) -> tuple[nn.Module, dict[str, Any]]:
    """Extract (and optionally fine-tune) the module for ``classes``; measure it on the test split.

    ``tau``, ``margin_pp``: the module's threshold (``mwt_core.pipeline.module_tau``: "auto"
    chooses it on the model's validation slice; None: auto where the model has one, else the
    model's own); how it was decided goes into the metrics."""
    from mwt_core.data.datasets import DatasetError
    from mwt_core.metrics import count_flops, count_params
    from mwt_core.pipeline import NoValidationSlice, as_trained, module_tau
    from mwt_core.reuse import evaluate, extract_module, finetune_head, restrict

    try:
        trained_on = as_trained(data, loaded.manifest)  # the split the validation slice is cut from
    except DatasetError as exc:
        raise SourceUnavailable(f"the model's dataset cannot be read as trained: {exc}") from None
    with loaded.lock:  # the cached full model is shared between request threads
        try:
            decided = module_tau(loaded.net, loaded.manifest, loaded.modularization, trained_on,
                                 classes, tau, margin_pp, device)
        except NoValidationSlice as exc:
            raise CompositionError(f"tau {AUTO_TAU!r}: {exc}") from None
        module = extract_module(loaded.net, decided.modularization, classes)
        baseline = evaluate(
            restrict(loaded.net, classes, loaded.modularization.num_classes),
            data,
            classes,
            device=device,
        )
    zero_shot = evaluate(module, data, classes, device=device)
    metrics: dict[str, Any] = {"zero_training_accuracy": zero_shot, **decided.record,
                               "tau_tried": [[t, a] for t, a in decided.tried]}
    accuracy = zero_shot
    if finetune:
        module = finetune_head(
            module,
            data,
            epochs=int(finetune.get("epochs", 5)),
            lr=float(finetune.get("lr", 0.01)),
            batch_size=int(finetune.get("batch_size", 64)),
            seed=int(finetune.get("seed", 0)),
            device=device,
        )
        accuracy = evaluate(module, data, classes, device=device)
        metrics["finetune"] = dict(finetune)
    module = module.cpu().eval()
    metrics.update(
        {
            "accuracy": accuracy,
            "baseline_accuracy": baseline,
            "accuracy_loss": baseline - accuracy,
            "krr": float(getattr(module, "krr", None) or decided.modularization.krr_of(classes)),
            "params": int(count_params(module)),
            "flops": int(count_flops(module, data.spec.shape)),
            "test_samples": int(sum(int((data.test_y == c).sum()) for c in classes)),
        }
    )
    return module, metrics


def manifest_for(
    model: Model, loaded: LoadedModel, classes: list[int], metrics: dict[str, Any], finetuned: bool
) -> dict[str, Any]:
    """A composition's manifest, with the keys mwt_core's CLI reads (dataset, classes, input spec...)."""
    src = loaded.manifest
    names = [str(n) for n in model.class_names]
    return {
        "dataset": src.get("dataset", model.dataset),
        "dataset_ref": src.get("dataset_ref"),
        "class_names": [names[c] for c in classes],
        "classes": list(classes),
        "dataset_class_names": names,
        "input_spec": src.get("input_spec"),
        "train_config": src.get("train_config"),
        "source_model": {"sha256": src.get("sha256"), "tau": loaded.modularization.tau},
        # How the module's own threshold was decided (mwt_core.pipeline.ModuleTau.record).
        "tau_choice": {key: metrics.get(key) for key in TAU_RECORD_KEYS}
        | {"tried": metrics.get("tau_tried") or []},
        "registry": {
            "model_id": model.id,
            "model_name": model.name,
            "model_version": model.version,
        },
        "finetuned": finetuned,
        "metrics": metrics,
        "created_by": "mwt-hub",
    }


def store(
    settings: Settings, module: nn.Module, manifest: dict[str, Any], token: str | None = None
) -> tuple[str, str, int]:
    """Save the module under ``compositions/<token>/`` and pack it. Returns (relative path, sha256, size)."""
    from mwt_core.artifacts import save_artifact

    token = token or uuid.uuid4().hex
    art = settings.artifacts / "compositions" / token / storage.COMPOSITION_ARTIFACT
    save_artifact(art, module, manifest)
    sha, size = storage.pack(art)
    return storage.relative(settings.artifacts, art), sha, size


def uses_model(model_id: int) -> ColumnElement[bool]:
    """Filter: compositions that take classes from ``model_id``, as first source or any other."""
    return (Composition.model_id == model_id) | Composition.id.in_(
        select(CompositionSource.composition_id).where(CompositionSource.model_id == model_id)
    )


MAX_KEY = 400  # the column's width; longer keys are hashed

# The keys of how a module's tau was decided, in its metrics and manifest.
TAU_RECORD_KEYS = ("tau", "tau_mode", "margin_pp", "module_val_acc", "full_val_acc",
                   "val_samples", "met_margin", "tau_note")


def tau_suffix(tau: float | str | None, margin_pp: float, model_tau: float | None) -> str:
    """The part of a one-model composition's key that says how its tau is decided: none for
    the model's own tau (the keys written before tau could be chosen), else the given tau, or
    "auto" with its margin, so compositions cut at different thresholds never share a key."""
    if tau is None:
        return ""
    if tau == AUTO_TAU:
        return f"@tau={AUTO_TAU}:{float(margin_pp)!r}"
    value = float(tau)
    if model_tau is not None and abs(value - float(model_tau)) <= 1e-9:
        return ""
    return f"@tau={value!r}"


def classes_key(classes: list[int], suffix: str = "") -> str:
    """The registry's lookup key of one model's class list (one zero-training composition per
    key); ``suffix``: :func:`tau_suffix`."""
    return _fit(",".join(map(str, classes)) + suffix)


def sources_key(sources: list[tuple[int, list[int]]], calibration_per_class: int,
                combine: str = "scale_bias", tau: str = "") -> str:
    """The lookup key of a cross-model composition: every (model, classes), the method and,
    for the labelled methods, the calibration. Keys of ``scale_bias`` compositions are those
    written before ``combine`` existed, so those compositions are still found. One source is
    a class set of one model: :func:`classes_key`, with ``tau`` (:func:`tau_suffix`)."""
    from mwt_core.compose_options import LABELLED_METHODS

    if len(sources) == 1:
        return classes_key(sources[0][1], tau)
    raw = "|".join(f"{m}:{','.join(map(str, c))}" for m, c in sources)
    if combine == "scale_bias":
        return _fit(f"{raw}@{calibration_per_class}")
    per_class = calibration_per_class if combine in LABELLED_METHODS else 0
    return _fit(f"{raw}@{combine}:{per_class}")


def _fit(key: str) -> str:
    return key if len(key) <= MAX_KEY else "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Pick:
    """One source of a composition: a registry model, loaded, its dataset and chosen classes."""

    model: Model
    loaded: LoadedModel
    data: DatasetBundle
    classes: list[int]

    @property
    def names(self) -> list[str]:
        return [str(self.model.class_names[c]) for c in self.classes]


def output_labels(picks: list[Pick]) -> list[str]:
    """Class names in output order; prefixed with the model id when two sources share a name."""
    from mwt_core.compose import distinct_labels

    return distinct_labels([(f"m{p.model.id}", p.names) for p in picks])


def build_across(
    picks: list[Pick],
    calibration_per_class: int,
    *,
    combine: str,
    device: str = "cpu",
    standard: tuple[Model, nn.Module] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compose modules of several registry models with ``combine``; measure it
    (``mwt_core.compose``). ``standard``: a standard model of the sources' dataset and
    architecture, for the paper's accuracy loss."""
    from mwt_core import compose as core

    specs = {(p.data.spec.channels, p.data.spec.size) for p in picks}
    if len(specs) > 1:
        shapes = ", ".join(
            f"model {p.model.id}: {p.data.spec.channels}x{p.data.spec.size}x{p.data.spec.size}"
            for p in picks
        )
        raise CompositionError(
            f"the models take different input shapes ({shapes}); compose models trained on "
            "images of one shape"
        )
    sources = [
        core.Source(p.loaded.net, p.loaded.modularization, p.classes, p.data.spec) for p in picks
    ]
    # The sources' validation slices (what combine="auto" chooses on), cut before the shared
    # models are locked: it reads the data alone.
    validation = None
    if combine == AUTO_COMBINE:
        from mwt_core.pipeline import as_trained, composition_validation

        validation = composition_validation([
            (p.loaded.manifest, as_trained(p.data, p.loaded.manifest), p.classes) for p in picks])
    with ExitStack() as stack:
        # Cached full models are shared between request threads; lock them in one order.
        for p in sorted(picks, key=lambda p: p.model.id):
            stack.enter_context(p.loaded.lock)
        std = None
        if standard is not None:  # loaded for this request alone: no lock needed
            std = (standard[1], picks[0].data.spec, [c for p in picks for c in p.classes])
        composed, metrics = core.compose_and_measure(
            sources,
            [p.data for p in picks],
            calibration_per_class,
            labels=output_labels(picks),
            device=device,
            combine=combine,
            standard=std,
            validation=validation,
        )
    for p, src in zip(picks, metrics["sources"], strict=True):
        src["model_id"] = p.model.id
    if standard is not None:
        metrics["standard_model_id"] = standard[0].id
    return composed, metrics


def manifest_across(picks: list[Pick], metrics: dict[str, Any]) -> dict[str, Any]:
    """A cross-model composition's manifest (``mwt_core.compose.composition_manifest``)."""
    from mwt_core.compose import composition_manifest

    sources = [
        {
            "model_id": p.model.id,
            "model_name": p.model.name,
            "model_version": p.model.version,
            "dataset": p.model.dataset,
            "sha256": p.loaded.manifest.get("sha256"),
            "tau": p.loaded.modularization.tau,
            "classes": p.classes,
            "class_names": p.names,
        }
        for p in picks
    ]
    return composition_manifest(
        picks[0].data.spec, output_labels(picks), sources, metrics, created_by="mwt-hub"
    )


def composition_row(
    sources: list[tuple[int, list[int], list[str]]],
    metrics: dict[str, Any],
    stored: tuple[str, str, int],
    *,
    finetuned: bool,
    key: str,
    labels: list[str] | None = None,
    job_id: str | None = None,
) -> Composition:
    """The registry row of a stored composition (``stored`` is what :func:`store` returned).

    ``sources`` holds ``(model_id, classes, class_names)`` per source model, in output order.
    """
    rel, sha, size = stored
    classes = [c for _, cs, _ in sources for c in cs]
    return Composition(
        model_id=sources[0][0],
        classes=classes,
        class_names=labels or [n for _, _, ns in sources for n in ns],
        classes_key=key,
        finetuned=finetuned,
        status=ModelStatus.ready.value,
        accuracy=metrics["accuracy"],
        baseline_accuracy=metrics["baseline_accuracy"],
        krr=metrics["krr"],
        params=metrics["params"],
        flops=metrics["flops"],
        metrics=metrics,
        artifact_path=rel,
        sha256=sha,
        size_bytes=size,
        job_id=job_id,
        sources=[
            CompositionSource(position=i, model_id=m, classes=list(cs), class_names=list(ns))
            for i, (m, cs, ns) in enumerate(sources)
        ],
    )


def tar_of(settings: Settings, artifact_path: str) -> Path:
    """The downloadable tar that belongs to an artifact directory."""
    return storage.tar_path(storage.resolve(settings.artifacts, artifact_path))


# ------------------------------------------------------------------ compositions of modules


@dataclass
class ModulePick:
    """One part of a composition of stored modules: the registry row, the module artifact as a
    part, its dataset as its model was trained on it, and its manifest."""

    module: Module
    part: Part
    data: DatasetBundle
    manifest: dict[str, Any]

    @property
    def model(self) -> Model:
        return self.module.model


def load_module_part(settings: Settings, module: Module, data: DatasetBundle) -> ModulePick:
    """The stored module artifact (sha256-checked) as a part; ``data``: the full dataset it
    names (shaped for its architecture), cut and normalised here as its model was trained."""
    from mwt_core.artifacts import load_artifact
    from mwt_core.module_parts import module_part
    from mwt_core.pipeline import as_trained

    net, manifest = load_artifact(storage.resolve(settings.artifacts, module.artifact_path))
    return ModulePick(module, module_part(net, manifest), as_trained(data, manifest), manifest)


def modules_key(module_ids: list[int], calibration_per_class: int, combine: str) -> str:
    """The lookup key of a composition of stored modules (apart from every sources key)."""
    from mwt_core.compose_options import LABELLED_METHODS

    per_class = calibration_per_class if combine in LABELLED_METHODS else 0
    return _fit(f"modules:{','.join(map(str, module_ids))}@{combine}:{per_class}")


def module_labels(picks: list[ModulePick]) -> list[str]:
    """Class names in output order; prefixed with the model id when two parts share a name
    (the prefix ``mwt_core.module_parts.module_tag`` gives a registry model's modules)."""
    from mwt_core.compose import distinct_labels

    return distinct_labels([(f"m{p.module.model_id}", p.part.class_names) for p in picks])


def build_from_modules(
    picks: list[ModulePick],
    calibration_per_class: int,
    *,
    combine: str,
    models: dict[int, LoadedModel],
    standard: tuple[Model, nn.Module] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compose stored modules with ``combine`` and measure it (``mwt_core.compose.measure_parts``,
    the routine a client runs on the downloaded modules). ``models``: the modules' whole models
    by id, for the baseline of what cutting costs."""
    from mwt_core import compose as core
    from mwt_core.reuse import restrict

    shapes = {(p.part.spec.channels, p.part.spec.size) for p in picks}
    if len(shapes) > 1:
        listed = ", ".join(
            f"module {p.module.id}: {p.part.spec.channels}x{p.part.spec.size}x{p.part.spec.size}"
            for p in picks
        )
        raise CompositionError(
            f"the modules take different input shapes ({listed}); compose modules of models "
            "trained on images of one shape"
        )
    validation = None
    if combine == AUTO_COMBINE:  # the modules' data are already as their models trained
        from mwt_core.pipeline import composition_validation

        validation = composition_validation([(p.manifest, p.data, p.part.classes) for p in picks])
    with ExitStack() as stack:
        # Cached whole models are shared between request threads; lock them in one order.
        for model_id in sorted(models):
            stack.enter_context(models[model_id].lock)
        parts = []
        for p in picks:
            loaded = models[p.module.model_id]
            full = restrict(loaded.net, p.part.classes, loaded.modularization.num_classes)
            parts.append(replace(p.part, full=full))
        std = None
        if standard is not None:  # loaded for this request alone: no lock needed
            std = (standard[1], picks[0].data.spec, [c for p in picks for c in p.part.classes])
        composed, metrics = core.measure_parts(
            parts,
            [p.data for p in picks],
            calibration_per_class,
            labels=module_labels(picks),
            combine=combine,
            standard=std,
            validation=validation,
        )
    for p, src in zip(picks, metrics["sources"], strict=True):
        src.update(module_id=p.module.id, model_id=p.module.model_id)
    if standard is not None:
        metrics["standard_model_id"] = standard[0].id
    return composed, metrics


def manifest_modules(picks: list[ModulePick], metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a composition of stored modules: where each part came from."""
    from mwt_core.compose import composition_manifest

    sources = [
        {
            "module_id": p.module.id,
            "model_id": p.module.model_id,
            "model_name": p.model.name,
            "model_version": p.model.version,
            "dataset": p.module.dataset,
            "module_sha256": p.manifest.get("sha256"),
            "sha256": (p.manifest.get("source_model") or {}).get("sha256"),
            "classes": p.part.classes,
            "class_names": p.part.class_names,
        }
        for p in picks
    ]
    return composition_manifest(
        picks[0].part.spec, module_labels(picks), sources, metrics, created_by="mwt-hub"
    )


# ------------------------------------------------------------- one composition, end to end
# Written once for both callers: the API composes in the request (through its caches) and a
# compose job does the same work in a worker when the composition is too large for a request.


@dataclass
class Inputs:
    """Where a composition's models and datasets come from: ``model`` loads a registry model,
    ``bundle`` a dataset by name for networks of at least that input size."""

    model: Callable[[Model], LoadedModel]
    bundle: Callable[[str, int], DatasetBundle]


class SourceUnavailable(ValueError):
    """An artifact or dataset a composition needs cannot be read (HTTP 409)."""


@contextmanager
def _loading(what: str) -> Iterator[None]:
    try:
        yield
    except CompositionError:  # before ValueError: it is one, and says what to change
        raise
    except (FileNotFoundError, ValueError) as exc:
        raise SourceUnavailable(f"{what} cannot be loaded: {exc}") from None


def _standard(db: Any, settings: Settings, picks: list[Pick] | list[ModulePick]
              ) -> tuple[Model, nn.Module] | None:
    """The registry's standard model for these sources, loaded; None where there is none or it
    cannot be read (an unreadable baseline leaves the figure out, not the composition)."""
    standard = standard_model_for(db, picks)
    if standard is None:
        return None
    try:
        return standard, load_standard(settings, standard)
    except (FileNotFoundError, ValueError):
        return None


def _pick(inputs: Inputs, model: Model, classes: list[int]) -> Pick:
    from mwt_core.models import architecture_info

    with _loading(f"model {model.id}'s artifact"):
        loaded = inputs.model(model)
    with _loading(f"model {model.id}'s artifact or dataset"):
        data = inputs.bundle(model.dataset, architecture_info(model.arch).min_input_size)
    return Pick(model, loaded, data, classes)


def compose_sources(db: Any, settings: Settings, inputs: Inputs,
                    chosen: list[tuple[Model, list[int]]], calibration_per_class: int,
                    combine: str, key: str, *, tau: float | str | None = None,
                    margin_pp: float = ModularizeConfig.margin_pp) -> Composition:
    """Compose ``chosen`` ``(model, classes)`` sources, store the artifact and return its row
    (not yet added to ``db``). ``tau`` and ``margin_pp`` decide the threshold of one model's
    module (:func:`build`). Raises :class:`CompositionError` for what the caller must
    change, :class:`SourceUnavailable` for what cannot be read."""
    picks = [_pick(inputs, m, c) for m, c in chosen]
    labels = None
    if len(picks) == 1:
        p = picks[0]
        module, metrics = build(p.loaded, p.data, p.classes, device="cpu", tau=tau,
                                margin_pp=margin_pp)
        manifest = manifest_for(p.model, p.loaded, p.classes, metrics, finetuned=False)
    else:
        module, metrics = build_across(picks, calibration_per_class, combine=combine, device="cpu",
                                       standard=_standard(db, settings, picks))
        manifest = manifest_across(picks, metrics)
        labels = output_labels(picks)
    return composition_row([(p.model.id, p.classes, p.names) for p in picks], metrics,
                           store(settings, module, manifest), finetuned=False, key=key,
                           labels=labels)


def compose_modules(db: Any, settings: Settings, inputs: Inputs, rows: list[Module],
                    calibration_per_class: int, combine: str, key: str) -> Composition:
    """Compose stored per-class modules (each a part as it is), store it and return its row
    (not yet added to ``db``); errors as :func:`compose_sources`."""
    from mwt_core.models import architecture_info

    models = {}
    for m in rows:
        with _loading(f"model {m.model_id}'s artifact"):
            models[m.model_id] = inputs.model(m.model)
    picks = []
    for m in rows:
        with _loading(f"module {m.id}'s artifact or dataset"):
            data = inputs.bundle(m.dataset, architecture_info(m.arch).min_input_size)
            picks.append(load_module_part(settings, m, data))
    composed, metrics = build_from_modules(picks, calibration_per_class, combine=combine,
                                           models=models, standard=_standard(db, settings, picks))
    return composition_row(
        [(p.module.model_id, p.part.classes, p.part.class_names) for p in picks], metrics,
        store(settings, composed, manifest_modules(picks, metrics)), finetuned=False, key=key,
        labels=module_labels(picks),
    )
