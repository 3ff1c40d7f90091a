"""Cohesion and coupling losses on mask matrices (DESIGN §1.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_similarity_losses(
    masks: list[torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(cohesion_loss, coupling_loss)`` averaged over masked layers.

    For each ``B x K`` mask matrix the rows are L2-normalised and ``S = M M^T`` is
    compared over pairs ``i < j``: cohesion loss is ``1 - mean(S)`` over same-label
    pairs, coupling loss is ``mean(S)`` over different-label pairs. A batch without
    such pairs contributes 0 for that term rather than NaN.
    """
    if not masks:
        zero = labels.new_zeros((), dtype=torch.float32)
        return zero, zero
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    same_pairs = (same & upper).float()
    diff_pairs = (~same & upper).float()
    n_same = same_pairs.sum()
    n_diff = diff_pairs.sum()

    cohesion = masks[0].new_zeros((), dtype=torch.float32)
    coupling = masks[0].new_zeros((), dtype=torch.float32)
    for mask in masks:
        unit = F.normalize(mask.float(), dim=1, eps=1e-8)
        sim = unit @ unit.T
        if n_same > 0:
            cohesion = cohesion + (1.0 - (sim * same_pairs).sum() / n_same)
        if n_diff > 0:
            coupling = coupling + (sim * diff_pairs).sum() / n_diff
    return cohesion / len(masks), coupling / len(masks)


def mask_density(masks: list[torch.Tensor]) -> torch.Tensor:
    """Mean mask value, averaged over masked layers: an optional sparsity term (not in DESIGN §1.2).

    Cohesion and coupling compare mask *directions*, so a kernel every class switches on
    a little costs them almost nothing yet counts fully in the binary modules (KRR,
    coupling). Weighting this term (``TrainConfig.gamma``) pushes such kernels off.
    """
    if not masks:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack([m.float().mean() for m in masks]).mean()
