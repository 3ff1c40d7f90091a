"""Classifiers composed from modules of one or several models (DESIGN §2).

A composition is a list of parts, each a module answering for some classes of its dataset:
either cut now from a source model (the union of its selected classes, so each source model
runs once: :class:`Source`) or a module artifact as the registry stores and serves it (one
class each: :func:`mwt_core.module_parts.module_part`), so a client holding downloaded
modules rebuilds what the server composed from the same modules. How the parts' outputs become one answer is the
composition's ``combine`` method
(``mwt_core.combine``: raw logits, per-source scale and bias, or the open-set methods for
models that learned different classes). Composed classifiers export to
TorchScript and ONNX through :mod:`mwt_core.export`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mwt_core.combine import (
    DEFAULT_COMBINE,
    DEFAULT_PER_CLASS,
    LABELLED_METHODS,
    SETTINGS,
    CombineSettings,
    ComposedClassifier,
    CompositionError,
    check_method,
    fit,
    fit_scale_bias,
    needs_own,
)
from mwt_core.compose_options import (
    AUTO_COMBINE,
    FALLBACK_COMBINE,
    ZERO_LABEL_METHODS,
    check_choice,
)
from mwt_core.data.datasets import DatasetBundle, InputSpec
from mwt_core.evaluation import accuracy as count_accuracy
from mwt_core.evaluation import tensor_batches
from mwt_core.metrics import count_flops, count_params, measure_latency
from mwt_core.models import MwTNet
from mwt_core.modularize import Modularization
from mwt_core.reuse import ModuleClassifier, evaluate, extract_module, restrict, subtask
from mwt_core.slimming import channels_last

__all__ = ["DEFAULT_COMBINE", "ComposedClassifier", "CompositionError", "Part", "Source", "compose",
           "compose_and_measure", "compose_parts", "measure_parts"]


@dataclass
class Source:
    """Classes taken from one trained, modularized model."""

    model: MwTNet
    modularization: Modularization
    classes: list[int]
    spec: InputSpec
    class_names: list[str] | None = None


class NormalizedInput(nn.Module):
    """Normalise raw [0, 1] images with one source's mean and std before its module."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass
class Part:
    """One part of a composition: a module answering for ``classes`` of its dataset.

    ``kernels``: how many kernels the model it was cut from has (the KRR of several parts is
    weighted by it). ``full``: that whole model with its logits restricted to ``classes``,
    the baseline of what cutting costs; None where only the module is at hand (a client
    holding downloaded modules), and then the composition reports no baseline.
    """

    module: ModuleClassifier
    spec: InputSpec
    classes: list[int]
    class_names: list[str]
    krr: float
    kernels: int
    full: nn.Module | None = None


def source_part(source: Source, keep_mask_generators: bool = True) -> Part:
    """The module of a source's chosen classes (their union), cut from its model."""
    s, mod = source, source.modularization
    module = extract_module(s.model, mod, s.classes, keep_mask_generators)
    names = s.class_names or [str(c) for c in range(mod.num_classes)]
    # The baseline runs in channels_last like the module (a copy: the caller's model keeps its
    # layout): on the CPU that is ~15% of a compose call, which measures both.
    full = channels_last(copy.deepcopy(s.model))
    return Part(module, s.spec, list(s.classes), [str(names[c]) for c in s.classes],
                mod.krr_of(s.classes), sum(int(m.numel()) for m in mod.class_masks[0]),
                full=restrict(full, s.classes, mod.num_classes))


def compose(sources: list[Source], keep_mask_generators: bool = True,
            combine: str = FALLBACK_COMBINE) -> ComposedClassifier:
    """One module per source (the union of its classes), combined by ``combine`` (unfitted:
    see :func:`mwt_core.combine.fit`, or :func:`compose_and_measure` which fits and measures)."""
    check_method(combine)
    if not sources:
        raise CompositionError("a composition needs at least one source")
    return compose_parts([source_part(s, keep_mask_generators) for s in sources], combine)


