"""Physically remove dropped kernels, for any architecture, from its layer graph.

The network is traced with torch.fx (ConvUnits and stochastic depth kept as leaves) and
every feature map is described as a concatenation of *channel spaces*: a conv starts a
new one, channel-wise ops pass it on, ``torch.cat`` on channels concatenates them,
additions tie the spaces they add (union-find), a depthwise conv's output stays in its
input's space (each of its kernels reads one channel), and flatten turns a map into
linear-layer features. Per space, the channels kept are the union of what its producers
keep; a space fed by the image, by an unmasked or plain conv, or read by an op that
turns a zero into something else (a standalone BN, sigmoid) keeps everything. A
squeeze-and-excitation gate (plain convs on pooled features, multiplied into a map)
follows the channels of the map it scales. Producers lose output kernels, consumers (the
next convs, the mask generators that read the map, BNs, the first linear layer) lose the
matching inputs. An op outside these rules raises :class:`SlimmingError` naming the op and
the layer, which is also how a converted network is checked before training.

A producer whose kernel must stay because an addition ties it to a kept channel
gets a 0/1 ``keep`` buffer, so the slimmed net computes exactly what the full
masked net computes with the dropped kernels forced to zero.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.ops import StochasticDepth

from mwt_core.models.base import MwTNet
from mwt_core.models.masking import ConvUnit, set_keep
from mwt_core.tracing import ThreadSafeTracer

NetT = TypeVar("NetT", bound=nn.Module)


class SlimmingError(ValueError):
    """The graph holds an op slimming does not know how to carry channels through."""


# Channel-wise ops that map a zero channel to a zero channel: a dropped kernel stays
# dropped through them.
_ZERO_KEEPING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Tanh, nn.LeakyReLU, nn.MaxPool2d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
    nn.Identity, StochasticDepth,
)
_ZERO_KEEPING_FUNCTIONS: set[Callable[..., Any]] = {
    torch.relu, F.relu, F.relu6, F.silu, F.gelu, F.hardswish, torch.tanh, torch.max_pool2d,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout,
}
_ZERO_KEEPING_METHODS = {"relu", "relu_", "tanh"}
# Channel-wise, but a zero channel comes out non-zero: the channels they read must all stay.
_CHANNELWISE_MODULES = (nn.BatchNorm2d, nn.Sigmoid, nn.Hardsigmoid)
_CHANNELWISE_FUNCTIONS: set[Callable[..., Any]] = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_ADD_FUNCTIONS: set[Callable[..., Any]] = {operator.add, torch.add, operator.iadd}
_MUL_FUNCTIONS: set[Callable[..., Any]] = {operator.mul, torch.mul, operator.imul}
# Leaves of every trace: units are what slimming cuts; stochastic depth's function draws
# random numbers from the input's shape, which a symbolic trace cannot do.
LEAF_TYPES: tuple[type[nn.Module], ...] = (ConvUnit, StochasticDepth)


class GraphTracer(ThreadSafeTracer):
    """torch.fx tracer that keeps :data:`LEAF_TYPES` (and torch.nn layers) as leaves; safe
    beside other threads' inference (:class:`~mwt_core.tracing.ThreadSafeTracer`)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAF_TYPES) or super().is_leaf_module(m, qualname)


Segments = tuple[tuple[int, int], ...]  # (channel space, channels) in channel order


@dataclass(frozen=True)
class Feat:
    """What a traced tensor holds: channel spaces, and features per channel once flattened."""

    segs: Segments
    factor: int | None = None  # None: a feature map


@dataclass
class ChannelGroup:
    """Channels tied together: who writes them, and whether they may be cut."""

    root: int
    size: int
    producers: list[ConvUnit] = field(default_factory=list)
    plain_producers: list[nn.Conv2d] = field(default_factory=list)
    fixed: bool = False  # fed by the image, read by a non-zero-keeping op, or the output
    follows: int | None = None  # root of the space whose kept channels this gate space takes


@dataclass
class Consumer:
    """A layer reading channels: a conv or unit, a BN, or a linear layer (flattened)."""

    layer: nn.Module
    segs: Segments  # roots after analysis
    factor: int


@dataclass
class LayerGraph:
    groups: list[ChannelGroup]
    consumers: list[Consumer]
    head: nn.Linear | None  # the linear layer producing the logits, if any

    def group(self, root: int) -> ChannelGroup:
        return next(g for g in self.groups if g.root == root)


