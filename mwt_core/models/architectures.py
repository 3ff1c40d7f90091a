"""The built-in CNNs (CIFAR-style variants), each masked (MwT) or plain.

Every convolution but the first (the one reading the image) is a masked
:class:`ConvUnit` when ``masked`` is true. Forward passes use only the ops the
slimming graph analysis understands (ConvUnit, ReLU, pooling, add, flatten,
dropout, linear).
"""

from __future__ import annotations

import torch
from torch import nn

from mwt_core.models.base import MwTNet
from mwt_core.models.masking import ConvUnit, inplace_ok, plain_inference
from mwt_core.models.registry import register_model

# The width multiplier a run of a built-in network takes when it names none: small enough
# that a CPU-only machine trains SimCNN on digits in a few minutes.
DEFAULT_WIDTH = 0.25

VGG16_PLAN: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier (never below 4)."""
    return max(4, int(round(channels * width)))


def _flat_features(features: nn.Module, in_channels: int, input_size: int) -> int:
    # eval mode: a 1-image batch would otherwise trip BN on 1x1 maps.
    features.eval()
    with torch.no_grad():
        out = features(torch.zeros(1, in_channels, input_size, input_size))
    features.train()
    return int(out.numel())


class ConvReLU(nn.Module):
    """A ConvUnit followed by ReLU."""

    def __init__(self, c_in: int, c_out: int, *, masked: bool, stride: int = 1) -> None:
        super().__init__()
        self.unit = ConvUnit(c_in, c_out, 3, stride=stride, masked=masked)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unit(x)
        # In inference the unit's output is a fresh buffer only this layer sees: ReLU in
        # place spares allocating (and page-faulting in) another one.
        return y.relu_() if inplace_ok(x, *self.unit.output_sources()) else self.act(y)

    def output_sources(self) -> tuple[nn.Module, ...]:
        """This layer and those whose output can be the tensor it returns (its ReLU runs in
        place on the unit's output): see :meth:`ConvUnit.output_sources`."""
        return self, *self.unit.output_sources()


class MaxPool2(nn.MaxPool2d):
    """2x2 max-pooling, stride 2; CPU inference takes the maximum of strided views.

    Two elementwise maxima over the input's row pairs and then column pairs give exactly
    max-pooling's values (a maximum is exact; NaN propagates either way) without the
    indices max_pool2d computes, and they run at the speed of any elementwise op for every
    channel count. ATen's channels_last max-pooling on this project's CPU (one thread) took
    3.5 ms for 12 channels and 3.9 ms for 16 at 256 x 32 x 32, and 2.8 ms for 31 channels
    against 1.4 ms for 32 at 16 x 16; the maxima take 1.6 and 0.5 ms there.
    Training keeps max_pool2d: its gradient goes to one input of a tie, not to both.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under 16k values (one image's early maps) max_pool2d's single call is as fast or faster.
        if not plain_inference(x) or x.device.type != "cpu" or x.dim() != 4 or x.numel() < 1 << 14:
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor mode: an odd last row goes
        rows = torch.maximum(x[:, :, 0:h:2, :w], x[:, :, 1:h:2, :w])
        return torch.maximum(rows[:, :, :, 0::2], rows[:, :, :, 1::2])


def _plain_stack(plan: list[int | str], in_channels: int, width: float, masked: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in, first = in_channels, True
    for item in plan:
        if item == "M":
            layers.append(MaxPool2())
            continue
        c_out = scaled(int(item), width)
        layers.append(ConvReLU(c_in, c_out, masked=masked and not first))
        c_in, first = c_out, False
    return nn.Sequential(*layers)


class VGG(MwTNet):
    """VGG-16 with batch norm; ``hidden`` adds SimCNN's two dropout+FC layers."""

    def __init__(
        self, num_classes: int, in_channels: int, input_size: int, width: float, masked: bool,
        hidden: int | None,
    ) -> None:
        super().__init__()
        self.features = _plain_stack(VGG16_PLAN, in_channels, width, masked)
        flat = _flat_features(self.features, in_channels, input_size)
        head: list[nn.Module] = [nn.Flatten()]
        if hidden is not None:
            head += [nn.Dropout(0.5), nn.Linear(flat, hidden), nn.ReLU(),
                     nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU()]
            flat = hidden
        head.append(nn.Linear(flat, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("simcnn", min_input_size=32, default_width=DEFAULT_WIDTH,
                description="SimCNN: 13 conv + 3 FC (VGG-16 layout with a dropout MLP head)")
def simcnn(num_classes: int, in_channels: int, input_size: int, width: float, masked: bool) -> MwTNet:
    return VGG(num_classes, in_channels, input_size, width, masked, hidden=scaled(512, width))


@register_model("vgg16", min_input_size=32, default_width=DEFAULT_WIDTH, description="VGG-16-BN, CIFAR variant (one FC layer)")
def vgg16(num_classes: int, in_channels: int, input_size: int, width: float, masked: bool) -> MwTNet:
    return VGG(num_classes, in_channels, input_size, width, masked, hidden=None)


class Residual(nn.Module):
    """``x + body(x)`` where body is two ConvReLU layers (ResCNN's residual pair)."""

    def __init__(self, channels: int, masked: bool) -> None:
        super().__init__()
        self.a = ConvReLU(channels, channels, masked=masked)
        self.b = ConvReLU(channels, channels, masked=masked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        if inplace_ok(x, *self.b.output_sources()):  # see ConvReLU.forward
            return y.add_(x)
        return x + y


class ResCNN(MwTNet):
    """ResCNN: 12 conv layers, three residual pairs, five poolings, one FC layer."""

    def __init__(self, num_classes: int, in_channels: int, input_size: int, width: float, masked: bool) -> None:
        super().__init__()
        c64, c128, c256, c512 = (scaled(c, width) for c in (64, 128, 256, 512))
        self.features = nn.Sequential(
            ConvReLU(in_channels, c64, masked=False),
            ConvReLU(c64, c128, masked=masked), MaxPool2(),
            Residual(c128, masked),
            ConvReLU(c128, c256, masked=masked), MaxPool2(),
            ConvReLU(c256, c512, masked=masked), MaxPool2(),
            Residual(c512, masked),
            ConvReLU(c512, c512, masked=masked), MaxPool2(),
            ConvReLU(c512, c512, masked=masked), MaxPool2(),
            Residual(c512, masked),
        )
        flat = _flat_features(self.features, in_channels, input_size)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(flat, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("rescnn", min_input_size=32, default_width=DEFAULT_WIDTH, description="ResCNN: 12 conv layers with 3 residual pairs")
def rescnn(num_classes: int, in_channels: int, input_size: int, width: float, masked: bool) -> MwTNet:
    return ResCNN(num_classes, in_channels, input_size, width, masked)


class BasicBlock(nn.Module):
    """ResNet basic block; a strided or widening block gets a 1x1 ConvUnit shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, masked: bool) -> None:
        super().__init__()
        self.conv1 = ConvReLU(c_in, c_out, masked=masked, stride=stride)
        self.conv2 = ConvUnit(c_out, c_out, 3, masked=masked)
        self.shortcut: nn.Module = (
            ConvUnit(c_in, c_out, 1, stride=stride, masked=masked)
            if stride != 1 or c_in != c_out else nn.Identity()
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        if inplace_ok(x, *self.conv2.output_sources()):  # see ConvReLU.forward
            return y.add_(self.shortcut(x)).relu_()
        return self.act(y + self.shortcut(x))


class ResNet18(MwTNet):
    """ResNet-18, CIFAR variant (3x3 stem, no stem pooling)."""

    def __init__(self, num_classes: int, in_channels: int, input_size: int, width: float, masked: bool) -> None:
        super().__init__()
        widths = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.stem = ConvReLU(in_channels, widths[0], masked=False)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, masked))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.layers(self.stem(x))))


@register_model("resnet18", min_input_size=8, default_width=DEFAULT_WIDTH, description="ResNet-18, CIFAR variant")
def resnet18(num_classes: int, in_channels: int, input_size: int, width: float, masked: bool) -> MwTNet:
    return ResNet18(num_classes, in_channels, input_size, width, masked)
