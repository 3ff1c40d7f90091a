"""Accuracy: the one place where a network's predictions are counted against labels.

Training (the test accuracy of every epoch), reuse (a module on its sub-task), the
pipeline (per-class recall of a trained model) and composition all count through
:func:`predictions`, so every reported accuracy means the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn


@torch.no_grad()
def predictions(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predicted and true labels (on the CPU) of ``net`` over ``(x, y)`` batches.

    ``net`` runs in eval mode; its train/eval mode is restored afterwards.
    """
    was_training = net.training
    net.eval()
    preds: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for x, y in batches:
            preds.append(net(x).argmax(1).cpu())
            labels.append(y.cpu())
    finally:
        net.train(was_training)
    if not preds:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    return torch.cat(preds), torch.cat(labels)


def accuracy(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Fraction of the samples in ``batches`` that ``net`` classifies correctly (0 if none)."""
    pred, y = predictions(net, batches)
    return float((pred == y).sum()) / max(1, int(y.numel()))


def class_recall(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Per class ``c``: the fraction of samples labelled ``c`` predicted as ``c`` (0 if none)."""
    hits = torch.bincount(y[pred == y], minlength=num_classes)[:num_classes]
    counts = torch.bincount(y, minlength=num_classes)[:num_classes]
    return [float(h) / int(n) if int(n) else 0.0 for h, n in zip(hits, counts, strict=True)]


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
                   device: torch.device | str | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` in order, ``batch_size`` at a time, ``x`` moved to ``device`` (for
    inputs that need no normalisation, such as a composition's ``[0, 1]`` images)."""
    for start in range(0, len(y), batch_size):
        xb = x[start:start + batch_size]
        yield (xb if device is None else xb.to(device)), y[start:start + batch_size]
