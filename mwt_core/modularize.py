"""Modularization after training (DESIGN §1.3) and its metrics (§1.4).

One pass over the training set collects, per masked layer, the binary activity of
every kernel for every sample. From these, per class and kernel, the activation
frequency; then the module masks (frequency >= tau, lowered per layer in steps of
0.05 until a layer keeps something), KRR, cohesion and coupling. All of it is
matrix arithmetic: no Python loop over samples or pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mwt_core.config import ModularizeConfig, check_tau
from mwt_core.data.batches import ImageBatches
from mwt_core.data.datasets import DatasetBundle
from mwt_core.devices import resolve_device
from mwt_core.models import MwTNet

TAU_STEP = 0.05


@dataclass
class Modularization:
    """Module masks of every class and the modularity metrics of the model."""

    tau: float
    class_masks: list[list[torch.Tensor]]  # class -> layer -> bool[K_l]
    krr: list[float]  # per class module
    model_krr: float
    cohesion: float
    coupling: float
    per_class_cohesion: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.class_masks)

    def union(self, classes: list[int]) -> list[torch.Tensor]:
        """Kernels kept by the module of a class set: the union of its class masks."""
        if not classes:
            raise ValueError("choose at least one class")
        for c in classes:
            if not 0 <= c < self.num_classes:
                raise ValueError(f"class index {c} is out of range 0..{self.num_classes - 1}")
        layers = len(self.class_masks[0])
        return [torch.stack([self.class_masks[c][l] for c in classes]).any(0) for l in range(layers)]

    def layer_coupling(self) -> list[float]:
        """Coupling of each masked layer alone: shows where the class modules share kernels."""
        k = self.num_classes
        if k < 2:
            return [0.0 for _ in self.class_masks[0]]
        out = []
        for layer in range(len(self.class_masks[0])):
            keep = torch.stack([self.class_masks[c][layer] for c in range(k)])
            jac = _pairwise_jaccard(keep, keep)
            out.append(float((jac.sum() - jac.diagonal().sum()) / (k * (k - 1))))
        return out

    def krr_of(self, classes: list[int]) -> float:
        keep = self.union(classes)
        return float(sum(int(k.sum()) for k in keep) / sum(k.numel() for k in keep))

    def to_json(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "class_masks": [[m.nonzero().flatten().tolist() for m in layers] for layers in self.class_masks],
            "kernels": [int(m.numel()) for m in self.class_masks[0]],
            "krr": self.krr, "model_krr": self.model_krr, "cohesion": self.cohesion,
            "coupling": self.coupling, "per_class_cohesion": self.per_class_cohesion,
            "layer_coupling": self.layer_coupling(),  # derived; from_json recomputes it
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Modularization:
        """Inverse of :meth:`to_json`; malformed data raises ``ValueError``."""
        try:
            return cls._from_json(data)
        except (KeyError, IndexError, TypeError, RuntimeError) as exc:
            raise ValueError(f"malformed modularization record: {exc!r}") from exc

    @classmethod
    def _from_json(cls, data: dict[str, Any]) -> Modularization:
        sizes = data["kernels"]
        masks = []
        for layers in data["class_masks"]:
            row = []
            for idx, size in zip(layers, sizes, strict=True):
                m = torch.zeros(size, dtype=torch.bool)
                m[torch.tensor(idx, dtype=torch.long)] = True
                row.append(m)
            masks.append(row)
        return cls(tau=data["tau"], class_masks=masks, krr=list(data["krr"]),
                   model_krr=data["model_krr"], cohesion=data["cohesion"],
                   coupling=data["coupling"], per_class_cohesion=list(data["per_class_cohesion"]))


@torch.no_grad()
def collect_activity(model: MwTNet, batches: ImageBatches, batch_size: int = 512) -> list[torch.Tensor]:
    """Per masked layer, the ``N x K_l`` boolean activity (mask > 0) of every sample."""
    was_training = model.training
    model.eval()
    per_layer: list[list[torch.Tensor]] = []
    for x, _ in batches.ordered(batch_size):
        _, masks = model.forward_with_masks(x)
        if not per_layer:
            per_layer = [[] for _ in masks]
        for store, m in zip(per_layer, masks, strict=True):
            store.append(m > 0)
    model.train(was_training)
    return [torch.cat(chunks) for chunks in per_layer]


def module_masks(freq: torch.Tensor, tau: float) -> torch.Tensor:
    """``classes x K`` keep masks for one layer from its frequencies, tau lowered where empty."""
    keep = freq >= tau
    empty = ~keep.any(1)
    t = tau
    while bool(empty.any()) and t > 0:
        t = max(0.0, round(t - TAU_STEP, 10))
        keep[empty] = freq[empty] >= t
        empty = ~keep.any(1)
    return keep


def _pairwise_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jaccard index of every row of ``a`` with every row of ``b`` (bool matrices)."""
    a, b = a.float(), b.float()
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def modularize(
    model: MwTNet, data: DatasetBundle, tau: float = ModularizeConfig.tau, device: str = "auto",
    batch_size: int = 512,
) -> Modularization:
    """Cut a trained masked model into one module mask per class, with its metrics."""
    check_tau(tau)
    if not model.mask_units():
        raise ValueError("this model has no mask generators (standard training); train it with MwT")
    dev = resolve_device(device)
    model = model.to(dev)
    batches = ImageBatches(data.train_x, data.train_y, data.spec, dev)
    activity = collect_activity(model, batches, batch_size)
    labels = batches.labels
    k = data.num_classes
    onehot = torch.nn.functional.one_hot(labels, k).float()  # N x C
    counts = onehot.sum(0).clamp(min=1)

    layer_keep = []
    for act in activity:
        freq = (onehot.T @ act.float()) / counts[:, None]  # C x K
        layer_keep.append(module_masks(freq, tau))
    keep_all = torch.cat(layer_keep, dim=1)  # C x sum(K): each class module's kernels
    act_all = torch.cat(activity, dim=1)  # N x sum(K)
    total = keep_all.shape[1]

    krr = (keep_all.sum(1).float() / total).tolist()
    per_class_cohesion = []
    for c in range(k):
        # Pairs of samples of class c, compared on that module's kept kernels only.
        rows = act_all[labels == c][:, keep_all[c]]
        n = rows.shape[0]
        if n < 2:
            per_class_cohesion.append(1.0)
            continue
        jac = _pairwise_jaccard(rows, rows)
        per_class_cohesion.append(float((jac.sum() - jac.diagonal().sum()) / (n * (n - 1))))
    jac = _pairwise_jaccard(keep_all, keep_all)
    coupling = float((jac.sum() - jac.diagonal().sum()) / (k * (k - 1)))

    class_masks = [[layer[c].cpu() for layer in layer_keep] for c in range(k)]
    return Modularization(
        tau=tau, class_masks=class_masks, krr=krr, model_krr=float(sum(krr) / k),
        cohesion=float(sum(per_class_cohesion) / k), coupling=coupling,
        per_class_cohesion=per_class_cohesion,
    )
