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


def test_mask_overlap_matches_pairwise_definition():
    from mwt_core.losses import mask_overlap

    torch.manual_seed(0)
    masks = [torch.rand(6, 5), torch.rand(6, 3)]
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    expected = []
    for m in masks:
        pairs = [(i, j) for i in range(6) for j in range(i + 1, 6) if labels[i] != labels[j]]
        overlap = torch.stack([torch.dot(m[i], m[j]) / m.shape[1] for i, j in pairs]).mean()
        cosine = torch.stack([torch.dot(m[i], m[j]) / (m[i].norm() * m[j].norm()) for i, j in pairs]).mean()
        expected.append(cosine * overlap)
    assert torch.isclose(mask_overlap(masks, labels), torch.stack(expected).mean(), atol=1e-6)


def test_mask_overlap_charges_shared_kernels_only():
    from mwt_core.losses import mask_overlap

    # Kernel 0 is on for both classes, kernels 1 and 2 belong to one class each.
    m = torch.tensor([[0.8, 0.9, 0.0], [0.8, 0.9, 0.0], [0.8, 0.0, 0.7], [0.8, 0.0, 0.7]],
                     requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = mask_overlap([m], labels)
    cosine = 0.8 * 0.8 / (torch.tensor([0.8, 0.9]).norm() * torch.tensor([0.8, 0.7]).norm())
    assert loss.item() == pytest.approx(float(cosine) * 0.8 * 0.8 / 3)
    loss.backward()
    assert (m.grad[:, 0] > 0).all()
    # A class's own kernels feel no push (only switching on another class's kernel would cost).
    assert (m.grad[:2, 1] == 0).all() and (m.grad[2:, 2] == 0).all()
    # The cosine coupling loss of the same masks stays > 0 but cannot tell a shared kernel from
    # a scaled-down one; the overlap term falls when the shared kernel is switched off.
    off = m.detach().clone()
    off[:, 0] = 0
    assert float(mask_overlap([off], labels)) == 0.0


def test_mask_overlap_weighs_layers_by_their_coupling():
    from mwt_core.losses import mask_overlap

    labels = torch.tensor([0, 0, 1, 1])
    # A layer that gives every sample the same mask (cosine coupling 1) is charged far more
    # than one that already separates the classes apart from one shared kernel.
    stuck = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    split = torch.tensor([[0.5, 1.0, 0.0], [0.5, 1.0, 0.0], [0.5, 0.0, 1.0], [0.5, 0.0, 1.0]])
    assert mask_overlap([stuck], labels).item() > 2 * mask_overlap([split], labels).item()


def test_mask_overlap_without_masks_or_different_pairs_is_zero():
    from mwt_core.losses import mask_overlap

    assert float(mask_overlap([], torch.tensor([0, 1]))) == 0.0
    m = torch.rand(3, 4, requires_grad=True)
    loss = mask_overlap([m], torch.tensor([2, 2, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert (m.grad == 0).all()


def test_outlier_exposure_is_zero_only_for_uniform_logits_and_quadrant_mix_mixes():
    import torch

    from mwt_core.losses import outlier_exposure, quadrant_mix

    assert float(outlier_exposure(torch.zeros(4, 5))) == pytest.approx(0.0, abs=1e-6)
    assert float(outlier_exposure(torch.tensor([[5.0, 0, 0, 0, 0]]))) > 1.0
    x = torch.arange(4.0)[:, None, None, None].expand(4, 1, 8, 8).clone()  # image i is all i
    y = torch.tensor([0, 1, 2, 3])
    mixed = quadrant_mix(x, y, generator=torch.Generator().manual_seed(0))
    assert mixed.shape == x.shape and torch.equal(mixed[:, :, :4, :4], x[:, :, :4, :4])
    # The other three quadrants come from images of other labels (all labels differ here).
    for q in (mixed[:, 0, :4, 4:], mixed[:, 0, 4:, :4], mixed[:, 0, 4:, 4:]):
        assert (q[:, 0, 0] != torch.arange(4.0)).all()


def _reference_losses(masks, labels):
    """The losses as first written (Python ``if`` on pair counts): the values to keep."""
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    same_pairs, diff_pairs = (same & upper).float(), (~same & upper).float()
    n_same, n_diff = same_pairs.sum(), diff_pairs.sum()
    coh = coup = torch.zeros(())
    for mask in masks:
        unit = torch.nn.functional.normalize(mask.float(), dim=1, eps=1e-8)
        sim = unit @ unit.T
        if n_same > 0:
            coh = coh + (1.0 - (sim * same_pairs).sum() / n_same)
        if n_diff > 0:
            coup = coup + (sim * diff_pairs).sum() / n_diff
    return coh / len(masks), coup / len(masks)


@pytest.mark.parametrize("labels", [
    [0, 1, 0, 2, 1, 0, 3, 3],  # mixed
    [0, 1, 2, 3, 4, 5, 6, 7],  # no same-label pair
    [2, 2, 2, 2, 2, 2, 2, 2],  # no different-label pair
    [0, 1],  # smallest batch
])
def test_sync_free_losses_equal_the_original_formulas(labels):
    g = torch.Generator().manual_seed(len(labels))
    y = torch.tensor(labels)
    # Sparse masks (exact zeros, one all-zero row) as a trained generator gives.
    masks = [torch.relu(torch.rand(len(y), k, generator=g) - 0.5) for k in (5, 3, 8)]
    masks[1][0] = 0
    masks = [m.requires_grad_() for m in masks]
    coh, coup = mask_similarity_losses(masks, y)
    ref_coh, ref_coup = _reference_losses([m.detach() for m in masks], y)
    assert torch.equal(coh.detach(), ref_coh) or torch.isclose(coh, ref_coh, atol=1e-7)
    assert torch.equal(coup.detach(), ref_coup) or torch.isclose(coup, ref_coup, atol=1e-7)
    (coh + coup).backward()
    assert all(torch.isfinite(m.grad).all() for m in masks)


def test_losses_never_convert_a_tensor_to_a_python_value(monkeypatch):
    # A bool/int/float/item conversion of a tensor waits for the device: none is allowed.
    calls = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _n=name, _r=real, **k: calls.append(_n) or _r(self, *a, **k))
    mask_similarity_losses([torch.rand(6, 4), torch.rand(6, 3)], torch.tensor([0, 1, 0, 2, 1, 0]))
    monkeypatch.undo()
    assert calls == []
