"""Classifiers composed from modules of one or several models (DESIGN §2).

Each source model runs once, slimmed to the union of its selected classes; the
logits of all sources are concatenated. Raw logits of different models are not on
one scale, so a composition can be calibrated on a few labelled samples per class:
one scale and one bias per source, fitted by cross-entropy. Composed classifiers
export to TorchScript and ONNX through :mod:`mwt_core.export`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mwt_core.data.datasets import DatasetBundle, InputSpec
from mwt_core.metrics import count_flops, count_params
from mwt_core.models import MwTNet
from mwt_core.modularize import Modularization
from mwt_core.reuse import ModuleClassifier, evaluate, extract_module, restrict, subtask


class CompositionError(ValueError):
    """Sources that cannot be composed (different input specs, no classes...)."""


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

    def __init__(self, net: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class ComposedClassifier(nn.Module):
    """Concatenated, per-source calibrated logits of several modules.

    Takes images scaled to [0, 1] (each source normalises with its own statistics),
    so sources trained on differently normalised data compose correctly.
    """

    def __init__(self, parts: list[nn.Module], labels: list[str]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.labels = list(labels)
        self.scale = nn.Parameter(torch.ones(len(parts)))
        self.bias = nn.Parameter(torch.zeros(len(parts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [part(x) * self.scale[i] + self.bias[i] for i, part in enumerate(self.parts)]
        return torch.cat(outs, dim=1)


def compose(sources: list[Source], keep_mask_generators: bool = True) -> ComposedClassifier:
    """One module per source (the union of its classes), logits side by side."""
    if not sources:
        raise CompositionError("a composition needs at least one source")
    first = sources[0].spec
    for s in sources[1:]:
        if (s.spec.channels, s.spec.size) != (first.channels, first.size):
            raise CompositionError(
                f"input specs differ: {first.channels}x{first.size}x{first.size} vs "
                f"{s.spec.channels}x{s.spec.size}x{s.spec.size}; compose models trained on the same input shape"
            )
    parts: list[nn.Module] = []
    labels: list[str] = []
    for i, s in enumerate(sources):
        module = extract_module(s.model, s.modularization, s.classes, keep_mask_generators)
        parts.append(NormalizedInput(module, s.spec))
        names = s.class_names or [str(c) for c in range(s.modularization.num_classes)]
        labels += [f"{i}:{names[c]}" for c in s.classes]
    return ComposedClassifier(parts, labels).eval()


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


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``net`` on ``[0, 1]`` images ``x``."""
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for start in range(0, len(y), batch_size):
        out = net(x[start:start + batch_size].to(device))
        correct += int((out.argmax(1).cpu() == y[start:start + batch_size]).sum())
    return correct / max(1, len(y))


def calibrate(composed: ComposedClassifier, x: torch.Tensor, y: torch.Tensor,
              steps: int = 200, lr: float = 0.05) -> ComposedClassifier:
    """Fit each source's logit scale and bias on labelled ``[0, 1]`` images (modules frozen)."""
    composed.eval()
    device = composed.scale.device
    with torch.no_grad():
        raw = [part(x.to(device)) for part in composed.parts]
    opt = torch.optim.Adam([composed.scale, composed.bias], lr=lr)
    target = y.to(device)
    for _ in range(steps):
        logits = torch.cat([r * composed.scale[i] + composed.bias[i] for i, r in enumerate(raw)], 1)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return composed


def modules_of(composed: ComposedClassifier) -> list[ModuleClassifier]:
    """The per-source modules inside a composition."""
    return [part.net for part in composed.parts]  # type: ignore[misc]


def compose_and_measure(
    sources: list[Source],
    data: list[DatasetBundle],
    calibration_per_class: int = 20,
    labels: list[str] | None = None,
    device: str = "cpu",
) -> tuple[ComposedClassifier, dict[str, Any]]:
    """Compose ``sources`` (``data[i]`` is source i's dataset), calibrate and measure it.

    Calibration uses ``calibration_per_class`` training images per class (0: raw logits);
    accuracy is on the union of the sources' test splits. The baseline is the same
    construction from the full models (logits restricted to the classes, calibrated on
    the same images), so ``accuracy_loss`` is what cutting the models into modules costs.
    """
    if len(data) != len(sources):
        raise CompositionError(f"{len(sources)} sources but {len(data)} datasets")
    composed = compose(sources)
    if labels is not None:
        composed.labels = list(labels)
    baseline = ComposedClassifier(
        [NormalizedInput(restrict(s.model, s.classes, s.modularization.num_classes), s.spec)
         for s in sources],
        composed.labels,
    ).eval()
    pairs = [(d, s.classes) for d, s in zip(data, sources, strict=True)]
    test_x, test_y = labelled_union(pairs, "test")
    raw_acc, raw_base = accuracy(composed, test_x, test_y), accuracy(baseline, test_x, test_y)
    n_cal = 0
    if calibration_per_class > 0:
        cal_x, cal_y = labelled_union(pairs, "train", per_class=calibration_per_class)
        calibrate(composed, cal_x, cal_y)
        calibrate(baseline, cal_x, cal_y)
        n_cal = len(cal_y)
    acc, base = accuracy(composed, test_x, test_y), accuracy(baseline, test_x, test_y)
    per_source = [
        {"classes": list(s.classes), "krr": s.modularization.krr_of(s.classes),
         "zero_training_accuracy": evaluate(part, d, s.classes, device=device)}
        for s, d, part in zip(sources, data, modules_of(composed), strict=True)
    ]
    kept = total = 0.0
    for s in sources:  # KRR over all the sources' kernels together
        n = sum(int(m.numel()) for m in s.modularization.class_masks[0])
        kept += s.modularization.krr_of(s.classes) * n
        total += n
    composed = composed.cpu().eval()
    metrics: dict[str, Any] = {
        "accuracy": acc,
        "baseline_accuracy": base,
        "accuracy_loss": base - acc,
        "uncalibrated_accuracy": raw_acc,
        "uncalibrated_baseline_accuracy": raw_base,
        "calibration_per_class": calibration_per_class,
        "calibration_samples": n_cal,
        "krr": kept / total if total else None,
        "params": int(count_params(composed)),
        "flops": int(count_flops(composed, tuple(sources[0].spec.shape))),
        "test_samples": len(test_y),
        "sources": per_source,
    }
    return composed, metrics


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
