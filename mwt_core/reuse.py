"""Reuse on a sub-task: extract a class-set module, evaluate it, fine-tune its head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mwt_core.data.batches import ImageBatches
from mwt_core.data.datasets import DatasetBundle
from mwt_core.devices import resolve_device
from mwt_core.models import MwTNet
from mwt_core.modularize import Modularization
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
    keep = modularization.union(classes)
    net = slim(model, keep, keep_mask_generators=keep_mask_generators, classes=classes,
               channel_multiple=channel_multiple)
    # Enough to rebuild the same structure from a fresh model (see artifacts.build_net).
    net.config["classes"] = classes
    net.config["keep_mask_generators"] = keep_mask_generators
    net.config["keep"] = [k.nonzero().flatten().tolist() for k in keep]
    return ModuleClassifier(net, classes, modularization.krr_of(classes), restricted=True).eval()


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
