"""torchvision's classification CNNs by name, converted to their masked MwT form.

Built with ``weights=None`` (nothing is ever downloaded), ``num_classes`` and input
channels from the dataset; names carry a ``tv_`` prefix so that they never collide with
the built-in CIFAR variants (``resnet18`` is the CIFAR ResNet-18, ``tv_resnet18``
torchvision's). Their layouts are torchvision's, so they have no width multiplier: a
state dict trained with torchvision loads into them (``convert.ConvertedNet``).
"""

from __future__ import annotations

from mwt_core.models.base import MwTNet
from mwt_core.models.registry import Builder, register_model

# Every entry downsamples by 32 before its global pooling: 32x32 is the smallest input.
MIN_INPUT = 32

# name in torchvision -> (description, layer kinds the conversion handles in it)
CATALOGUE: dict[str, tuple[str, tuple[str, ...]]] = {
    "resnet18": ("ResNet-18 (ImageNet layout: 7x7 stem, max pool)", ("residual",)),
    "resnet50": ("ResNet-50, bottleneck blocks", ("residual", "1x1 projections")),
    "vgg11_bn": ("VGG-11 with BN, 3 FC layers with dropout", ("dropout", "adaptive pooling")),
    "vgg16_bn": ("VGG-16 with BN, 3 FC layers with dropout", ("dropout", "adaptive pooling")),
    "mobilenet_v2": ("MobileNetV2: inverted residuals, ReLU6",
                     ("depthwise", "residual", "ReLU6", "dropout")),
    "mobilenet_v3_small": ("MobileNetV3-Small: Hardswish, squeeze-and-excitation",
                           ("depthwise", "residual", "squeeze-excitation", "Hardswish")),
    "efficientnet_b0": ("EfficientNet-B0: MBConv, SiLU, squeeze-and-excitation, stochastic depth",
                        ("depthwise", "residual", "squeeze-excitation", "SiLU", "stochastic depth")),
    "densenet121": ("DenseNet-121: dense blocks (channel concatenation), pre-activation BN",
                    ("concatenation", "pre-activation BN (concatenated maps are not cut)")),
    "regnet_y_400mf": ("RegNetY-400MF: grouped convs, squeeze-and-excitation",
                       ("grouped (not cut)", "residual", "squeeze-excitation")),
}

# Listed so that users see why they are not offered (the conversion refuses them).
REFUSED: dict[str, str] = {
    "convnext_tiny": "its LayerNorm normalises across channels, so removing a kernel changes "
                     "every other channel of the block; modules could not be exact",
    "shufflenet_v2_x1_0": "its channel shuffle (view/transpose) and channel split (chunk) move "
                          "channels between branches, which slimming does not track",
}


def _builder(tv_name: str) -> Builder:
    def build(num_classes: int, in_channels: int, input_size: int, width: float, masked: bool) -> MwTNet:
        import torchvision.models as tvm

        from mwt_core.models.convert import convert

        net = tvm.get_model(tv_name, weights=None, num_classes=num_classes)
        return convert(net, in_channels=in_channels, input_size=input_size, masked=masked)

    return build


def _refused(name: str, reason: str) -> Builder:
    def build(num_classes: int, in_channels: int, input_size: int, width: float, masked: bool) -> MwTNet:
        raise ValueError(f"tv_{name} cannot be trained with MwT: {reason}")

    return build


for _name, (_description, _features) in CATALOGUE.items():
    register_model(f"tv_{_name}", min_input_size=MIN_INPUT, description=f"torchvision {_description}",
                   source="torchvision", width_multiplier=False, features=_features)(_builder(_name))
for _name, _reason in REFUSED.items():
    register_model(f"tv_{_name}", min_input_size=MIN_INPUT, description=f"torchvision {_name}",
                   source="torchvision", width_multiplier=False, unsupported=_reason)(_refused(_name, _reason))