def compose_parts(parts: list[Part], combine: str = FALLBACK_COMBINE) -> ComposedClassifier:
    """The parts side by side (each normalising its own input), combined by ``combine``
    (unfitted); labels ``i:name`` by part."""
    check_method(combine)
    if not parts:
        raise CompositionError("a composition needs at least one source")
    first = parts[0].spec
    for p in parts[1:]:
        if (p.spec.channels, p.spec.size) != (first.channels, first.size):
            raise CompositionError(
                f"input specs differ: {first.channels}x{first.size}x{first.size} vs "
                f"{p.spec.channels}x{p.spec.size}x{p.spec.size}; compose models trained on the same input shape"
            )
    labels = [f"{i}:{n}" for i, p in enumerate(parts) for n in p.class_names]
    return ComposedClassifier([NormalizedInput(p.module, p.spec) for p in parts], labels,
                              combine).eval()


def class_subset(data: DatasetBundle, classes: list[int]) -> DatasetBundle:
    """``data`` restricted to ``classes`` (labels 0..k-1 in that order, the subset's own
    normalisation statistics): the dataset a user would train a model on those classes with."""
    from dataclasses import replace

    from mwt_core.data.datasets import channel_stats

    lookup = torch.full((data.num_classes,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    tr, te = lookup[data.train_y] >= 0, lookup[data.test_y] >= 0
    train_x = data.train_x[tr].contiguous()
    mean, std = channel_stats(train_x)
    return replace(
        data, name=f"{data.name}[{','.join(map(str, classes))}]",
        train_x=train_x, train_y=lookup[data.train_y[tr]], test_x=data.test_x[te].contiguous(),
        test_y=lookup[data.test_y[te]], class_names=[data.class_names[c] for c in classes],
        spec=replace(data.spec, mean=mean, std=std),
    )


def labelled_union(sources: list[tuple[DatasetBundle, list[int]]], split: str = "test",
                   per_class: int | None = None, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] of each source's classes, labelled by position in the composition.

    With ``per_class`` only that many random images of each class are taken (a calibration
    set); they are drawn before the float conversion, so a large split is never copied whole.
    """
    xs, ys, offset = [], [], 0
    for data, classes in sources:
        x, y = subtask(data, classes, split)
        if per_class is not None:
            pick = per_class_sample(y, per_class, seed)
            x, y = x[pick], y[pick]
        xs.append(x.float() / 255.0)
        ys.append(y + offset)
        offset += len(classes)
    return torch.cat(xs), torch.cat(ys)


def per_class_sample(y: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of up to ``per_class`` random samples of each label in ``y`` (for calibration)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for label in torch.unique(y):
        idx = (y == label).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks).sort().values if picks else torch.zeros(0, dtype=torch.long)


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``net`` on ``[0, 1]`` images ``x`` (counted by
    :func:`mwt_core.evaluation.accuracy`, like every accuracy the project reports)."""
    device = next(net.parameters()).device
    return count_accuracy(net, tensor_batches(x, y, batch_size, device))


# The per-source scale and bias of the ``scale_bias`` method, under the name compositions
# used before ``combine`` existed (one function: its settings are written once, there).
calibrate = fit_scale_bias


def modules_of(composed: ComposedClassifier) -> list[ModuleClassifier]:
    """The per-source modules inside a composition."""
    return [part.net for part in composed.parts]  # type: ignore[misc]


def own_images(sources: Sequence[Source | Part], data: list[DatasetBundle],
               per_class: int = SETTINGS.own_per_class) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each source's own training images of its chosen classes (``[0, 1]``, labels by position),
    at most ``per_class`` per class: what the zero-label methods fit their statistics on."""
    out = []
    for s, d in zip(sources, data, strict=True):
        x, y = subtask(d, s.classes, "train")
        pick = per_class_sample(y, per_class)
        out.append((x[pick].float() / 255.0, y[pick]))
    return out


def compose_and_measure(
    sources: list[Source],
    data: list[DatasetBundle],
    calibration_per_class: int = DEFAULT_PER_CLASS,
    labels: list[str] | None = None,
    device: str = "cpu",
    combine: str = DEFAULT_COMBINE,
    standard: tuple[nn.Module, InputSpec, list[int]] | None = None,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    settings: CombineSettings = SETTINGS,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[ComposedClassifier, dict[str, Any]]:
    """Compose ``sources`` (``data[i]`` is source i's dataset) with ``combine``, fit and measure
    it: one module per source, the union of its classes (:func:`measure_parts` does the rest;
    ``combine="auto"`` chooses the method on ``validation``)."""
    if not sources:
        raise CompositionError("a composition needs at least one source")
    check_choice(combine)
    return measure_parts([source_part(s) for s in sources], data, calibration_per_class, labels,
                         device=device, combine=combine, standard=standard, test=test,
                         settings=settings, validation=validation)


def choose_combine(parts: list[Part], data: list[DatasetBundle],
                   validation: tuple[torch.Tensor, torch.Tensor] | None,
                   settings: CombineSettings = SETTINGS,
                   own: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                   ) -> tuple[str, dict[str, Any]]:
    """The zero-label method whose composition of ``parts`` is most accurate on
    ``validation`` (``[0, 1]`` images the sources held out of training, labels by output
    position), and a record of the choice for the composition's metrics and manifest.

    Each candidate is fitted as it would be (own training images, never the validation
    images); a tie goes to ``FALLBACK_COMBINE``, then to the order of ``ZERO_LABEL_METHODS``.
    Without validation images the choice is ``FALLBACK_COMBINE``, and the record says why.
    ``own``: the parts' own images (:func:`own_images`) where the caller already drew them.
    """
    if validation is None or len(validation[1]) == 0:
        return FALLBACK_COMBINE, {"mode": "default", "val_samples": 0,
                                  "note": "a source holds no validation slice (a model trained "
                                          f"with val_fraction 0, or before slices existed): "
                                          f"{FALLBACK_COMBINE}"}
    x, y = validation
    if own is None:
        own = own_images(parts, data, settings.own_per_class)
    scores: dict[str, float] = {}
    for method in ZERO_LABEL_METHODS:
        composed = compose_parts(parts, combine=method)
        try:
            fit(composed, own if needs_own(method, settings) else None, None, settings)
            scores[method] = accuracies(composed, x, y)[0]
        finally:
            composed.release()  # the parts may be shared (a server's cache): unhook them
    order = [FALLBACK_COMBINE, *[m for m in ZERO_LABEL_METHODS if m != FALLBACK_COMBINE]]
    chosen = max(order, key=lambda m: (scores[m], -order.index(m)))
    return chosen, {"mode": AUTO_COMBINE, "val_samples": len(y), "val_accuracy": scores}


def validation_union(slices: list[tuple[DatasetBundle, list[int]] | None]
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sources' validation slices as one labelled set for :func:`choose_combine`:
    ``slices[i]`` is source i's slice (a bundle whose test split is the slice, as
    ``split_validation`` returns it) and its composed classes; None if any source has none
    (a choice measured on some sources' classes only would favour them)."""
    if not slices or any(s is None for s in slices):
        return None
    return labelled_union([s for s in slices if s is not None], "test")


def measure_parts(
    parts: list[Part],
    data: list[DatasetBundle],
    calibration_per_class: int = DEFAULT_PER_CLASS,
    labels: list[str] | None = None,
    device: str = "cpu",
    combine: str = DEFAULT_COMBINE,
    standard: tuple[nn.Module, InputSpec, list[int]] | None = None,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    settings: CombineSettings = SETTINGS,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[ComposedClassifier, dict[str, Any]]:
    """Compose ``parts`` (``data[i]`` is part i's dataset) with ``combine``, fit and measure it.

    ``combine="auto"``: the zero-label method :func:`choose_combine` picks on ``validation``
    (the sources' held-out images, :func:`validation_union`); ``metrics["combine_choice"]``
    records the candidates' validation accuracies (None for a method given by name).

    The zero-label methods fit on each part's own training images; the labelled ones on
    ``calibration_per_class`` training images per class of the union (never the test split).
    Both are drawn by a fixed seed from the datasets alone, so whoever holds the same modules
    and datasets (a client with downloaded modules) fits the same composition.
    Accuracy is on the union of the parts' test splits (or ``test``: ``[0, 1]`` images and
    labels by output position). ``baseline_accuracy`` is the same construction from the full
    models (logits restricted to the classes, fitted on the same images), so ``accuracy_loss``
    is what cutting the models into modules costs; None (and no fit) when some part has no
    full model. ``standard`` (a standard model of the same dataset, its input spec and the
    composed classes in its index space) adds the paper's accuracy loss against a standard
    model. ``raw_accuracy`` is the raw logits' accuracy. ``settings``: the methods' fixed
    settings (the bench compares variants).

    Cost: every image is forwarded once per part and network (modules, full models): the
    calibration images once for both standardisation and fit, the test images once for the
    composition's accuracy, its raw accuracy and each module's own (zero-training) accuracy.
    """
    started = time.perf_counter()
    if len(data) != len(parts):
        raise CompositionError(f"{len(parts)} sources but {len(data)} datasets")
    if combine in LABELLED_METHODS and calibration_per_class <= 0:
        raise CompositionError(
            f"combine={combine!r} fits on labelled images: give calibration_per_class > 0, "
            "or a zero-label method (raw, log_softmax, energy, gauss)"
        )
    choice: dict[str, Any] | None = None
    own: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    if check_choice(combine) == AUTO_COMBINE:
        # Drawn once: the candidates and the chosen method fit on the same own images.
        own = own_images(parts, data, settings.own_per_class)
        combine, choice = choose_combine(parts, data, validation, settings, own)
    composed = compose_parts(parts, combine=combine)
    if labels is not None:
        composed.labels = list(labels)
    fulls = [p.full for p in parts]
    baseline = None
    if all(f is not None for f in fulls):
        baseline = ComposedClassifier(
            [NormalizedInput(f, p.spec) for f, p in zip(fulls, parts, strict=True) if f is not None],
            composed.labels, combine,
        ).eval()
    pairs = [(d, p.classes) for d, p in zip(data, parts, strict=True)]
    test_x, test_y = test if test is not None else labelled_union(pairs, "test")
    if not needs_own(combine, settings):
        own = None
    elif own is None:
        own = own_images(parts, data, settings.own_per_class)
    cal = None
    if combine in LABELLED_METHODS:
        cal = labelled_union(pairs, "train", per_class=calibration_per_class)
    base: float | None = None
    raw_base: float | None = None
    try:
        fit(composed, own, cal, settings)
        if baseline is not None:
            fit(baseline, own, cal, settings)
        fitted_s = time.perf_counter() - started
        acc, raw_acc, own_accs = accuracies(composed, test_x, test_y, with_sources=True)
        if baseline is not None:
            base, raw_base, _ = accuracies(baseline, test_x, test_y)
    finally:
        if baseline is not None:
            baseline.release()  # the full models may be shared (a server's cache): unhook them
    if test is not None:  # a test set of its own: its labels need not be the union's blocks
        own_accs = [evaluate(part, d, p.classes, device=device)
                    for p, d, part in zip(parts, data, modules_of(composed), strict=True)]
    per_source = [
        {"classes": list(p.classes), "krr": p.krr, "zero_training_accuracy": a}
        for p, a in zip(parts, own_accs, strict=True)
    ]
    # KRR over all the parts' kernels together (each part weighted by its model's kernels).
    total = sum(p.kernels for p in parts)
    kept = sum(p.krr * p.kernels for p in parts)
    composed = composed.cpu().eval()
    shape = parts[0].spec.shape
    metrics: dict[str, Any] = {
        "combine": combine,
        "combine_choice": choice,
        "accuracy": acc,
        "raw_accuracy": raw_acc,
        "baseline_accuracy": base,
        "accuracy_loss": base - acc if base is not None else None,
        "uncalibrated_accuracy": raw_acc,  # the name before ``combine`` existed
        "uncalibrated_baseline_accuracy": raw_base,
        "calibration_per_class": calibration_per_class if cal is not None else 0,
        "calibration_samples": len(cal[1]) if cal is not None else 0,
        "own_samples": sum(len(y) for _, y in own) if own is not None else 0,
        "combine_params": int(count_params(composed.head)) if hasattr(composed, "head") else (
            2 * len(parts) if combine == "scale_bias" else 0),
        "krr": kept / total if total else None,
        "params": int(count_params(composed)),
        "flops": int(count_flops(composed, shape)),
        "latency_ms": measure_latency(composed, shape, batch=1, device="cpu") * 1e3,
        "fit_seconds": fitted_s,
        "test_samples": len(test_y),
        "sources": per_source,
    }
    if standard is not None:
        net, spec, classes = standard
        std = NormalizedInput(restrict(net, classes, head_out(net)), spec).eval()
        metrics["standard_accuracy"] = accuracy(std, test_x, test_y)
        metrics["standard_accuracy_loss"] = metrics["standard_accuracy"] - acc
    return composed, metrics


def head_out(net: nn.Module) -> int:
    """Number of logits of a whole model."""
    return [m for m in net.modules() if isinstance(m, nn.Linear)][-1].out_features


@torch.inference_mode()
def accuracies(composed: ComposedClassifier, x: torch.Tensor, y: torch.Tensor,
               batch_size: int = 256, with_sources: bool = False
               ) -> tuple[float, float, list[float]]:
    """Accuracy of the composition and of its raw logits side by side, from one pass; with
    ``with_sources``, also each part's accuracy on the images of its own classes (labels
    ``y`` by output position, part i owning a contiguous block of outputs): the module's
    own accuracy, measured without a second pass."""
    composed.eval()
    device = composed.scale.device
    correct = raw = 0
    n = len(composed.parts)
    hits, seen = [0] * n, [0] * n
    for start in range(0, len(y), batch_size):
        logits, feats = composed.source_outputs(x[start:start + batch_size].to(device))
        yb = y[start:start + batch_size]
        correct += int((composed.combined(logits, feats).argmax(1).cpu() == yb).sum())
        raw += int((torch.cat(logits, 1).argmax(1).cpu() == yb).sum())
        if with_sources:
            offset = 0
            for i, lg in enumerate(logits):
                mine = (yb >= offset) & (yb < offset + lg.shape[1])
                hits[i] += int((lg[mine.to(lg.device)].argmax(1).cpu() == yb[mine] - offset).sum())
                seen[i] += int(mine.sum())
                offset += lg.shape[1]
    per_part = [h / max(1, s) for h, s in zip(hits, seen, strict=True)] if with_sources else []
    return correct / max(1, len(y)), raw / max(1, len(y)), per_part


def distinct_labels(groups: list[tuple[str, list[str]]]) -> list[str]:
    """Output labels of a composition from ``(source tag, class names)`` per source: the plain
    names, or ``tag:name`` for every class when two sources share a name."""
    names = [n for _, ns in groups for n in ns]
    if len(set(names)) == len(names):
        return names
    return [f"{tag}:{n}" for tag, ns in groups for n in ns]


def composition_manifest(spec: InputSpec, labels: list[str], sources: list[dict[str, Any]],
                         metrics: dict[str, Any], created_by: str) -> dict[str, Any]:
    """The manifest of a saved composition. It takes images in [0, 1] (each part normalises
    them itself), so its input spec is the identity normalisation of the sources' shape;
    ``sources`` describe where each part came from (each may name its ``dataset``)."""
    datasets = {src.get("dataset") for src in sources}
    return {
        "dataset": datasets.pop() if len(datasets) == 1 else None,
        "class_names": list(labels),
        "input_spec": identity_spec(spec).to_json(),
        "input_range": "[0, 1]",
        "sources": sources,
        "finetuned": False,
        "metrics": metrics,
        "created_by": created_by,
    }


def identity_spec(spec: InputSpec) -> InputSpec:
    """The input spec of a composition: same shape, images in [0, 1] (each part normalises)."""
    return InputSpec(spec.channels, spec.size, (0.0,) * spec.channels, (1.0,) * spec.channels)
