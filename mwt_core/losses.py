"""Cohesion and coupling losses on mask matrices (DESIGN §1.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair_weights(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B x B`` float indicators of same-label and different-label pairs ``i < j``."""
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    return (same & upper).float(), (~same & upper).float()


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
    same_pairs, diff_pairs = _pair_weights(labels)
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


def mask_overlap(masks: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean un-normalised overlap ``m_i . m_j / K`` of different-label pairs, averaged over layers.

    An optional term (``TrainConfig.gamma``), not in DESIGN §1.2. The cosine coupling
    loss is blind to scale: where a layer's mask generator cannot tell the classes
    apart (early layers on small, uniform images), every sample gets the same mask,
    cosine similarity is 1 whatever that mask is, and the gradient vanishes, so a
    kernel every class keeps on costs nothing there yet counts fully in the binary
    modules (KRR, coupling). This term charges each kernel by how strongly
    samples of *different* classes use it together: shared kernels are pushed off
    unless the classification loss needs them, class-specific ones are left alone
    (unlike a plain density penalty, which also shrinks those).
    """
    if not masks:
        return labels.new_zeros((), dtype=torch.float32)
    _, diff_pairs = _pair_weights(labels)
    n_diff = diff_pairs.sum().clamp(min=1)  # no different-label pair: every product is masked out
    total = masks[0].new_zeros((), dtype=torch.float32)
    for mask in masks:
        m = mask.float()
        total = total + ((m @ m.T) * diff_pairs).sum() / (n_diff * m.shape[1])
    return total / len(masks)
