import pytest
import torch

from mwt_core.losses import mask_similarity_losses


def test_identical_masks_within_class_and_orthogonal_across():
    a = torch.tensor([1.0, 1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 0.0, 1.0, 1.0])
    masks = [torch.stack([a, a, b, b])]
    labels = torch.tensor([0, 0, 1, 1])
    coh, coup = mask_similarity_losses(masks, labels)
    assert coh.item() == pytest.approx(0.0, abs=1e-6)
    assert coup.item() == pytest.approx(0.0, abs=1e-6)


def test_matches_pairwise_definition():
    torch.manual_seed(0)
    masks = [torch.rand(6, 5), torch.rand(6, 3)]
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    coh, coup = mask_similarity_losses(masks, labels)
    expected_coh, expected_coup = [], []
    for m in masks:
        same, diff = [], []
        for i in range(6):
            for j in range(i + 1, 6):
                s = torch.dot(m[i], m[j]) / (m[i].norm() * m[j].norm())
                (same if labels[i] == labels[j] else diff).append(s)
        expected_coh.append(1 - torch.stack(same).mean())
        expected_coup.append(torch.stack(diff).mean())
    assert torch.isclose(coh, torch.stack(expected_coh).mean(), atol=1e-6)
    assert torch.isclose(coup, torch.stack(expected_coup).mean(), atol=1e-6)


def test_no_nan_without_same_or_different_pairs():
    masks = [torch.rand(3, 4, requires_grad=True)]
    coh, coup = mask_similarity_losses(masks, torch.tensor([0, 1, 2]))
    assert coh.item() == 0.0 and torch.isfinite(coup)
    coh, coup = mask_similarity_losses(masks, torch.tensor([1, 1, 1]))
    assert coup.item() == 0.0 and torch.isfinite(coh)
    (coh + coup).backward()
    assert torch.isfinite(masks[0].grad).all()


def test_all_zero_masks_do_not_produce_nan():
    masks = [torch.zeros(4, 5, requires_grad=True)]
    coh, coup = mask_similarity_losses(masks, torch.tensor([0, 0, 1, 1]))
    (coh + coup).backward()
    assert torch.isfinite(coh) and torch.isfinite(coup)
    assert torch.isfinite(masks[0].grad).all()


def test_mask_density_is_the_mean_mask_over_layers():
    from mwt_core.losses import mask_density

    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # mean 0.25
    b = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])  # mean 0.5
    assert float(mask_density([a, b])) == 0.375
    assert float(mask_density([])) == 0.0
    a.requires_grad_(True)
    mask_density([a]).backward()
    assert torch.allclose(a.grad, torch.full_like(a, 0.25))
