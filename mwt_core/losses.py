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
    # Masked means with tensor-valued guards: no host synchronisation (a Python ``if`` on
    # a tensor would wait for the device every step and break CUDA graphs / torch.compile).
    # Without same-label pairs every product is masked out, so the cohesion term is
    # multiplied by 0 instead of being skipped; the clamp only avoids 0 / 0.
    n_same = same_pairs.sum()
    n_diff = diff_pairs.sum().clamp(min=1)  # no different-label pair: the sum is 0 too
    has_same = (n_same > 0).float()
    n_same = n_same.clamp(min=1)

    # The per-layer similarities are only ever summed, and sum_l U_l U_l^T = U U^T with U
    # the layers' row-normalised masks side by side: one product and one pair of masked
    # sums for all layers, instead of a dozen small ops per layer (they were a third of the
    # MwT step's ops, and on a GPU that step is bound by kernel launches).
    units = torch.cat([F.normalize(mask.float(), dim=1, eps=1e-8) for mask in masks], dim=1)
    sim = units @ units.T
    layers = len(masks)
    cohesion = has_same * (1.0 - (sim * same_pairs).sum() / (n_same * layers))
    coupling = (sim * diff_pairs).sum() / (n_diff * layers)
    return cohesion, coupling


def mask_overlap(masks: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Un-normalised mask overlap of different-label pairs, weighted per layer by its coupling.

    An optional term (``TrainConfig.gamma``), not in DESIGN §1.2. The cosine coupling
    loss is blind to scale: where a layer's mask generator cannot tell the classes
    apart (early layers on small, uniform images), every sample gets the same mask,
    cosine similarity is 1 whatever that mask is, and the gradient vanishes, so a
    kernel every class keeps on costs nothing there yet counts fully in the binary
    modules (KRR, coupling). For each layer this term takes the mean of
    ``m_i . m_j / K`` over different-label pairs, which charges each kernel by how
    strongly samples of *different* classes use it together (a class's own kernels
    feel no push), and weights it by the layer's cosine coupling (detached), so a
    layer stuck at one shared mask feels all of it and a layer whose masks already
    differ by class keeps its class-specific kernels. Averaged over layers.
    """
    if not masks:
        return labels.new_zeros((), dtype=torch.float32)
    _, diff_pairs = _pair_weights(labels)
    n_diff = diff_pairs.sum().clamp(min=1)  # no different-label pair: every product is masked out
    total = masks[0].new_zeros((), dtype=torch.float32)
    for mask in masks:
        m = mask.float()
        with torch.no_grad():
            unit = F.normalize(m, dim=1, eps=1e-8)
            weight = ((unit @ unit.T) * diff_pairs).sum() / n_diff
        total = total + weight * ((m @ m.T) * diff_pairs).sum() / (n_diff * m.shape[1])
    return total / len(masks)


def quadrant_mix(x: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Synthetic outliers: each image's four quadrants taken from four random images of the batch.

    Stroke pieces of the training classes put together wrongly look like nothing the model
    knows, which is what an image of a class it never saw looks like to it (open set). The
    top-left quadrant keeps the image's own; the others come from images of a different label
    where the batch has one (same-label quadrants would rebuild a known class).
    """
    n, _, h, w = x.shape
    hh, hw = h // 2, w // 2
    out = x.clone()
    for i, (rows, cols) in enumerate(((slice(0, hh), slice(hw, w)), (slice(hh, h), slice(0, hw)),
                                      (slice(hh, h), slice(hw, w)))):
        pick = torch.randperm(n, device=x.device, generator=generator)
        # Where the random partner shares the label, take the next image instead (a cheap
        # nudge towards mixing classes; a batch of one label simply mixes itself).
        same = labels[pick] == labels
        pick = torch.where(same, pick.roll(i + 1), pick)
        out[:, :, rows, cols] = x[pick][:, :, rows, cols]
    return out


def outlier_exposure(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` to the uniform distribution (outlier exposure): 0 only when
    every class is equally likely, so the model learns to answer "none of mine" with flat logits."""
    return -(F.log_softmax(logits, dim=1).mean(dim=1)).mean() - torch.log(
        torch.tensor(float(logits.shape[1]), device=logits.device))
