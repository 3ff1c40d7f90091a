"""Modularization after training (DESIGN §1.3) and its metrics (§1.4).

One pass over the training set collects, per masked layer, the binary activity of
every kernel for every sample. From these, per class and kernel, the activation
frequency; then the module masks (frequency >= tau, lowered per layer in steps of
0.05 until a layer keeps something), KRR, cohesion and coupling. All of it is
matrix arithmetic: no Python loop over samples or pairs. Memory stays bounded: the
activity is one byte per sample and kernel, and per-class counts and pairwise Jaccard
means are computed in blocks (never an N x N or N x K float matrix in one piece).
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
    """Per masked layer, the ``N x K_l`` boolean activity (mask > 0) of every sample.

    One byte per sample and kernel, on the CPU, written in place batch by batch: the
    float masks of a batch are the only other memory, whatever ``N``.
    """
    was_training = model.training
    model.eval()
    units = model.mask_units()
    n = len(batches)
    per_layer = [torch.empty(n, u.out_channels, dtype=torch.bool) for u in units]
    start = 0
    for x, _ in batches.ordered(batch_size):
        _, masks = model.forward_with_masks(x, units)
        for store, m in zip(per_layer, masks, strict=True):
            store[start:start + m.shape[0]].copy_(m > 0)
        start += x.shape[0]
    model.train(was_training)
    return per_layer


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


# Elements of one float block in the chunked computations (64 MiB): bounds the memory of
# frequency counts and of the pairwise Jaccard means whatever the class sizes.
BLOCK_ELEMENTS = 1 << 24


def class_frequencies(activity: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``classes x K`` fraction of each class's samples for which each kernel is active.

    Counted in row chunks (exact: 0/1 sums in float32 up to 2**24 samples per class).
    """
    n, k = activity.shape
    counts = torch.zeros(num_classes, k)
    step = max(1, BLOCK_ELEMENTS // max(1, k))
    for start in range(0, n, step):
        counts.index_add_(0, labels[start:start + step], activity[start:start + step].float())
    sizes = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts / sizes[:, None]


def mean_pairwise_jaccard(rows: torch.Tensor) -> float:
    """Mean Jaccard index over pairs ``i != j`` of the rows of a bool matrix (1.0 below 2 rows).

    Identical rows are merged first (trained masks repeat a lot), then the upper triangle
    of the weighted pair matrix is computed block by block, so memory is
    ``O(block x unique rows)`` instead of ``O(n^2)``.
    """
    n = rows.shape[0]
    if n < 2:
        return 1.0
    uniq, counts = torch.unique(rows, dim=0, return_counts=True)
    a = uniq.float()
    w = counts.double()
    sizes = a.sum(1)
    u = a.shape[0]
    # Pairs of equal rows (Jaccard 1): c * (c - 1) ordered pairs per unique row.
    total = float((w * (w - 1)).sum())
    step = max(1, BLOCK_ELEMENTS // max(1, u))
    for start in range(0, u, step):
        stop = min(start + step, u)
        # Block rows against rows from ``start`` on (the upper triangle): intersections
        # are exact integer counts in float32.
        inter = a[start:stop] @ a[start:].T
        union = (sizes[start:stop, None] + sizes[None, start:]).sub_(inter).clamp_(min=1)
        # Two empty rows have union 0, but at most one unique row is empty: that case is
        # only ever on the diagonal, which is zeroed (counted above).
        jac = inter.div_(union).double()
        del inter, union
        jac[:, :stop - start].diagonal().zero_()
        # The block's own square is symmetric and holds both orders of each pair; the
        # columns past it hold one order, so count them twice. Weighted by repeat counts.
        per_row = jac[:, :stop - start] @ w[start:stop] + 2.0 * (jac[:, stop - start:] @ w[stop:])
        total += float(w[start:stop] @ per_row)
    return total / (n * (n - 1))


def modularize(
    model: MwTNet, data: DatasetBundle, tau: float = ModularizeConfig.tau, device: str = "auto",
    batch_size: int = 512,
) -> Modularization:
    """Cut a trained masked model into one module mask per class, with its metrics."""
    return modularize_sweep(model, data, [tau], device, batch_size)[0]


def modularize_sweep(
    model: MwTNet, data: DatasetBundle, taus: list[float], device: str = "auto",
    batch_size: int = 512,
) -> list[Modularization]:
    """:func:`modularize` at several thresholds from one pass over the training set."""
    for tau in taus:
        check_tau(tau)
    activity, labels = training_activity(model, data, device, batch_size)
    return [modularize_activity(activity, labels, data.num_classes, tau) for tau in taus]


def training_activity(model: MwTNet, data: DatasetBundle, device: str = "auto",
                      batch_size: int = 512) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The kernel activity of ``data``'s training split (:func:`collect_activity`) and its
    labels on the CPU: what every threshold's modularization is computed from."""
    if not model.mask_units():
        raise ValueError("this model has no mask generators (standard training); train it with MwT")
    dev = resolve_device(device)
    model = model.to(dev)
    batches = ImageBatches(data.train_x, data.train_y, data.spec, dev)
    activity = collect_activity(model, batches, batch_size)
    return activity, data.train_y.to(torch.long).cpu()


def union_at(freqs: list[torch.Tensor], classes: list[int], tau: float) -> list[torch.Tensor]:
    """Per layer, the kernels the module of ``classes`` keeps at ``tau``, from the layers'
    ``classes x K`` frequencies (:func:`class_frequencies`): the same masks as
    ``modularize_activity(...).union(classes)``, without the metrics of every class."""
    idx = torch.tensor(classes, dtype=torch.long)
    return [module_masks(freq.index_select(0, idx), tau).any(0) for freq in freqs]


def modularize_activity(activity: list[torch.Tensor], labels: torch.Tensor, num_classes: int,
                        tau: float) -> Modularization:
    """Module masks and metrics from collected activity (per layer ``N x K_l`` bool)."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    k = num_classes
    labels = labels.to(torch.long).cpu()
    activity = [a.cpu() for a in activity]
    freqs = [class_frequencies(act, labels, k) for act in activity]
    layer_keep = [module_masks(freq, tau) for freq in freqs]
    keep_all = torch.cat(layer_keep, dim=1)  # C x sum(K): each class module's kernels
    total = keep_all.shape[1]

    krr = (keep_all.sum(1).float() / total).tolist()
    per_class_cohesion = []
    for c in range(k):
        # Pairs of samples of class c, compared on that module's kept kernels only.
        idx = (labels == c).nonzero().flatten()
        rows = torch.cat([act.index_select(0, idx)[:, keep[c]]
                          for act, keep in zip(activity, layer_keep, strict=True)], dim=1)
        per_class_cohesion.append(mean_pairwise_jaccard(rows))
        del rows
    jac = _pairwise_jaccard(keep_all, keep_all)
    coupling = float((jac.sum() - jac.diagonal().sum()) / (k * (k - 1)))

    class_masks = [[layer[c].cpu() for layer in layer_keep] for c in range(k)]
    return Modularization(
        tau=tau, class_masks=class_masks, krr=krr, model_krr=float(sum(krr) / k),
        cohesion=float(sum(per_class_cohesion) / k), coupling=coupling,
        per_class_cohesion=per_class_cohesion,
    )
