import pytest
import torch

from mwt_core.models.masking import ConvUnit, MaskGenerator, hidden_size
from tests.support.nets import randomise_bn


def test_hidden_size_rule():
    assert hidden_size(64) == 64
    assert hidden_size(127) == 127
    assert hidden_size(128) == 64
    assert hidden_size(512) == 256


def test_mask_generator_shape_range_and_init():
    gen = MaskGenerator(16, 32)
    assert gen.fc1.bias is None
    assert torch.all(gen.fc2.bias == 1.0)
    mask = gen(torch.randn(5, 16, 6, 6))
    assert mask.shape == (5, 32)
    assert torch.all(mask >= 0) and torch.all(mask < 1)


def test_fresh_generator_switches_most_kernels_on():
    torch.manual_seed(0)
    mask = MaskGenerator(16, 32)(torch.rand(64, 16, 4, 4))
    assert (mask > 0).float().mean() > 0.5


def test_conv_unit_applies_mask_after_bn():
    torch.manual_seed(0)
    unit = ConvUnit(3, 8).eval()
    x = torch.randn(2, 3, 5, 5)
    y = unit(x)
    expected = unit.bn(unit.conv(x)) * unit.gate(x)[:, :, None, None]
    assert torch.allclose(y, expected)
    assert unit.last_mask.shape == (2, 8)


def test_keep_forces_kernels_to_zero():
    unit = ConvUnit(3, 4).eval()
    unit.keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    y = unit(torch.randn(2, 3, 5, 5))
    assert torch.all(y[:, 1] == 0) and torch.all(y[:, 3] == 0)
    assert y[:, 0].abs().sum() > 0


def test_unmasked_unit_has_no_gate():
    unit = ConvUnit(3, 4, masked=False)
    assert unit.gate is None and not unit.masked


def test_gradient_into_a_masked_unit_keeps_the_channels_last_layout():
    """A mask generator reads the unit's input too; its pooling's gradient must come back in
    the input's layout, or the activation's accumulated gradient turns NCHW and every backward
    op on it mixes layouts (several times slower on the CPU)."""
    first = ConvUnit(3, 16).to(memory_format=torch.channels_last)
    second = ConvUnit(16, 16).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    h = torch.relu(first(x))
    seen = []
    h.register_hook(seen.append)
    second(h).sum().backward()
    assert h.is_contiguous(memory_format=torch.channels_last)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    # NCHW stays NCHW, and the pooled value is the same mean either way
    g = MaskGenerator(16, 16)
    assert torch.allclose(g(h.detach()), g(h.detach().contiguous()), atol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
def test_inference_folds_batch_norm_and_mask_into_one_pass_with_the_same_values(affine):
    # In eval mode a gated unit computes conv * (s * m) + t * m in one op; it must equal
    # BN(conv) * m, with and without a forced-zero keep vector.
    torch.manual_seed(0)
    unit = ConvUnit(5, 7)
    unit.bn = randomise_bn(torch.nn.BatchNorm2d(7, affine=affine))
    unit.eval()
    x = torch.randn(4, 5, 9, 9)
    for keep in (None, (torch.arange(7) % 3 != 0).float()):
        unit.keep = keep
        with torch.no_grad():
            out = unit(x)
            mask = unit.gate(x) * (keep if keep is not None else 1.0)
            expected = unit.bn(unit.conv(x)) * mask[:, :, None, None]
        assert torch.allclose(out, expected, atol=1e-5, rtol=0)
        assert torch.equal(unit.last_mask, mask)


def test_inference_folds_batch_norm_into_an_ungated_units_conv_and_refolds_on_change():
    # CPU inference of a unit without a mask generator runs one conv with BN (and keep)
    # folded into its weights and bias; it must equal BN(conv) [* keep] for any conv (bias,
    # groups), and fold again when a weight changes in place or is loaded.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=True)
    bn = randomise_bn(torch.nn.BatchNorm2d(8))
    unit = ConvUnit.from_layers(conv, bn, masked=False).eval()
    x = torch.randn(3, 6, 7, 7)

    def reference() -> torch.Tensor:
        y = unit.bn(unit.conv(x))
        return y * unit.keep.view(1, -1, 1, 1) if unit.keep is not None else y

    for keep in (None, (torch.arange(8) % 3 != 0).float()):
        unit.keep = keep
        with torch.no_grad():
            assert torch.allclose(unit(x), reference(), atol=1e-5, rtol=0)
    with torch.no_grad():
        unit.conv.weight.mul_(-2.0)  # an optimiser step would do the same, in place
        assert torch.allclose(unit(x), reference(), atol=1e-5, rtol=0)
        state = {k: v.clone() for k, v in unit.state_dict().items()}
        state["bn.running_mean"].add_(1.0)
        unit.load_state_dict(state)
        assert torch.allclose(unit(x), reference(), atol=1e-5, rtol=0)
    # A hook on the conv still sees its call: the unit runs unfolded while one is registered.
    seen: list[torch.Size] = []
    with torch.no_grad():
        expected = reference()
        handle = unit.conv.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
        assert torch.allclose(unit(x), expected, atol=1e-5, rtol=0)
    handle.remove()
    assert seen == [torch.Size([3, 8, 7, 7])]
    # With gradients wanted the unit runs unfolded, so they reach the conv's own weight.
    unit(x).sum().backward()
    assert unit.conv.weight.grad is not None and unit.conv.weight.grad.abs().sum() > 0
    # The folded tensors are not state: nothing new is saved or loaded.
    assert set(unit.state_dict()) == set(state)


def test_gated_unit_in_inference_keeps_bns_scale_and_shift_until_bn_changes():
    # CPU inference reuses BN's scale and shift between calls (five small ops a unit saved),
    # and computes them again once a statistic changes in place.
    torch.manual_seed(0)
    unit = randomise_bn(ConvUnit(5, 7)).eval()
    x = torch.randn(4, 5, 9, 9)

    def reference() -> torch.Tensor:
        return unit.bn(unit.conv(x)) * unit.gate(x)[:, :, None, None]

    with torch.inference_mode():
        first = unit(x)
        kept = unit.__dict__["_affine_cache"]
        assert torch.allclose(unit(x), first, atol=0, rtol=0)
        assert unit.__dict__["_affine_cache"] is kept
    with torch.no_grad():
        unit.bn.running_mean.add_(1.0)
        expected = reference()
    with torch.inference_mode():
        assert torch.allclose(unit(x), expected, atol=1e-5, rtol=0)
    assert unit.__dict__["_affine_cache"] is not kept
    # With autograd on nothing is reused, so gradients reach BN's weight.
    unit(x).sum().backward()
    assert unit.bn.weight.grad is not None and unit.bn.weight.grad.abs().sum() > 0
