"""How a composition turns its modules' outputs into one answer (DESIGN §2, open set).

Modules of models that learned *different* classes cannot simply be put side by side: each
model answers confidently for images of classes it never saw, so its raw logits (and any
per-source scale and bias) win where they should not. The methods here:

- ``raw``: the modules' logits side by side.
- ``scale_bias``: one scale and one bias per source, fitted on labelled images.
- ``log_softmax``: each source's log-probabilities (needs no labels).
- ``energy``: log-probabilities plus each source's log-sum-exp of logits, standardised by its
  mean and spread on the source's own training images (needs no labels).
- ``gauss``: log-probabilities minus each source's Mahalanobis distance of the penultimate
  features to its nearest class (class means and a shared, shrunk covariance fitted on the
  source's own training images), standardised the same way (needs no labels).
- ``gauss_map``: ``gauss`` on a mid-depth convolution map instead of the penultimate features:
  the output of the middle conv unit, averaged over a 2x2 grid (so where the strokes are is
  kept), with its covariance shrunk towards each feature's own variance (needs no labels).
  Why: a source's late features are specialised to its own classes and say little about other
  images, while mid-depth maps still describe any digit, so distances there tell a source's
  classes from the rest far better.
- ``head``: the raw logits plus a linear correction on every module's penultimate features
  (standardised by the source's own training images) and logits, fitted on a few labelled
  images per class; it starts at zero (exactly ``raw``) and weight decay keeps it near there.
- ``gauss_head``: ``gauss``, plus a linear correction fitted on a few labelled images per class
  whose inputs are the per-source log-probabilities and standardised distances (``gauss``'s
  scores, not the features); it starts at zero (exactly ``gauss``).

Every method's forward is tensor operations only (TorchScript- and ONNX-traceable); what
they fit lives in buffers and parameters, so a composition saves as safetensors and
``mwt_core.artifacts`` rebuilds it from its ``combine`` name alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mwt_core.compose_options import (
    DEFAULT_COMBINE,
    DEFAULT_PER_CLASS,
    LABELLED_METHODS,
    METHODS,
    ZERO_LABEL_METHODS,
    CompositionError,
    check_method,
)
from mwt_core.models.masking import ConvUnit

__all__ = ["DEFAULT_COMBINE", "DEFAULT_PER_CLASS", "LABELLED_METHODS", "METHODS",
           "ZERO_LABEL_METHODS", "ComposedClassifier", "CompositionError", "fit"]

FEATURE_METHODS: tuple[str, ...] = ("gauss", "gauss_map", "head", "gauss_head")
# class means + precision per source
GAUSS_METHODS: tuple[str, ...] = ("gauss", "gauss_map", "gauss_head")
MAP_METHODS: tuple[str, ...] = ("gauss_map",)  # features from a mid-depth conv map
MAP_GRID = 2  # the map is averaged over MAP_GRID x MAP_GRID cells
HEAD_METHODS: tuple[str, ...] = ("head", "gauss_head")  # a linear correction fitted on labels
# fitted on each source's own images
ZERO_LABEL_FITTED: tuple[str, ...] = ("energy", "gauss", "gauss_map", "gauss_head")
CombineError = CompositionError  # one error for everything a composition can refuse


@dataclass(frozen=True)
class CombineSettings:
    """Fixed settings of the methods, chosen on a held-out part of digits' training split."""

    energy_temperature: float = 0.5  # weight of the standardised energy next to log-probabilities
    gauss_temperature: float = 1.0  # weight of the standardised distance
    shrinkage: float = 0.01  # covariance + shrinkage * mean variance * I (few images, many dims)
    # gauss_map: covariance + map_shrinkage * (mean within-class variance of the standardised
    # features) * each feature's variance, i.e. shrunk towards the diagonal.
    map_shrinkage: float = 0.1
    # A source's own training images per class for the zero-label statistics (energy, gauss,
    # gauss_map). Forwarding them is most of a compose call, and twice as many scored within
    # a few held-out images of this (docs/defaults.md, "Composition"; bench/results/compose.md).
    own_per_class: int = 100
    # Where ``head`` takes its feature standardisation from: "labelled" (the calibration images
    # it is fitted on, already forwarded: no extra pass) or "own" (each source's own images).
    head_standardise: str = "labelled"
    head_weight_decay: float = 1e-3
    head_steps: int = 300
    head_lr: float = 0.01


