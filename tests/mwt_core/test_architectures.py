"""The built-in blocks' inference path: in place where nobody else holds the buffer, and the
same values as the autograd path (up to rounding: an ungated unit folds BN into its conv in
inference only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mwt_core.models.architectures import BasicBlock, ConvReLU, MaxPool2, Residual
from mwt_core.models.masking import ConvUnit, inplace_ok
from tests.support.nets import randomise_bn


def _trained_looking(block: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, eval mode, so every fold and mask path is exercised."""
    torch.manual_seed(0)
    return randomise_bn(block).eval()


def _inference_writes_into(block: nn.Module, producer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` in inference mode, checked to return the very buffer ``producer`` returned."""
    seen: list[torch.Tensor] = []
    inner = producer.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = inner(x)
        seen.append(out)
        return out

    # An instance attribute, not a hook: a hook would (rightly) turn the in-place path off.
    producer.forward = forward
    with torch.inference_mode():
        out = block(x)
    del producer.forward
    assert out.data_ptr() == seen[0].data_ptr()
    return out


@pytest.mark.parametrize("masked", [True, False])
def test_conv_relu_in_inference_reuses_the_units_buffer_with_the_same_values(masked):
    layer = _trained_looking(ConvReLU(6, 8, masked=masked))
    x = torch.randn(4, 6, 9, 9)
    with torch.no_grad():
        torch.set_grad_enabled(True)  # eval with autograd on: the out-of-place path
        expected = layer(x).detach()
    out = _inference_writes_into(layer, layer.unit, x)  # ReLU into the unit's output
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stride, c_in", [(1, 8), (2, 6)])
def test_basic_block_in_inference_adds_into_conv2s_buffer_with_the_same_values(stride, c_in):
    block = _trained_looking(BasicBlock(c_in, 8, stride, masked=True))
    x = torch.randn(3, c_in, 8, 8).contiguous(memory_format=torch.channels_last)
    expected = block(x).detach()
    out = _inference_writes_into(block, block.conv2, x)
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_residual_pair_in_inference_leaves_its_input_alone():
    block = _trained_looking(Residual(8, masked=True))
    x = torch.randn(2, 8, 6, 6)
    before = x.clone()
    expected = block(x).detach()
    with torch.no_grad():
        out = block(x)
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    assert torch.equal(x, before)  # the skip input is read, never written


def test_a_hook_sees_the_output_it_was_given_not_one_changed_later():
    # The feature taps of a composition keep a unit's output; the block must not then apply
    # its ReLU or residual addition in place on it.
    block = _trained_looking(BasicBlock(8, 8, 1, masked=True))
    x = torch.randn(3, 8, 8, 8)
    kept: list[torch.Tensor] = []
    handle = block.conv2.register_forward_hook(lambda mod, inp, out: kept.append(out))
    with torch.inference_mode():
        block(x)
        expected = block.conv2(block.conv1(x))
    handle.remove()
    assert torch.equal(kept[0], expected)
    assert (kept[0] < 0).any()  # pre-activation: a ReLU in place would have removed these


def test_in_place_only_in_inference_on_plain_tensors_without_hooks():
    unit = ConvUnit(4, 4)
    x = torch.randn(1, 4, 5, 5)
    assert not inplace_ok(x, *unit.output_sources())  # autograd on
    with torch.no_grad():
        assert inplace_ok(x, *unit.output_sources())
        # A hook on a layer whose output can be the unit's (BN's) holds it; one on the mask
        # generator's layers never sees it.
        handle = unit.bn.register_forward_hook(lambda mod, inp, out: None)
        assert not inplace_ok(x, *unit.output_sources())
        handle.remove()
        assert unit.gate is not None
        handle = unit.gate.fc1.register_forward_pre_hook(lambda mod, inp: None)
        assert inplace_ok(x, *unit.output_sources())
        handle.remove()
        assert not inplace_ok(torch.fx.Proxy.__new__(torch.fx.Proxy), unit)  # tracing


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_max_pool_in_inference_gives_max_pool2ds_values(channels_last, size):
    # Ties (rounded values), a NaN, odd sizes (floor mode drops the last row or column).
    torch.manual_seed(0)
    x = torch.randn(300, 11, *size).round()  # over the 16k values below which max_pool2d runs
    x[1, 2, 3, 3] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pool = MaxPool2()
    expected = torch.nn.functional.max_pool2d(x, 2)
    with torch.inference_mode():
        out = pool(x)
    assert torch.allclose(out, expected, equal_nan=True, rtol=0, atol=0)
    assert out.isnan().sum() == 1
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_max_pool_with_gradients_is_max_pool2d():
    # Training keeps max_pool2d's backward: a tie sends the whole gradient to one input.
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)
    MaxPool2()(x).sum().backward()
    assert x.grad is not None and sorted(x.grad.flatten().tolist()) == [0.0, 0.0, 0.0, 1.0]
