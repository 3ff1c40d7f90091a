"""Small network helpers for the core's tests."""

from __future__ import annotations

from torch import nn


def randomise_bn(net: nn.Module) -> nn.Module:
    """Give every BatchNorm2d trained-looking statistics, and affine weights where it has them
    (fresh ones are identity-like, so an equality test would not bite); returns ``net``."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.normal_()
                m.bias.data.normal_()
    return net