SETTINGS = CombineSettings()


class _Tap:
    """Forward hook keeping the input of a part's last linear layer (its penultimate features)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
                 ) -> None:
        self.value = inputs[0]


class _MapTap(_Tap):
    """Forward hook keeping a conv unit's output averaged over a ``MAP_GRID`` grid."""

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
                 ) -> None:
        self.value = F.adaptive_avg_pool2d(output, MAP_GRID)


def mid_unit(part: nn.Module) -> ConvUnit:
    """The middle conv unit of a part in forward order (``gauss_map``'s features): deep enough
    to describe strokes, early enough not to be specialised to the source's own classes."""
    units = [m for m in part.modules() if isinstance(m, ConvUnit)]
    if not units:
        raise CombineError("a part has no conv unit; gauss_map needs a convolutional module")
    return units[(len(units) - 1) // 2]


def head_linear(part: nn.Module) -> nn.Linear:
    """The last linear layer of a part (the logits layer of every mwt_core architecture)."""
    linears = [m for m in part.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CombineError("a part has no linear logits layer; it cannot give features")
    return linears[-1]


def _classes_of(part: nn.Module) -> int:
    inner = getattr(part, "net", part)
    classes = getattr(inner, "classes", None)
    return len(classes) if classes is not None else head_linear(part).out_features


class ComposedClassifier(nn.Module):
    """The modules of several sources side by side, combined by ``combine`` (see module doc).

    Takes images scaled to [0, 1] (each part normalises with its own statistics), so sources
    trained on differently normalised data compose correctly. ``scale``/``bias`` exist for every
    method (``scale_bias`` uses them) so artifacts of every method share their layout.
    """

    score_stats: torch.Tensor  # a buffer of the score methods: per source (mean, spread)

    def __init__(self, parts: Sequence[nn.Module], labels: list[str], combine: str = "scale_bias"
                 ) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.labels = list(labels)
        self.combine = check_method(combine)
        n = len(parts)
        self.scale = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        # Outputs per part; only the feature methods need them (their buffers' shapes).
        self.sizes = [_classes_of(p) for p in parts] if combine in FEATURE_METHODS else []
        if combine in ("energy", *GAUSS_METHODS):
            # Per source: the score's mean and its spread divided by the temperature.
            self.register_buffer("score_stats", torch.tensor([[0.0, 1.0]] * n))
        self._taps: list[_Tap] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        if combine in FEATURE_METHODS:
            dims = ([mid_unit(p).conv.out_channels * MAP_GRID ** 2 for p in parts]
                    if combine in MAP_METHODS else [head_linear(p).in_features for p in parts])
            for i, (k, d) in enumerate(zip(self.sizes, dims, strict=True)):
                if combine in GAUSS_METHODS:
                    # Whitening L (precision = L L') and the whitened class means: distances
                    # are then plain squared norms, without the cancellation of f'Pf - 2f'Pm.
                    self.register_buffer(f"whiten_{i}", torch.eye(d))
                    self.register_buffer(f"means_{i}", torch.zeros(k, d))
                else:
                    self.register_buffer(f"feature_mean_{i}", torch.zeros(d))
                    self.register_buffer(f"feature_std_{i}", torch.ones(d))
            for p in parts:
                if combine in MAP_METHODS:
                    tap: _Tap = _MapTap()
                    self._hooks.append(mid_unit(p).register_forward_hook(tap))
                else:
                    tap = _Tap()
                    self._hooks.append(head_linear(p).register_forward_hook(tap))
                self._taps.append(tap)
        if combine == "head":
            self.head = nn.Linear(sum(dims) + sum(self.sizes), sum(self.sizes))
        if combine == "gauss_head":  # inputs: gauss's outputs and its per-source scores
            self.head = nn.Linear(sum(self.sizes) + n, sum(self.sizes))
        if combine in HEAD_METHODS:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def release(self) -> None:
        """Remove the feature hooks from the parts (they may be shared models); the
        composition can no longer run its feature methods afterwards."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def source_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each part's logits and (for the feature methods) its penultimate features."""
        logits, feats = [], []
        for i, part in enumerate(self.parts):
            logits.append(part(x))
            if self._taps:
                value = self._taps[i].value
                assert value is not None  # set by the hook during part(x)
                feats.append(value.flatten(1))
                self._taps[i].value = None
        return logits, feats

    def distances(self, i: int, f: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances of features ``f`` to source ``i``'s class means."""
        z = f @ getattr(self, f"whiten_{i}")
        return (z[:, None, :] - getattr(self, f"means_{i}")[None]).pow(2).sum(-1)

    def source_score(self, i: int, logits: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        """The scalar per image telling how much source ``i``'s classes fit it (raw, unstandardised)."""
        if self.combine == "energy":
            return torch.logsumexp(logits, 1, keepdim=True)
        assert f is not None
        return -self.distances(i, f).min(1, keepdim=True).values

    def combined(self, logits: list[torch.Tensor], feats: list[torch.Tensor]) -> torch.Tensor:
        """The composition's output from each part's logits and features."""
        if self.combine == "raw":
            return torch.cat(logits, 1)
        if self.combine == "scale_bias":
            return torch.cat([lg * self.scale[i] + self.bias[i] for i, lg in enumerate(logits)], 1)
        if self.combine == "head":
            z = torch.cat(logits, 1)
            std = [(f - getattr(self, f"feature_mean_{i}")) / getattr(self, f"feature_std_{i}")
                   for i, f in enumerate(feats)]
            return z + self.head(torch.cat([*std, z], 1))
        outs, scores = [], []
        for i, lg in enumerate(logits):
            out = F.log_softmax(lg, 1)
            if self.combine != "log_softmax":
                score = self.source_score(i, lg, feats[i] if feats else None)
                score = (score - self.score_stats[i, 0]) / self.score_stats[i, 1]
                out = out + score
                scores.append(score)
            outs.append(out)
        z = torch.cat(outs, 1)
        if self.combine == "gauss_head":
            return z + self.head(torch.cat([z, *scores], 1))
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, feats = self.source_outputs(x)
        return self.combined(logits, feats)


@torch.no_grad()
def _outputs(composed: ComposedClassifier, x: torch.Tensor, batch_size: int = 256
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every part's logits and features on ``x``, in float64 (see :func:`_exact`)."""
    device = composed.scale.device
    logits: list[list[torch.Tensor]] = [[] for _ in composed.parts]
    feats: list[list[torch.Tensor]] = [[] for _ in composed.parts]
    for start in range(0, len(x), batch_size):
        lg, fs = composed.source_outputs(x[start:start + batch_size].to(device))
        for i, v in enumerate(lg):
            f = fs[i] if fs else None
            v, f = _exact(composed.parts[i], v, f, composed.combine not in MAP_METHODS)
            logits[i].append(v)
            if f is not None:
                feats[i].append(f)
    return [torch.cat(v) for v in logits], [torch.cat(v) for v in feats if v]


def _exact(part: nn.Module, logits: torch.Tensor, feats: torch.Tensor | None,
           penultimate: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A part's logits and features in float64 for fitting, the logits recomputed from the
    features where the part's last linear layer gives them (``penultimate``: the features
    are that layer's input, not a conv map).

    Why: a fit of a few hundred Adam steps turns float noise in its inputs into output
    differences about 1000 times larger, and the float32 logits layer is where that noise
    arises (a one-class module's logits are a matrix-vector product whose sum the BLAS splits
    by thread count). Recomputed in float64 the logits no longer depend on the thread count,
    so a client composing the same modules fits the same classifier as the registry.
    """
    if feats is None or not penultimate:
        return logits.double(), None if feats is None else feats.double()
    f = feats.double()
    lin = head_linear(part)
    z = F.linear(f, lin.weight.double(), None if lin.bias is None else lin.bias.double())
    inner = getattr(part, "net", part)  # NormalizedInput wraps a ModuleClassifier
    index = getattr(inner, "class_index", None)
    if not getattr(inner, "restricted", True) and isinstance(index, torch.Tensor):
        z = z.index_select(1, index)  # a whole model, its logits restricted to the classes
    return (z if z.shape == logits.shape else logits.double()), f


@contextmanager
def _float64(composed: ComposedClassifier) -> Iterator[None]:
    """The combination's own tensors (never the parts') in float64 while it is fitted, back in
    float32 afterwards: what is fitted is then a function of the inputs alone, not of the
    order float32 sums happened in (see :func:`_exact`)."""
    def cast(dtype: torch.dtype) -> None:
        for p in composed.parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, b in list(composed.named_buffers(recurse=False)):
            composed._buffers[name] = b.to(dtype)
        head = getattr(composed, "head", None)
        if head is not None:
            head.to(dtype)

    cast(torch.float64)
    try:
        yield
    finally:
        cast(torch.float32)


@torch.no_grad()
def fit_zero_label(composed: ComposedClassifier, own: list[tuple[torch.Tensor, torch.Tensor]],
                   settings: CombineSettings = SETTINGS) -> ComposedClassifier:
    """Fit each source's statistics on its own training images ``own[i] = ([0, 1] images,
    labels by position in the part)``: class means and precision (``gauss``), the feature
    standardisation (``head`` with ``head_standardise="own"``), and the mean and spread of the
    source's score (``energy``, ``gauss``). Methods that need none of these return at once."""
    composed.eval()
    if not needs_own(composed.combine, settings):
        return composed
    if len(own) != len(composed.parts):
        raise CombineError(f"{len(composed.parts)} parts but own images of {len(own)} sources")
    with _float64(composed):
        _fit_statistics(composed, own, settings)
    return composed


def _fit_statistics(composed: ComposedClassifier, own: list[tuple[torch.Tensor, torch.Tensor]],
                    settings: CombineSettings) -> None:
    temperature = (settings.energy_temperature if composed.combine == "energy"
                   else settings.gauss_temperature)
    for i, (part, (x, y)) in enumerate(zip(composed.parts, own, strict=True)):
        if len(y) < 2:
            raise CombineError(f"source {i} needs at least 2 of its own training images")
        logits, feats = _outputs_of_part(composed, i, part, x)
        y = y.to(logits.device)
        if composed.combine == "head":
            _standardise(composed, i, feats)
            continue
        if composed.combine in GAUSS_METHODS:
            f = feats
            k = composed.sizes[i]
            present = torch.stack([(y == c).any() for c in range(k)])
            if not bool(present.all()):
                raise CombineError(f"source {i} has no training image of its class "
                                   f"{int((~present).nonzero()[0])}")
            means = torch.stack([f[y == c].mean(0) for c in range(k)])
            resid = f - means[y]
            cov = resid.T @ resid / len(f)
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            if composed.combine in MAP_METHODS:
                # Shrunk as if each feature were standardised (conv maps mix features of very
                # different spreads): cov + s * mean(diag(cov) / var) * diag(var).
                var = _floored_spread(f.std(0)).pow(2)
                cov = cov + settings.map_shrinkage * (cov.diagonal() / var).mean() * torch.diag(var)
            else:
                cov = cov + settings.shrinkage * cov.diagonal().mean().clamp(min=1e-6) * eye
            # precision = cov^-1 = L L' with L = (C^-1)' for cov = C C' (Cholesky).
            chol = torch.linalg.cholesky(cov)
            whiten = torch.linalg.solve_triangular(chol, eye, upper=False).T
            getattr(composed, f"whiten_{i}").copy_(whiten)
            getattr(composed, f"means_{i}").copy_(means @ whiten)
        score = composed.source_score(i, logits, feats if composed.combine in GAUSS_METHODS
                                      else None).flatten()
        composed.score_stats[i, 0] = score.mean()
        composed.score_stats[i, 1] = score.std().clamp(min=1e-6) / temperature


def _standardise(composed: ComposedClassifier, i: int, feats: torch.Tensor) -> None:
    """Set source ``i``'s feature standardisation (``head``) from features ``feats``."""
    getattr(composed, f"feature_mean_{i}").copy_(feats.mean(0))
    getattr(composed, f"feature_std_{i}").copy_(_floored_spread(feats.std(0)))


def _floored_spread(spread: torch.Tensor) -> torch.Tensor:
    """Per-feature spreads with a floor: a feature (nearly) constant on the images it was
    measured on carries no information, and the floor keeps its float noise from being blown up."""
    return spread.clamp(min=0.05 * float(spread.mean()) + 1e-6)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the features a fit needs are taken."""


def _stop_forward(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    raise _StopForward


def _outputs_of_part(composed: ComposedClassifier, i: int, part: nn.Module, x: torch.Tensor,
                     batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Part ``i``'s logits and features on ``x`` in float64. ``gauss_map``'s statistics need
    only the mid-depth map, so its pass stops there (no logits: an empty ``N x 0`` tensor),
    which saves the later layers' time on every own image (the compose call's largest cost)."""
    device = composed.scale.device
    early = composed.combine in MAP_METHODS
    # Registered after the tap, so it runs after the tap has kept the map.
    handle = mid_unit(part).register_forward_hook(_stop_forward) if early else None
    logits, feats = [], []
    try:
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size].to(device)
            if early:
                with suppress(_StopForward):
                    part(batch)
                out = torch.zeros(len(batch), 0, device=device)
            else:
                out = part(batch)
            value = None
            if composed._taps:
                value = composed._taps[i].value
                assert value is not None
                value = value.flatten(1)
                composed._taps[i].value = None
            out, value = _exact(part, out, value, not early)
            logits.append(out)
            if value is not None:
                feats.append(value)
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(logits), (torch.cat(feats) if feats else torch.zeros(0))


def fit_scale_bias(composed: ComposedClassifier, x: torch.Tensor, y: torch.Tensor,
                   steps: int = 200, lr: float = 0.05) -> ComposedClassifier:
    """Fit each source's logit scale and bias on labelled ``[0, 1]`` images (modules frozen)."""
    composed.eval()
    logits, _ = _outputs(composed, x)
    target = y.to(composed.scale.device)
    with _float64(composed):
        opt = torch.optim.Adam([composed.scale, composed.bias], lr=lr)
        for _ in range(steps):
            out = torch.cat([r * composed.scale[i] + composed.bias[i]
                             for i, r in enumerate(logits)], 1)
            loss = F.cross_entropy(out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return composed


def fit_head(composed: ComposedClassifier, x: torch.Tensor, y: torch.Tensor,
             settings: CombineSettings = SETTINGS) -> ComposedClassifier:
    """Fit the linear correction of a ``head`` composition on labelled ``[0, 1]`` images.

    Full-batch Adam for a fixed number of steps (nothing is early-stopped on test data); the
    weight decay pulls towards zero, i.e. towards the raw composition it starts at.
    """
    if composed.combine not in HEAD_METHODS:
        raise CombineError(f"fit_head needs a 'head' composition, not {composed.combine!r}")
    composed.eval()
    logits, feats = _outputs(composed, x)
    target = y.to(composed.scale.device)
    with _float64(composed):
        if composed.combine == "head" and settings.head_standardise == "labelled":  # from the same pass: no extra forward
            for i, f in enumerate(feats):
                _standardise(composed, i, f)
        params = list(composed.head.parameters())
        opt = torch.optim.Adam(params, lr=settings.head_lr)
        for _ in range(settings.head_steps):
            loss = F.cross_entropy(composed.combined(logits, feats), target)
            loss = loss + settings.head_weight_decay * composed.head.weight.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return composed


def needs_own(method: str, settings: CombineSettings = SETTINGS) -> bool:
    """Whether ``method`` fits statistics on each source's own training images."""
    return method in ZERO_LABEL_FITTED or (method == "head" and settings.head_standardise == "own")


def fit(composed: ComposedClassifier, own: list[tuple[torch.Tensor, torch.Tensor]] | None,
        labelled: tuple[torch.Tensor, torch.Tensor] | None,
        settings: CombineSettings = SETTINGS) -> ComposedClassifier:
    """Fit whatever ``composed.combine`` needs: own training images per source (zero-label
    statistics) and/or labelled images of the union (``scale_bias``, ``head``)."""
    method = composed.combine
    if needs_own(method, settings):
        if own is None:
            raise CombineError(f"combine={method!r} needs each source's own training images")
        fit_zero_label(composed, own, settings)
    if method in LABELLED_METHODS:
        if labelled is None or len(labelled[1]) == 0:
            raise CombineError(f"combine={method!r} needs labelled images (calibration_per_class > 0)")
        if method == "scale_bias":
            fit_scale_bias(composed, *labelled)
        else:
            fit_head(composed, *labelled, settings=settings)
    return composed.eval()
