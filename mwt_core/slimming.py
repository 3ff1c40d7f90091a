"""Physically remove dropped kernels, for any architecture, from its layer graph.

The network is traced with torch.fx (ConvUnits kept as leaves) and every tensor is
assigned a *channel space*: a ConvUnit starts a new one, channel-wise ops (ReLU,
pooling, dropout) pass it on, additions tie the spaces they add (union-find), and
flatten turns it into linear-layer features. Per space, the channels kept are the
union of what its producers keep; a space fed by the image or by an unmasked unit
keeps everything. Producers lose output kernels, consumers (the next convs, the
mask generators that read the map, the first linear layer) lose the matching inputs.

A producer whose kernel must stay because an addition ties it to a kept channel
gets a 0/1 ``keep`` buffer, so the slimmed net computes exactly what the full
masked net computes with the dropped kernels forced to zero.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from mwt_core.models import MwTNet
from mwt_core.models.masking import ConvUnit, set_keep

NetT = TypeVar("NetT", bound=nn.Module)


class SlimmingError(ValueError):
    """The graph holds an op slimming does not know how to carry channels through."""


_PASS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)
_PASS_FUNCTIONS = {
    torch.relu, F.relu, torch.max_pool2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.dropout,
}
_ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ConvUnit) or super().is_leaf_module(m, qualname)


@dataclass
class ChannelGroup:
    """Channels tied together: who writes them and who reads them."""

    producers: list[ConvUnit] = field(default_factory=list)
    conv_consumers: list[ConvUnit] = field(default_factory=list)
    linear_consumers: list[tuple[nn.Linear, int]] = field(default_factory=list)  # (layer, spatial factor)
    bn_followers: list[nn.BatchNorm2d] = field(default_factory=list)
    fixed: bool = False  # fed by the image, or the net's output: never slimmed


@dataclass
class LayerGraph:
    groups: list[ChannelGroup]
    head: nn.Linear | None  # the linear layer producing the logits, if any


def _example_input(model: MwTNet) -> torch.Tensor:
    cfg = model.config
    param = next(model.parameters())
    return torch.zeros(2, cfg["in_channels"], cfg["input_size"], cfg["input_size"], device=param.device)


def analyse(model: MwTNet) -> LayerGraph:
    """Trace ``model`` and group its channels into spaces tied by additions."""
    gm = fx.GraphModule(model, _Tracer().trace(model))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(_example_input(model))
    model.train(was_training)

    parent: dict[int, int] = {}

    def find(s: int) -> int:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    def new_space() -> int:
        sid = len(parent)
        parent[sid] = sid
        return sid

    space: dict[fx.Node, tuple[int, int | None]] = {}  # node -> (space, flatten factor or None)
    events: list[tuple[str, int, object]] = []
    seen_units: set[int] = set()
    head: nn.Linear | None = None
    linear_of: dict[fx.Node, nn.Linear] = {}

    def src(node: fx.Node) -> tuple[int, int | None] | None:
        arg = node.args[0] if node.args else None
        return space.get(arg) if isinstance(arg, fx.Node) else None

    def shape(node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    for node in gm.graph.nodes:
        tracked_inputs = [a for a in node.all_input_nodes if a in space]
        if node.op == "placeholder":
            sid = new_space()
            space[node] = (sid, None)
            events.append(("fixed", sid, None))
        elif node.op == "output":
            for a in tracked_inputs:
                if space[a][1] is None or a not in linear_of:
                    events.append(("fixed", space[a][0], None))
            out = node.args[0]
            head = linear_of.get(out) if isinstance(out, fx.Node) else None
        elif node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            s = src(node)
            if isinstance(mod, ConvUnit):
                if id(mod) in seen_units:
                    raise SlimmingError(f"unit {node.target} is used twice; shared layers cannot be slimmed")
                seen_units.add(id(mod))
                if s is None or s[1] is not None:
                    raise SlimmingError(f"cannot trace the input channels of {node.target}")
                events.append(("conv_in", s[0], mod))
                sid = new_space()
                events.append(("produce", sid, mod))
                space[node] = (sid, None)
            elif isinstance(mod, nn.BatchNorm2d) and s is not None:
                events.append(("bn", s[0], mod))
                space[node] = s
            elif isinstance(mod, _PASS_MODULES):
                if s is not None:
                    space[node] = s
            elif isinstance(mod, nn.Flatten):
                if s is not None:
                    dims = shape(node.args[0])
                    if mod.start_dim != 1 or len(dims) != 4:
                        raise SlimmingError(f"unsupported flatten at {node.target}")
                    space[node] = (s[0], dims[2] * dims[3])
            elif isinstance(mod, nn.Linear):
                if s is not None:
                    if s[1] is None:
                        raise SlimmingError(f"linear layer {node.target} reads a feature map directly")
                    events.append(("linear_in", s[0], (mod, s[1])))
                linear_of[node] = mod
            elif tracked_inputs:
                raise SlimmingError(f"cannot slim through module {type(mod).__name__} at {node.target}")
        elif node.op == "call_function":
            if node.target in _ADD_FUNCTIONS and len(tracked_inputs) == 2:
                (a, fa), (b, fb) = space[tracked_inputs[0]], space[tracked_inputs[1]]
                if fa is not None or fb is not None:
                    raise SlimmingError("additions of flattened features are not supported")
                ra, rb = find(a), find(b)
                parent[ra] = rb
                space[node] = (rb, None)
            elif node.target in _PASS_FUNCTIONS and tracked_inputs:
                space[node] = space[tracked_inputs[0]]
            elif node.target is torch.flatten and tracked_inputs:
                dims = shape(node.args[0])
                space[node] = (space[tracked_inputs[0]][0], dims[2] * dims[3])
            elif tracked_inputs:
                raise SlimmingError(f"cannot slim through function {getattr(node.target, '__name__', node.target)}")
        elif node.op == "call_method":
            if node.target == "relu" and tracked_inputs:
                space[node] = space[tracked_inputs[0]]
            elif node.target in ("view", "reshape", "flatten") and tracked_inputs:
                dims_in, dims_out = shape(node.args[0]), shape(node)
                if len(dims_in) != 4 or len(dims_out) != 2:
                    raise SlimmingError(f"unsupported reshape {node.format_node()}")
                space[node] = (space[tracked_inputs[0]][0], dims_in[2] * dims_in[3])
            elif tracked_inputs and node.target != "size":
                raise SlimmingError(f"cannot slim through method {node.target}")

    groups: dict[int, ChannelGroup] = {}
    for kind, sid, obj in events:
        g = groups.setdefault(find(sid), ChannelGroup())
        if kind == "fixed":
            g.fixed = True
        elif kind == "produce":
            g.producers.append(obj)  # type: ignore[arg-type]
        elif kind == "conv_in":
            g.conv_consumers.append(obj)  # type: ignore[arg-type]
        elif kind == "linear_in":
            g.linear_consumers.append(obj)  # type: ignore[arg-type]
        elif kind == "bn":
            g.bn_followers.append(obj)  # type: ignore[arg-type]
    return LayerGraph(groups=list(groups.values()), head=head)


def _slice_param(module: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    old = getattr(module, name)
    if old is None:
        return
    new = old.detach().index_select(dim, idx.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)


def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice_param(bn, name, idx, 0)
    bn.num_features = len(idx)


def _slice_outputs(unit: ConvUnit, idx: torch.Tensor) -> None:
    _slice_param(unit.conv, "weight", idx, 0)
    unit.conv.out_channels = len(idx)
    _slice_bn(unit.bn, idx)
    if unit.gate is not None:
        _slice_param(unit.gate.fc2, "weight", idx, 0)
        _slice_param(unit.gate.fc2, "bias", idx, 0)
        unit.gate.fc2.out_features = len(idx)
    if unit.keep is not None:
        unit.keep = unit.keep.index_select(0, idx.to(unit.keep.device))


def _slice_inputs(unit: ConvUnit, idx: torch.Tensor) -> None:
    _slice_param(unit.conv, "weight", idx, 1)
    unit.conv.in_channels = len(idx)
    if unit.gate is not None:
        _slice_param(unit.gate.fc1, "weight", idx, 1)
        unit.gate.fc1.in_features = len(idx)


def _slice_linear_inputs(linear: nn.Linear, idx: torch.Tensor, factor: int) -> None:
    # Flatten of C x H x W puts channel c's features at c*H*W ... c*H*W + H*W - 1.
    cols = (idx[:, None] * factor + torch.arange(factor)[None, :]).flatten()
    _slice_param(linear, "weight", cols, 1)
    linear.in_features = len(cols)


def slim(
    model: MwTNet,
    keep: list[torch.Tensor],
    keep_mask_generators: bool = True,
    classes: list[int] | None = None,
) -> MwTNet:
    """A physically smaller copy of ``model`` that keeps the kernels in ``keep``.

    ``keep`` holds one bool vector per masked unit (``model.mask_units()`` order).
    With ``keep_mask_generators`` the copy computes exactly the full masked model
    with the other kernels forced to zero; without, the generators are dropped (the
    paper's modules) and kept kernels always pass. ``classes`` also cuts the logits
    layer down to those outputs, in that order.
    """
    units = model.mask_units()
    if len(keep) != len(units):
        raise ValueError(f"keep has {len(keep)} layers, the model has {len(units)} masked units")
    for i, (k, u) in enumerate(zip(keep, units, strict=True)):
        if k.dtype != torch.bool or k.shape != (u.out_channels,):
            raise ValueError(f"keep[{i}] must be a bool vector of length {u.out_channels}")
    slimmed = copy.deepcopy(model)
    new_units = slimmed.mask_units()
    own_keep = {id(u): k.cpu() for u, k in zip(new_units, keep, strict=True)}
    set_keep(new_units, None)
    graph = analyse(slimmed)

    for group in graph.groups:
        if not group.producers:
            continue
        size = group.producers[0].out_channels
        if group.fixed or any(id(p) not in own_keep for p in group.producers):
            kept = torch.ones(size, dtype=torch.bool)
        else:
            kept = torch.stack([own_keep[id(p)] for p in group.producers]).any(0)
            if not kept.any():
                kept[0] = True  # an empty space would leave a conv without kernels
        idx = kept.nonzero().flatten()
        for p in group.producers:
            _slice_outputs(p, idx)
            if id(p) in own_keep:
                forced = own_keep[id(p)][idx]
                if not bool(forced.all()):
                    p.keep = forced.float().to(p.conv.weight.device)
        for bn in group.bn_followers:
            _slice_bn(bn, idx)
        for c in group.conv_consumers:
            _slice_inputs(c, idx)
        for linear, factor in group.linear_consumers:
            _slice_linear_inputs(linear, idx, factor)

    if not keep_mask_generators:
        for u in new_units:
            u.gate = None
    if classes is not None:
        if graph.head is None:
            raise SlimmingError("the model's logits do not come from a linear layer; cannot cut classes")
        idx = torch.tensor(classes, dtype=torch.long)
        _slice_param(graph.head, "weight", idx, 0)
        _slice_param(graph.head, "bias", idx, 0)
        graph.head.out_features = len(idx)
    slimmed.config = {**model.config, "slimmed": True}
    return channels_last(slimmed)


def channels_last(net: NetT) -> NetT:
    """``net`` with every convolution in channels_last (NHWC) layout, in place.

    Slimmed layers have channel counts such as 11 or 37; in NCHW, oneDNN's convolutions
    for those are slower than for the full model's multiples of 8 (a module with fewer
    FLOPs can take longer than its model), in NHWC their time follows their FLOPs. A
    conv whose weight's layout is ambiguous (one input channel: NCHW and NHWC strides
    describe the same memory) would let an NCHW image decide the layout and keep the
    whole network in NCHW, so such weights get explicit NHWC strides, which makes every
    conv output NHWC whatever the input. Values are unchanged: only strides differ.
    """
    net.to(memory_format=torch.channels_last)
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m.weight.dim() == 4:
            w = m.weight
            out_c, in_c, kh, kw = w.shape
            nhwc = (in_c * kh * kw, 1, kw * in_c, in_c)
            if w.stride() != nhwc:
                m.weight.data = w.detach().contiguous(memory_format=torch.channels_last).as_strided(
                    w.shape, nhwc)
    return net
