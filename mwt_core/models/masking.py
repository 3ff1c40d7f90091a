"""Mask generators (DESIGN §1.1) and the conv unit that applies them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def hidden_size(c_out: int) -> int:
    """Width of a mask generator's hidden layer for a conv with ``c_out`` kernels."""
    return c_out if c_out < 128 else c_out // 2


class MaskGenerator(nn.Module):
    """Per-sample relevance of each output kernel, in ``[0, 1)``.

    GAP(x) -> Linear(C_in, h, no bias) -> ReLU -> Linear(h, C_out) -> relu(tanh(.)).
    The output bias starts at 1.0 so every kernel starts switched on.
    """

    def __init__(self, c_in: int, c_out: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden if hidden is not None else hidden_size(c_out)
        self.fc1 = nn.Linear(c_in, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, c_out)
        nn.init.kaiming_normal_(self.fc1.weight)
        nn.init.kaiming_normal_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and x.is_contiguous(memory_format=torch.channels_last):
            # Training: the same mean, taken over the NHWC view, so its gradient comes back in
            # channels_last like the conv's. With x.mean(dim=(2, 3)) the gradient is NCHW, the
            # input's accumulated gradient becomes NCHW, and every backward op of that
            # activation mixes layouts (ReLU backward 14 ms instead of 2 at 128x16x32x32).
            # Inference keeps x.mean: the faster forward there (bench/speed.py).
            pooled = x.permute(0, 2, 3, 1).mean(dim=(1, 2))
        else:
            pooled = x.mean(dim=(2, 3))
        return torch.relu(torch.tanh(self.fc2(torch.relu(self.fc1(pooled)))))


class ConvUnit(nn.Module):
    """Conv -> BN (or identity), optionally gated per sample by a :class:`MaskGenerator`.

    The activation is left to the block, so that residual blocks can add before it.
    ``keep`` (a 0/1 buffer, or ``None``) forces kernels to zero; slimming uses it for
    kernels whose channel must stay because a residual addition ties it to a kept one.
    After a forward pass of a masked unit, ``last_mask`` holds the ``B x C_out`` mask.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int = 3,
        stride: int = 1,
        masked: bool = True,
        mask_hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.bn: nn.Module = nn.BatchNorm2d(c_out)
        self.gate: MaskGenerator | None = (
            MaskGenerator(c_in, c_out, mask_hidden) if masked else None
        )
        self.keep: torch.Tensor | None
        self.register_buffer("keep", None)
        self.last_mask: torch.Tensor | None = None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    @classmethod
    def from_layers(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, masked: bool, mask_hidden: int | None = None,
    ) -> ConvUnit:
        """A unit around an existing conv (any stride, padding, dilation, groups, bias) and its BN.

        The layers are taken as they are (weights included), so a converted network keeps
        its initialisation or the user's trained weights; a conv without BN gets an identity.
        """
        unit = cls.__new__(cls)
        nn.Module.__init__(unit)
        unit.conv = conv
        unit.bn = bn if bn is not None else nn.Identity()
        unit.gate = MaskGenerator(conv.in_channels, conv.out_channels, mask_hidden) if masked else None
        unit.register_buffer("keep", None)
        unit.last_mask = None
        return unit

    @property
    def masked(self) -> bool:
        """Whether this unit was trained with a mask generator (its kernels are modular)."""
        return self.gate is not None or self.keep is not None

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        # An eval-mode BN with running statistics, on the CPU: the two folds below apply.
        fold_bn = bn if isinstance(bn, nn.BatchNorm2d) and not bn.training \
            and bn.running_mean is not None and bn.running_var is not None \
            and x.device.type == "cpu" else None
        if self.gate is not None and fold_bn is not None:
            # CPU inference: BN's affine map and the mask folded into one per-sample scale
            # and shift, so the activation is read and written once instead of twice
            # (y * m = conv * (s * m) + t * m with BN's scale s and shift t). Not on a GPU:
            # there these networks' inference is bound by kernel launches
            # (bench/results/speed.md), and the fold takes seven small kernels where BN and the multiply
            # take two; it was measured on the CPU only.
            scale, shift = self._affine(fold_bn) if plain_inference(x) else _bn_affine(fold_bn)
            mask = self._mask(x)
            y = self.conv(x)
            # In place where nobody else holds the conv's output: a fresh activation-sized
            # buffer costs its page faults, which here take about as long as the pass itself.
            return torch.addcmul((shift * mask)[:, :, None, None], y, (scale * mask)[:, :, None, None],
                                 **({"out": y} if inplace_ok(x, self.conv) else {}))
        if self.gate is None and fold_bn is not None and not torch.is_grad_enabled() \
                and not torch.jit.is_tracing() and not _hooked(self.conv, bn):
            # CPU inference of an ungated unit (a static module's, the first layer's, a
            # shortcut's, a standard model's): BN and the keep vector folded into the conv's
            # weights and bias, so no pass over the activation follows the conv. The folded
            # weights are kept until a tensor they come from changes (see _folded). Not in a
            # trace: it would depend on the grad mode, which torch.jit.trace's check varies.
            weight, bias = self._folded(fold_bn)
            return self.conv._conv_forward(x, weight, bias)
        y = bn(self.conv(x))
        inplace = inplace_ok(x, self.conv, bn)
        if self.gate is None:
            if self.keep is not None:
                y = y.mul_(self.keep.view(1, -1, 1, 1)) if inplace else y * self.keep.view(1, -1, 1, 1)
            return y
        mask = self._mask(x)[:, :, None, None]
        return y.mul_(mask) if inplace else y * mask

    def output_sources(self) -> tuple[nn.Module, ...]:
        """This unit and the layers whose output can be the very tensor it returns (the conv's
        where BN is an identity, BN's): a hook on any of them may hold that tensor, so a block
        may change it in place only where none has one (:func:`inplace_ok`)."""
        return self, self.conv, self.bn

    def _folded(self, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv's weight and bias with ``bn`` (eval) and ``keep`` folded in, cached."""

        def fold() -> tuple[torch.Tensor, torch.Tensor]:
            scale, shift = _bn_affine(bn)
            if self.conv.bias is not None:
                shift = shift + self.conv.bias * scale
            if self.keep is not None:
                scale, shift = scale * self.keep, shift * self.keep
            return self.conv.weight * scale.view(-1, *([1] * (self.conv.weight.dim() - 1))), shift

        return self._cached("_fold_cache", (self.conv.weight, self.conv.bias, bn.weight, bn.bias,
                                            bn.running_mean, bn.running_var, self.keep), fold)

    def _affine(self, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`_bn_affine` of ``bn``, cached: five small ops a unit and call, which at batch 1
        took 12-15% of a SimCNN x0.25's CPU latency."""
        return self._cached("_affine_cache", (bn.weight, bn.bias, bn.running_mean, bn.running_var),
                            lambda: _bn_affine(bn))

    def _cached(self, name: str, sources: tuple[torch.Tensor | None, ...],
                compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``compute()``, kept under ``name`` until one of ``sources`` changes.

        Only for inference (no autograd graph in what is kept). The cache is keyed by the source
        tensors themselves, their in-place version counters, storage and dtype, so optimiser
        steps, ``load_state_dict``, ``.to()`` and a replaced parameter all recompute.
        """
        # A compiled graph records the computation from the parameters instead: a cached
        # tensor would enter it as a constant.
        if torch.compiler.is_compiling():
            return compute()
        versions = tuple(None if t is None else (t._version, t.data_ptr(), t.dtype) for t in sources)
        cached = self.__dict__.get(name)
        if cached is not None and cached[1] == versions \
                and all(a is b for a, b in zip(cached[0], sources, strict=True)):
            return cached[2]
        value = compute()
        # A plain attribute, not a buffer: derived, never saved with the module.
        self.__dict__[name] = (sources, versions, value)
        return value

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate is not None
        mask = self.gate(x)
        if self.keep is not None:
            mask = mask * self.keep
        self.last_mask = mask
        return mask


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode ``bn`` as a per-channel scale and shift: ``bn(y) == y * scale + shift``."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _hooked(*modules: nn.Module) -> bool:
    """Whether a hook watches any of ``modules`` (not their submodules: this runs several times
    a forward pass) or all modules: the folded path skips their own forward, and the in-place
    one overwrites what they returned."""
    glob = nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def plain_inference(x: torch.Tensor) -> bool:
    """Whether a forward pass on ``x`` is plain eager inference, where a layer may take a faster
    path with the same values: no autograd graph to keep intact (or whose backward would
    differ), no torch.fx or TorchScript trace whose graph would then depend on the grad mode,
    not compiling."""
    return (not torch.is_grad_enabled() and type(x) is torch.Tensor and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def inplace_ok(x: torch.Tensor, *producers: nn.Module) -> bool:
    """Whether a forward pass on ``x`` may overwrite the fresh outputs of ``producers`` in place:
    in :func:`plain_inference`, and with no hook on a producer, since a hook may have kept the
    output it saw (the feature taps of ``mwt_core.combine`` do)."""
    return plain_inference(x) and not _hooked(*producers)


def set_keep(units: list[ConvUnit], keep: list[torch.Tensor] | None) -> None:
    """Force the kernels outside ``keep`` (one bool vector per unit) to zero, or clear it."""
    for i, unit in enumerate(units):
        if keep is None:
            unit.keep = None
        else:
            unit.keep = keep[i].to(unit.conv.weight.device, unit.conv.weight.dtype)
