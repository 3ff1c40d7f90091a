"""Reuse on a sub-task: extract a class-set module, evaluate it, fine-tune its head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mwt_core.config import TAU_GRID, ModularizeConfig, check_margin, check_tau
from mwt_core.data.batches import ImageBatches
from mwt_core.data.datasets import DatasetBundle
from mwt_core.devices import resolve_device
from mwt_core.models import MwTNet
from mwt_core.modularize import (
    Modularization,
    class_frequencies,
    modularize_activity,
    training_activity,
    union_at,
)
from mwt_core.slimming import slim


class ModuleClassifier(nn.Module):
    """A network restricted to ``classes``: its logits are those classes, in that order.

    ``net`` is either a physically slimmed module (zero-training reuse) or a whole
    standard model, whose logits are then simply restricted to the classes.
    """

    def __init__(self, net: nn.Module, classes: list[int], krr: float | None,
                 restricted: bool) -> None:
        super().__init__()
        self.net = net
        self.classes = list(classes)
        self.krr = krr
        # ``restricted``: the net already outputs only ``classes`` (its head was cut).
        self.restricted = restricted
        self.register_buffer("class_index", torch.tensor(self.classes, dtype=torch.long),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits if self.restricted else logits.index_select(1, self.class_index)

    def describe(self) -> dict[str, Any]:
        return {"classes": self.classes, "krr": self.krr}


def _check_classes(classes: list[int], num_classes: int) -> list[int]:
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("choose at least one class")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must not repeat: {classes}")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class index {bad[0]} is out of range 0..{num_classes - 1}")
    return classes


def extract_module(model: MwTNet, modularization: Modularization, classes: list[int],
                   keep_mask_generators: bool = True, channel_multiple: int = 1) -> ModuleClassifier:
    """The slim module for ``classes``: union of their kernels, logits of those classes.

    ``channel_multiple`` > 1 pads each cut layer with zeroed channels to a multiple of it
    (``slim``): the same outputs in shapes some GPU kernels prefer.
    """
    classes = _check_classes(classes, modularization.num_classes)
    return cut_module(model, modularization.union(classes), classes, keep_mask_generators,
                      channel_multiple)


def cut_module(model: MwTNet, keep: list[torch.Tensor], classes: list[int],
               keep_mask_generators: bool = True, channel_multiple: int = 1) -> ModuleClassifier:
    """The slim module keeping the kernels ``keep`` (one bool vector per masked layer) with the
    logits of ``classes``: :func:`extract_module` once the kernels are known."""
    net = slim(model, keep, keep_mask_generators=keep_mask_generators, classes=classes,
               channel_multiple=channel_multiple)
    # Enough to rebuild the same structure from a fresh model (see artifacts.build_net).
    net.config["classes"] = list(classes)
    net.config["keep_mask_generators"] = keep_mask_generators
    net.config["keep"] = [k.nonzero().flatten().tolist() for k in keep]
    krr = float(sum(int(k.sum()) for k in keep) / sum(k.numel() for k in keep))
    return ModuleClassifier(net, list(classes), krr, restricted=True).eval()


def restrict(model: nn.Module, classes: list[int], num_classes: int) -> ModuleClassifier:
    """A whole model with its logits restricted to ``classes`` (the baseline for reuse)."""
    return ModuleClassifier(model, _check_classes(classes, num_classes), None, restricted=False).eval()


def subtask(data: DatasetBundle, classes: list[int], split: str = "test"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``classes`` in ``split`` with labels mapped to positions in ``classes``."""
    x, y = (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
    lookup = torch.full((data.num_classes,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    mapped = lookup[y]
    sel = mapped >= 0
    return x[sel], mapped[sel]


@torch.no_grad()
def evaluate(net: nn.Module, data: DatasetBundle, classes: list[int] | None = None,
             device: str = "auto", batch_size: int = 512) -> float:
    """Test accuracy of ``net``; with ``classes``, on those classes' samples only, where
    ``net`` outputs one logit per class in ``classes`` order."""
    dev = resolve_device(device)
    if classes is None:
        x, y = data.test_x, data.test_y
    else:
        x, y = subtask(data, _check_classes(classes, data.num_classes))
    batches = ImageBatches(x, y, data.spec, dev)
    was_training = net.training
    net.eval().to(dev)
    correct = 0
    for xb, yb in batches.ordered(batch_size):
        correct += int((net(xb).argmax(1) == yb).sum())
    net.train(was_training)
    return correct / max(1, len(batches))


def _head(net: nn.Module) -> nn.Linear:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the module has no linear head to fine-tune")
    return linears[-1]


def finetune_head(module: ModuleClassifier, data: DatasetBundle, epochs: int = 5,
                  lr: float = 0.01, batch_size: int = 64, seed: int = 0,
                  device: str = "auto") -> ModuleClassifier:
    """Fine-tune the module's last linear layer on the sub-task's training split.

    Only the head learns (the convolutions and mask generators stay frozen), so the
    module keeps its kernels and its exact behaviour below the head.
    """
    dev = resolve_device(device)
    x, y = subtask(data, module.classes, split="train")
    batches = ImageBatches(x, y, data.spec, dev)
    module.to(dev).eval()  # BN and dropout stay in inference mode: only the head moves
    head = _head(module.net)
    for p in module.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    n = len(batches)
    for _ in range(epochs):
        perm = torch.randperm(n, device=dev, generator=gen)
        for start in range(0, n, batch_size):
            xb, yb = batches.batch(perm[start:start + batch_size], augment=True, generator=gen)
            loss = F.cross_entropy(module(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in module.parameters():
        p.requires_grad_(True)
    return module.eval()


# --------------------------------------------------------------------------- tau by accuracy


@dataclass
class TauChoice:
    """The threshold :func:`choose_tau` chose for a class set, and what it measured.

    ``met_margin`` is false when no threshold of the grid kept the module within the margin:
    ``tau`` is then the grid's smallest (the largest module). ``tried`` holds ``(tau,
    module validation accuracy)`` in the order tried, largest tau first.
    """

    tau: float
    margin_pp: float
    module_val_acc: float
    full_val_acc: float
    krr: float
    val_samples: int
    met_margin: bool
    modularization: Modularization
    tried: list[tuple[float, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The figures a manifest records (JSON-able; no masks)."""
        return {"tau": self.tau, "margin_pp": self.margin_pp,
                "module_val_acc": self.module_val_acc, "full_val_acc": self.full_val_acc,
                "krr": self.krr, "val_samples": self.val_samples, "met_margin": self.met_margin,
                "tried": [[t, a] for t, a in self.tried]}


def within_margin(module_acc: float, full_acc: float, margin_pp: float) -> bool:
    """Whether ``module_acc`` is at most ``margin_pp`` percentage points below ``full_acc``
    (accuracies as fractions; a hair of float slack so an exact tie counts)."""
    return module_acc >= full_acc - margin_pp / 100.0 - 1e-9


def choose_tau(model: MwTNet, fit: DatasetBundle, val: DatasetBundle, classes: list[int],
               margin_pp: float = ModularizeConfig.margin_pp, taus: Sequence[float] = TAU_GRID,
               device: str = "auto", batch_size: int = 512) -> TauChoice:
    """The largest threshold of ``taus`` (the smallest module) whose module of ``classes`` is
    within ``margin_pp`` percentage points of the full model restricted to the same classes,
    both measured on ``val``'s test split (the validation slice: ``split_validation``'s
    ``val``); if none is, the smallest threshold, with ``met_margin`` false.

    The masks come from one pass over ``fit``'s training split (the slice is not part of it),
    so nothing that decides the module has seen the images that judge it. The returned
    ``modularization`` is ``fit``'s at the chosen tau, with its metrics: ``extract_module``
    of it gives the module that was measured.

    Needs at least two classes (the module of one class has one logit, so its accuracy among
    its classes is 100% whatever it keeps) and validation images of them: ``ValueError``
    otherwise.
    """
    check_margin(margin_pp)
    grid = sorted({check_tau(float(t)) for t in taus}, reverse=True)
    if not grid:
        raise ValueError("choose tau from at least one threshold")
    classes = _check_classes(classes, fit.num_classes)
    if len(classes) < 2:
        raise ValueError("choosing tau by accuracy needs at least two classes: a module of "
                         "one class always answers that class")
    val_samples = int(torch.isin(val.test_y, torch.tensor(classes)).sum())
    if val_samples == 0:
        raise ValueError(f"the validation slice holds no images of classes {classes}")
    activity, labels = training_activity(model, fit, device, batch_size)
    freqs = [class_frequencies(act, labels, fit.num_classes) for act in activity]
    full_acc = evaluate(restrict(model, classes, fit.num_classes), val, classes, device, batch_size)
    tried: list[tuple[float, float]] = []
    chosen: tuple[float, float, float] | None = None  # tau, accuracy, krr
    last: tuple[list[torch.Tensor], float] | None = None
    for tau in grid:
        keep = union_at(freqs, classes, tau)
        if last is not None and all(torch.equal(a, b) for a, b in zip(keep, last[0], strict=True)):
            acc = last[1]  # the same kernels as the last threshold: the same module
        else:
            acc = evaluate(cut_module(model, keep, classes), val, classes, device, batch_size)
        last = (keep, acc)
        tried.append((tau, acc))
        krr = float(sum(int(k.sum()) for k in keep) / sum(k.numel() for k in keep))
        chosen = (tau, acc, krr)
        if within_margin(acc, full_acc, margin_pp):
            break
    assert chosen is not None  # the grid is not empty
    tau, acc, krr = chosen
    mod = modularize_activity(activity, labels, fit.num_classes, tau)
    return TauChoice(tau=tau, margin_pp=float(margin_pp), module_val_acc=acc, full_val_acc=full_acc,
                     krr=krr, val_samples=val_samples,
                     met_margin=within_margin(acc, full_acc, margin_pp), modularization=mod,
                     tried=tried)
