"""Any torch.fx-traceable torch.nn CNN into its masked MwT form (DESIGN §1.1).

The network is traced once to learn its structure, then changed in place: every
``nn.Conv2d`` and the BN that alone reads its output become one :class:`ConvUnit`
(the BN's slot holds an identity), with a mask generator on every unit but the ones
reading the image. Convs on globally pooled features (squeeze-and-excitation) stay
plain: they are fully connected layers that gate channels, not kernels to modularize.
The network keeps its own ``forward``; the result is checked by the slimming analysis,
so an op slimming cannot carry channels through is refused here, before any training,
with the op and the layer named.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from mwt_core.models.base import MwTNet
from mwt_core.models.masking import ConvUnit


class ConversionError(ValueError):
    """The network cannot be turned into a masked MwT network (the message says why)."""


class ConvertedNet(MwTNet):
    """A converted torch.nn network: its own forward, with ConvUnits in place of its convs.

    ``renames`` maps the original network's module paths to the converted ones (a conv
    ``P`` becomes ``P.conv``, its BN ``Q`` becomes ``P.bn``), so a state dict of the
    original network can be loaded into the converted one.
    """

    def __init__(self, net: nn.Module, renames: dict[str, str]) -> None:
        super().__init__()
        self.net = net
        self.renames = dict(renames)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def converted_key(self, key: str) -> str:
        """The state-dict key in this network of the original network's ``key``."""
        module, _, tensor = key.rpartition(".")
        return f"net.{self.renames.get(module, module)}.{tensor}" if module else f"net.{key}"


def _is_global_pool(node: fx.Node, gm: fx.GraphModule) -> bool:
    def one(size: Any) -> bool:
        return size == 1 or size == (1, 1) or size == [1, 1]

    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and one(mod.output_size)
    if node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return one(size)
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return (isinstance(dims, (list, tuple)) and tuple(dims) in ((2, 3), (-2, -1))
                and bool(node.kwargs.get("keepdim", False)))
    return False


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.groups != 1:
        raise ConversionError(f"the first convolution is grouped; it cannot read {in_channels} channels")
    return nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,  # type: ignore[arg-type]
        padding_mode=conv.padding_mode,
    )


def convert(
    net: nn.Module, *, in_channels: int, input_size: int, masked: bool = True,
) -> ConvertedNet:
    """``net`` (changed in place and wrapped) as a masked MwT network, checked for slimming.

    ``in_channels``: channels of the images; the convs reading the image are rebuilt
    for them when they differ (fresh weights). ``masked``: add mask generators (MwT
    training); without, the same structure trains as a standard network.
    Raises :class:`ConversionError` naming the op and layer it cannot handle.
    """
    from mwt_core.slimming import GraphTracer, SlimmingError, analyse

    try:
        graph = GraphTracer().trace(net)
    except Exception as exc:  # tracing runs the user's forward symbolically: any error
        raise ConversionError(
            f"torch.fx cannot trace {type(net).__name__} (data-dependent control flow?): {exc}"
        ) from exc
    gm = fx.GraphModule(net, graph)

    raw: set[fx.Node] = set()  # nodes that see the image with no conv in between
    pooled: set[fx.Node] = set()  # nodes computed from globally pooled features only
    convs: list[tuple[fx.Node, nn.Conv2d]] = []
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, ConvUnit):
            raise ConversionError(f"{type(net).__name__} is already converted (unit at {node.target})")
        if node.op == "placeholder":
            raw.add(node)
        elif isinstance(mod, nn.Conv2d):
            convs.append((node, mod))
        elif any(a in raw for a in inputs):
            raw.add(node)
        if _is_global_pool(node, gm) or (inputs and all(a in pooled for a in inputs)):
            pooled.add(node)

    renames: dict[str, str] = {}
    seen: set[int] = set()
    units = 0
    for node, conv in convs:
        path = str(node.target)
        if id(conv) in seen:
            raise ConversionError(f"convolution {path} is used twice; shared layers cannot be slimmed")
        seen.add(id(conv))
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node) and source in pooled:
            continue  # a squeeze-and-excitation layer: stays a plain conv
        users = list(node.users)
        bn: nn.BatchNorm2d | None = None
        if len(users) == 1 and users[0].op == "call_module":
            follower = gm.get_submodule(str(users[0].target))
            if isinstance(follower, nn.BatchNorm2d) and follower.num_features == conv.out_channels:
                bn = follower
                renames[str(users[0].target)] = f"{path}.bn"
                _set_submodule(net, str(users[0].target), nn.Identity())
        reads_image = source in raw
        if reads_image and conv.in_channels != in_channels:
            conv = _with_in_channels(conv, in_channels)
        renames[path] = f"{path}.conv"
        _set_submodule(net, path, ConvUnit.from_layers(conv, bn, masked=masked and not reads_image))
        units += 0 if reads_image else 1
    if not convs:
        raise ConversionError(f"{type(net).__name__} has no nn.Conv2d layer to modularize")
    if units == 0:
        raise ConversionError(f"{type(net).__name__} has no convolution after the first one")

    model = ConvertedNet(net, renames)
    model.config = {"in_channels": in_channels, "input_size": input_size}
    try:
        analyse(model)
    except SlimmingError as exc:
        # Layer paths as the user's network names them, not under the wrapper's ``net.``.
        message = str(exc).replace("at layer net.", "at layer ")
        raise ConversionError(f"{type(net).__name__}: {message}") from exc
    except RuntimeError as exc:  # the shape pass ran the network on an input_size image
        raise ConversionError(
            f"{type(net).__name__} does not run on {in_channels}x{input_size}x{input_size} inputs: {exc}"
        ) from exc
    return model