def _example_input(model: nn.Module) -> torch.Tensor:
    cfg: dict[str, Any] = getattr(model, "config")  # noqa: B009  (set on MwTNets, not nn.Module)
    param = next(model.parameters())
    return torch.zeros(2, cfg["in_channels"], cfg["input_size"], cfg["input_size"], device=param.device)


def _where(node: fx.Node) -> str:
    """The layer a node belongs to, for messages: its module path, else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return f"{next(reversed(stack))} ({node.name})" if stack else node.name


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


class _Walk:
    """One pass over the traced graph, recording spaces, ties and consumers."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: set[int] = set()
        self.plain: set[int] = set()  # spaces created by plain convs (gate candidates)
        self.follow: list[tuple[int, int]] = []
        self.producers: list[tuple[int, ConvUnit]] = []
        self.plain_producers: list[tuple[int, nn.Conv2d]] = []
        self.consumers: list[tuple[nn.Module, Segments, int]] = []
        self.feat: dict[fx.Node, Feat] = {}
        self.linear_of: dict[fx.Node, nn.Linear] = {}
        self.head: nn.Linear | None = None
        self.seen: set[int] = set()

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def new_space(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def fail(self, node: fx.Node, why: str) -> SlimmingError:
        return SlimmingError(f"cannot slim through {_op_name(node, self.gm)} at layer {_where(node)}: {why}")

    def map_of(self, node: fx.Node, arg: object) -> Feat:
        if not isinstance(arg, fx.Node) or arg not in self.feat:
            raise self.fail(node, "its input is not a traced feature map")
        f = self.feat[arg]
        if f.factor is not None:
            raise self.fail(node, "it reads flattened features, not a feature map")
        return f

    def fix(self, segs: Segments) -> None:
        self.fixed.update(s for s, _ in segs)

    @staticmethod
    def shape(node: object) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    def flatten(self, node: fx.Node, src: object) -> Feat:
        f = self.map_of(node, src)
        dims_in, dims_out = self.shape(src), self.shape(node)
        if len(dims_in) != 4 or len(dims_out) != 2:
            raise self.fail(node, "only flattening N x C x H x W to N x (C*H*W) is supported")
        return Feat(f.segs, dims_in[2] * dims_in[3])

    def conv(self, node: fx.Node, layer: nn.Module, conv: nn.Conv2d) -> Feat:
        if id(layer) in self.seen:
            raise self.fail(node, "the layer is used twice; shared layers cannot be slimmed")
        self.seen.add(id(layer))
        f = self.map_of(node, node.args[0] if node.args else None)
        plain = not isinstance(layer, ConvUnit)
        if _is_depthwise(conv) and len(f.segs) == 1:
            sid = f.segs[0][0]  # each kernel reads its own channel: same space
        else:
            sid = self.new_space(conv.out_channels)
            if conv.groups > 1:  # a grouped conv's channels cannot be cut group-unevenly
                self.fix(f.segs)
                self.fixed.add(sid)
        self.consumers.append((layer, f.segs, 1))
        if plain:
            self.plain_producers.append((sid, conv))
            if sid != f.segs[0][0]:
                self.plain.add(sid)
        else:
            self.producers.append((sid, layer))  # type: ignore[arg-type]
        return Feat(((sid, conv.out_channels),))

    def tie(self, node: fx.Node, a: Feat, b: Feat) -> Feat:
        if a.factor is not None or b.factor is not None:
            raise self.fail(node, "additions of flattened features are not supported")
        if [n for _, n in a.segs] != [n for _, n in b.segs]:
            raise self.fail(node, "the added maps concatenate their channels differently")
        for (sa, _), (sb, _) in zip(a.segs, b.segs, strict=True):
            self.parent[self.find(sa)] = self.find(sb)
        return b

    def gate(self, node: fx.Node, a: Feat, b: Feat) -> Feat:
        def is_gate(f: Feat) -> bool:
            return f.factor is None and len(f.segs) == 1 and f.segs[0][0] in self.plain

        if is_gate(a) == is_gate(b):
            raise self.fail(node, "only a squeeze-and-excitation gate (plain convs on pooled "
                                  "features) may multiply a feature map")
        g, main = (a, b) if is_gate(a) else (b, a)
        if main.factor is not None or len(main.segs) != 1:
            raise self.fail(node, "the gated map must be one channel space")
        self.follow.append((g.segs[0][0], main.segs[0][0]))
        return main

    def module(self, node: fx.Node, mod: nn.Module, tracked: list[fx.Node]) -> Feat | None:
        arg = node.args[0] if node.args else None
        if isinstance(mod, ConvUnit):
            return self.conv(node, mod, mod.conv)
        if isinstance(mod, nn.Conv2d):
            return self.conv(node, mod, mod)
        if isinstance(mod, nn.Linear):
            self.linear_of[node] = mod
        if not tracked:
            return None
        if isinstance(mod, _ZERO_KEEPING_MODULES):
            return self.feat[tracked[0]]
        if isinstance(mod, _CHANNELWISE_MODULES):
            f = self.map_of(node, arg)
            self.fix(f.segs)
            if isinstance(mod, nn.BatchNorm2d):
                self.consumers.append((mod, f.segs, 1))
            return f
        if isinstance(mod, nn.Flatten):
            if mod.start_dim != 1:
                raise self.fail(node, "only flatten from dimension 1 is supported")
            return self.flatten(node, arg)
        if isinstance(mod, nn.Linear):
            f = self.feat[tracked[0]]
            if f.factor is None:
                raise self.fail(node, "a linear layer reads a feature map directly")
            self.consumers.append((mod, f.segs, f.factor))
            return None
        raise self.fail(node, "this layer type is not supported")

    def function(self, node: fx.Node, tracked: list[fx.Node]) -> Feat | None:
        fn = node.target
        arg = node.args[0] if node.args else None
        if fn in _ADD_FUNCTIONS or fn in _MUL_FUNCTIONS:
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(tracked) == 2 and len(operands) == 2:
                a, b = self.feat[operands[0]], self.feat[operands[1]]
                return self.tie(node, a, b) if fn in _ADD_FUNCTIONS else self.gate(node, a, b)
            if len(tracked) == 1 and len(operands) == 1 and len(node.args) == 2:
                f = self.feat[tracked[0]]
                if fn in _ADD_FUNCTIONS:
                    self.fix(f.segs)  # x + c turns zeros into c
                return f  # x * c keeps zeros
            raise self.fail(node, "only sums/products of two traced maps or with a number")
        if fn is torch.cat:
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(parts, (list, tuple)) or dim not in (1, -3):
                raise self.fail(node, "only concatenation of feature maps on channels is supported")
            segs: Segments = ()
            for p in parts:
                segs += self.map_of(node, p).segs
            return Feat(segs)
        if fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start != 1:
                raise self.fail(node, "only flatten from dimension 1 is supported")
            return self.flatten(node, arg)
        if fn is getattr:
            return None  # x.shape and friends: sizes, not channels
        if any(a is not arg for a in tracked):
            raise self.fail(node, "a traced map is passed in more than its first argument")
        if fn in _ZERO_KEEPING_FUNCTIONS:
            return self.feat[tracked[0]]
        if fn in _CHANNELWISE_FUNCTIONS:
            f = self.map_of(node, arg)
            self.fix(f.segs)
            return f
        raise self.fail(node, "this function is not supported")

    def method(self, node: fx.Node, tracked: list[fx.Node]) -> Feat | None:
        name = node.target
        if name == "size":
            return None
        if name in _ZERO_KEEPING_METHODS and len(tracked) == 1:
            return self.feat[tracked[0]]
        if name == "sigmoid" and len(tracked) == 1:
            f = self.map_of(node, node.args[0])
            self.fix(f.segs)
            return f
        if name in ("view", "reshape", "flatten") and len(tracked) == 1:
            return self.flatten(node, node.args[0])
        raise self.fail(node, "this tensor method is not supported")

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            tracked = [a for a in node.all_input_nodes if a in self.feat]
            out: Feat | None = None
            if node.op == "placeholder":
                channels = self.shape(node)[1]
                sid = self.new_space(channels)
                self.fixed.add(sid)
                out = Feat(((sid, channels),))
            elif node.op == "output":
                for a in tracked:
                    self.fix(self.feat[a].segs)
                out_arg = node.args[0]
                self.head = self.linear_of.get(out_arg) if isinstance(out_arg, fx.Node) else None
            elif node.op == "call_module":
                out = self.module(node, self.gm.get_submodule(str(node.target)), tracked)
            elif node.op == "call_function" and tracked:
                out = self.function(node, tracked)
            elif node.op == "call_method" and tracked:
                out = self.method(node, tracked)
            if out is not None:
                self.feat[node] = out


def analyse(model: nn.Module) -> LayerGraph:
    """Trace ``model`` and group its channels into spaces tied by additions."""
    gm = fx.GraphModule(model, GraphTracer().trace(model))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(_example_input(model))
    model.train(was_training)
    walk = _Walk(gm)
    walk.run()

    groups: dict[int, ChannelGroup] = {}
    for sid in range(len(walk.parent)):
        root = walk.find(sid)
        g = groups.setdefault(root, ChannelGroup(root=root, size=walk.size[sid]))
        if walk.size[sid] != g.size:
            raise SlimmingError(f"an addition ties {walk.size[sid]} channels to {g.size}")
        g.fixed = g.fixed or sid in walk.fixed
    for sid, unit in walk.producers:
        groups[walk.find(sid)].producers.append(unit)
    for sid, conv in walk.plain_producers:
        groups[walk.find(sid)].plain_producers.append(conv)
    for gate_sid, main_sid in walk.follow:
        gate, main = walk.find(gate_sid), walk.find(main_sid)
        if groups[gate].producers or groups[gate].follows not in (None, main):
            raise SlimmingError("a squeeze-and-excitation gate is tied to other channels")
        groups[gate].follows = main
    consumers = [Consumer(layer, tuple((walk.find(s), n) for s, n in segs), factor)
                 for layer, segs, factor in walk.consumers]
    return LayerGraph(groups=list(groups.values()), consumers=consumers, head=walk.head)


def _slice_param(module: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    old = getattr(module, name)
    if old is None:
        return
    new = old.detach().index_select(dim, idx.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)


def _slice_bn(bn: nn.Module, idx: torch.Tensor) -> None:
    if not isinstance(bn, nn.BatchNorm2d):
        return  # a unit without BN holds an identity
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice_param(bn, name, idx, 0)
    bn.num_features = len(idx)


def _slice_conv_outputs(conv: nn.Conv2d, idx: torch.Tensor) -> None:
    _slice_param(conv, "weight", idx, 0)
    _slice_param(conv, "bias", idx, 0)
    conv.out_channels = len(idx)


def _slice_conv_inputs(conv: nn.Conv2d, idx: torch.Tensor) -> None:
    if conv.groups == 1:
        _slice_param(conv, "weight", idx, 1)
    elif conv.groups == conv.in_channels and conv.weight.shape[1] == 1:
        conv.groups = len(idx)  # depthwise: its outputs were cut to the same channels
    elif len(idx) != conv.in_channels:
        raise SlimmingError("a grouped convolution's input channels cannot be cut")
    conv.in_channels = len(idx)


def _slice_outputs(unit: ConvUnit, idx: torch.Tensor) -> None:
    _slice_conv_outputs(unit.conv, idx)
    _slice_bn(unit.bn, idx)
    if unit.gate is not None:
        _slice_param(unit.gate.fc2, "weight", idx, 0)
        _slice_param(unit.gate.fc2, "bias", idx, 0)
        unit.gate.fc2.out_features = len(idx)
    if unit.keep is not None:
        unit.keep = unit.keep.index_select(0, idx.to(unit.keep.device))


def _slice_inputs(layer: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(layer, nn.Conv2d):
        _slice_conv_inputs(layer, idx)
    elif isinstance(layer, ConvUnit):
        _slice_conv_inputs(layer.conv, idx)
        if layer.gate is not None:
            _slice_param(layer.gate.fc1, "weight", idx, 1)
            layer.gate.fc1.in_features = len(idx)
    else:
        _slice_bn(layer, idx)


def _slice_linear_inputs(linear: nn.Linear, idx: torch.Tensor, factor: int) -> None:
    # Flatten of C x H x W puts channel c's features at c*H*W ... c*H*W + H*W - 1.
    cols = (idx[:, None] * factor + torch.arange(factor)[None, :]).flatten()
    _slice_param(linear, "weight", cols, 1)
    linear.in_features = len(cols)


def _kept_channels(graph: LayerGraph, own_keep: dict[int, torch.Tensor], multiple: int = 1
                   ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per space root, the indices of the channels that stay, and (for spaces padded to
    ``multiple``) which of those stay only as padding.

    With ``multiple`` > 1 a space cut by its masks keeps dropped channels too, the first
    ones, until its size is a multiple of ``multiple`` (or the whole space): vectorised
    kernels run fastest on such counts. Their producers zero them (``slim``), so values
    stay exact. A space that others follow (depthwise convs) is not padded: a follower's
    BN would turn the zeros into values its consumers would read.
    """
    kept: dict[int, torch.Tensor] = {}
    padding: dict[int, torch.Tensor] = {}
    followed = {g.follows for g in graph.groups if g.follows is not None}

    def resolve(group: ChannelGroup, depth: int = 0) -> torch.Tensor:
        if group.root in kept:
            return kept[group.root]
        if group.follows is not None and depth < len(graph.groups):
            idx = resolve(graph.group(group.follows), depth + 1)
        elif (group.fixed or group.plain_producers or not group.producers
              or any(id(p) not in own_keep for p in group.producers)):
            idx = torch.arange(group.size)
        else:
            keep = torch.stack([own_keep[id(p)] for p in group.producers]).any(0)
            if not keep.any():
                keep[0] = True  # an empty space would leave a conv without kernels
            short = min(-int(keep.sum()) % multiple, int((~keep).sum()))
            if short and group.root not in followed:
                real = keep.clone()
                keep[(~keep).nonzero().flatten()[:short]] = True
                padding[group.root] = ~real[keep]
            idx = keep.nonzero().flatten()
        kept[group.root] = idx
        return idx

    for g in graph.groups:
        resolve(g)
    return kept, padding


def _zero_outputs(unit: ConvUnit, channels: torch.Tensor) -> bool:
    """Make ``unit`` output exact zeros on ``channels`` through its weights (BN scale and
    shift, or the conv's kernels without BN), so no extra multiply is needed at run time;
    False where its layers cannot express that."""
    bn = unit.bn
    with torch.no_grad():
        if isinstance(bn, nn.BatchNorm2d) and bn.affine:
            bn.weight[channels] = 0.0
            bn.bias[channels] = 0.0
            return True
        if isinstance(bn, nn.Identity):
            unit.conv.weight[channels] = 0.0
            if unit.conv.bias is not None:
                unit.conv.bias[channels] = 0.0
            return True
    return False


def _segment_index(kept: dict[int, torch.Tensor], segs: Segments) -> torch.Tensor:
    parts, offset = [], 0
    for root, n in segs:
        parts.append(kept[root] + offset)
        offset += n
    return torch.cat(parts)


def slim(
    model: MwTNet,
    keep: list[torch.Tensor],
    keep_mask_generators: bool = True,
    classes: list[int] | None = None,
    channel_multiple: int = 1,
) -> MwTNet:
    """A physically smaller copy of ``model`` that keeps the kernels in ``keep``.

    ``keep`` holds one bool vector per masked unit (``model.mask_units()`` order).
    With ``keep_mask_generators`` the copy computes exactly the full masked model
    with the other kernels forced to zero; without, the generators are dropped (the
    paper's modules) and kept kernels always pass. ``classes`` also cuts the logits
    layer down to those outputs, in that order. ``channel_multiple`` rounds each cut
    space up to a multiple of it with zeroed channels (same values, GPU-friendly shapes).
    """
    if channel_multiple < 1:
        raise ValueError(f"channel_multiple must be at least 1, got {channel_multiple}")
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
    kept, padding = _kept_channels(graph, own_keep, channel_multiple)

    for group in graph.groups:
        idx = kept[group.root]
        pad = padding.get(group.root)
        for p in group.producers:
            _slice_outputs(p, idx)
            if id(p) in own_keep:
                forced = own_keep[id(p)][idx]
                if pad is not None and _zero_outputs(p, pad):
                    forced = forced | pad  # zero by weights: no run-time mask for padding
                if not bool(forced.all()):
                    p.keep = forced.float().to(p.conv.weight.device)
        for conv in group.plain_producers:
            _slice_conv_outputs(conv, idx)
    for c in graph.consumers:
        idx = _segment_index(kept, c.segs)
        if isinstance(c.layer, nn.Linear):
            _slice_linear_inputs(c.layer, idx, c.factor)
        else:
            _slice_inputs(c.layer, idx)

    if not keep_mask_generators:
        for u in new_units:
            u.gate = None
    if classes is not None:
        if graph.head is None:
            raise SlimmingError("the model's logits do not come from a linear layer; cannot cut classes")
        cls_idx = torch.tensor(classes, dtype=torch.long)
        _slice_param(graph.head, "weight", cls_idx, 0)
        _slice_param(graph.head, "bias", cls_idx, 0)
        graph.head.out_features = len(cls_idx)
    slimmed.config = {**model.config, "slimmed": True}
    if channel_multiple > 1:  # a rebuild from the config must pad the same way
        slimmed.config["channel_multiple"] = channel_multiple
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
