"""Composition: a classifier for some classes of one model or several, from their modules.

One model (DESIGN §1.5): the module of the classes' union, measured against the full model.
Several models (DESIGN §2): one module per model side by side, their logits calibrated on a
few training images per class. Used synchronously by the API (zero-training composition) and
by the fine-tuning job.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, select

from app import storage
from app.db.models import Composition, CompositionSource, Model, ModelStatus
from app.settings import Settings

if TYPE_CHECKING:
    from torch import nn

    from mwt_core.data.datasets import DatasetBundle
    from mwt_core.modularize import Modularization


class CompositionError(ValueError):
    """The request cannot be composed (bad classes, model without modules...)."""


def resolve_classes(model: Model, classes: list[int | str]) -> list[int]:
    """Class indices (or names) -> indices, validated against the model's classes."""
    names = [str(n) for n in model.class_names]
    out: list[int] = []
    for c in classes:
        if isinstance(c, int) or (
            isinstance(c, str) and c.strip().lstrip("-").isdecimal() and c not in names
        ):
            idx = int(c)
            if not 0 <= idx < model.num_classes:
                raise CompositionError(
                    f"class index {idx} is out of range for model {model.id} (0..{model.num_classes - 1})"
                )
        else:
            if c not in names:
                shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
                raise CompositionError(
                    f"model {model.id} has no class named {c!r}; its classes: {shown}"
                )
            idx = names.index(c)
        out.append(idx)
    if len(set(out)) != len(out):
        raise CompositionError(f"classes must not repeat: {classes}")
    return out


@dataclass
class LoadedModel:
    net: nn.Module
    modularization: Modularization
    manifest: dict[str, Any]
    lock: threading.Lock


def load_model(settings: Settings, model: Model) -> LoadedModel:
    from mwt_core.artifacts import load_artifact
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
    return LoadedModel(net, modularization, manifest, threading.Lock())


class ModelCache:
    """Recently used models, loaded once per process (compositions must answer fast)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[int, str], LoadedModel] = OrderedDict()

    def get(self, settings: Settings, model: Model) -> LoadedModel:
        key = (model.id, model.sha256 or "")
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        loaded = load_model(settings, model)
        if self.size > 0:
            with self._lock:
                self._items[key] = loaded
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return loaded

    def forget(self, model_id: int) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == model_id]:
                del self._items[key]


def build(
    loaded: LoadedModel,
    data: DatasetBundle,
    classes: list[int],
    *,
    device: str = "cpu",
    finetune: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Extract (and optionally fine-tune) the module for ``classes``; measure it on the test split."""
    from mwt_core.metrics import count_flops, count_params
    from mwt_core.reuse import evaluate, extract_module, finetune_head, restrict

    with loaded.lock:  # the cached full model is shared between request threads
        module = extract_module(loaded.net, loaded.modularization, classes)
        baseline = evaluate(
            restrict(loaded.net, classes, loaded.modularization.num_classes),
            data,
            classes,
            device=device,
        )
    zero_shot = evaluate(module, data, classes, device=device)
    metrics: dict[str, Any] = {"zero_training_accuracy": zero_shot}
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
            "krr": float(getattr(module, "krr", None) or loaded.modularization.krr_of(classes)),
            "params": int(count_params(module)),
            "flops": int(count_flops(module, tuple(data.spec.shape))),
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
    base = settings.artifacts / "compositions" / token
    art = base / "artifact"
    save_artifact(art, module, manifest)
    sha, size = storage.write_tar(art, base / "composition.tar")
    return storage.relative(settings.artifacts, art), sha, size


def uses_model(model_id: int) -> ColumnElement[bool]:
    """Filter: compositions that take classes from ``model_id``, as first source or any other."""
    return (Composition.model_id == model_id) | Composition.id.in_(
        select(CompositionSource.composition_id).where(CompositionSource.model_id == model_id)
    )


MAX_KEY = 400  # the column's width; longer keys are hashed


def classes_key(classes: list[int]) -> str:
    """The registry's lookup key of one model's class list (one zero-training composition per key)."""
    return _fit(",".join(map(str, classes)))


def sources_key(sources: list[tuple[int, list[int]]], calibration_per_class: int) -> str:
    """The lookup key of a cross-model composition: every (model, classes) and the calibration."""
    if len(sources) == 1:
        return classes_key(sources[0][1])
    raw = "|".join(f"{m}:{','.join(map(str, c))}" for m, c in sources)
    return _fit(f"{raw}@{calibration_per_class}")


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
    picks: list[Pick], calibration_per_class: int, *, device: str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Compose modules of several registry models; measure it (``mwt_core.compose``)."""
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
    with ExitStack() as stack:
        # Cached full models are shared between request threads; lock them in one order.
        for p in sorted(picks, key=lambda p: p.model.id):
            stack.enter_context(p.loaded.lock)
        composed, metrics = core.compose_and_measure(
            sources,
            [p.data for p in picks],
            calibration_per_class,
            labels=output_labels(picks),
            device=device,
        )
    for p, src in zip(picks, metrics["sources"], strict=True):
        src["model_id"] = p.model.id
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
    art = storage.resolve(settings.artifacts, artifact_path)
    name = {"artifact": "composition.tar", "model": "model.tar"}.get(art.name)
    return art.parent / name if name else art.parent / f"{art.name}.tar"


TORCHSCRIPT_FILE = "composition.torchscript.pt"


def torchscript_of(settings: Settings, artifact_path: str) -> tuple[Path, str]:
    """A self-contained TorchScript export of a composition (built once, then reused).

    The traced network takes images scaled to [0, 1] (N x C x H x W) and normalises them itself, so
    ``torch.jit.load(path)(x)`` needs neither this project nor the dataset statistics.
    """
    import os

    from mwt_core.artifacts import load_artifact
    from mwt_core.compose import NormalizedInput, export_torchscript
    from mwt_core.data.datasets import InputSpec

    art = storage.resolve(settings.artifacts, artifact_path)
    path = art.parent / TORCHSCRIPT_FILE
    digest_file = art.parent / f".{TORCHSCRIPT_FILE}.sha256"
    if path.is_file() and digest_file.is_file():
        return path, digest_file.read_text().strip()
    net, manifest = load_artifact(art, device="cpu")
    spec = InputSpec.from_json(manifest["input_spec"])
    tmp = art.parent / f".{TORCHSCRIPT_FILE}.tmp{os.getpid()}"
    export_torchscript(NormalizedInput(net, spec).eval(), tmp, tuple(spec.shape))
    digest = storage.sha256_file(tmp)
    os.replace(tmp, path)
    digest_file.write_text(digest)
    return path, digest
