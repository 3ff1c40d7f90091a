"""One training loop for modular (MwT) and standard training.

Seeded and resumable: every epoch a checkpoint (model, optimiser, scheduler,
scaler, RNG states, history) is written atomically; ``train`` with the same
checkpoint directory continues from it and, on a deterministic backend,
reproduces an uninterrupted run bit for bit. At the end, batch-norm statistics are
recomputed under the final masks (:func:`recalibrate_batchnorm`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mwt_core.config import BUDGET_RELAX_STEP, LEGACY_VALUES, TrainConfig
from mwt_core.data.batches import ImageBatches
from mwt_core.data.bundle import split_validation
from mwt_core.data.datasets import DatasetBundle
from mwt_core.devices import resolve_device
from mwt_core.evaluation import accuracy
from mwt_core.losses import mask_overlap, mask_similarity_losses, outlier_exposure, quadrant_mix
from mwt_core.models import MwTNet, create_model, default_width
from mwt_core.models.masking import ConvUnit
from mwt_core.progress import Progress, progress_record

CHECKPOINT_NAME = "last.pt"


class TrainingCancelled(RuntimeError):
    """Raised when ``should_stop`` asked the run to end early."""


@dataclass
class TrainResult:
    model: MwTNet
    test_acc: float
    train_seconds: float
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_acc: float | None = None  # on the validation slice, after the run
    budget: dict[str, Any] | None = None  # KernelBudget.report(): asked, reached, relaxed


class KernelBudget:
    """A kernel budget held by a Lagrange multiplier (dual ascent), the way structured
    pruning reaches a target sparsity.

    The loss gains ``multiplier * s``, ``s`` the mean mask value over every masked kernel and
    sample of the batch (differentiable). After each step the multiplier moves by
    ``step * (rate - target)`` and stays >= 0, ``rate`` being the share of kernels actually on
    (mask > 0, what a module keeps): it grows while the network keeps more kernels than the
    budget and shrinks once it keeps fewer, so the budget is reached whatever the loss
    weights, data set or run length, and the cohesion and coupling terms decide *which*
    kernels each class keeps. ``step`` is ``budget_rate / total_steps``: a run of a hundred
    steps and one of a hundred thousand tighten over the same share of the run.

    The target itself falls linearly from 1 (every kernel) to the budget over the first
    ``warmup`` share of the run: held from the first step, the budget switches kernels off
    before the network has learned what to use them for, and a mask generator that outputs 0
    for every sample gets no gradient back. The accuracy guard may loosen the budget
    (:meth:`relax`). Kept on the device: no host synchronisation in the step.
    """

    def __init__(self, target: float | None, rate: float, total_steps: int, device: torch.device,
                 warmup: float = 0.0) -> None:
        self.asked = target
        self.total_steps = max(1, total_steps)
        self.step = rate / self.total_steps
        self.warmup_steps = warmup * self.total_steps
        self.multiplier = torch.zeros((), device=device)
        self.relaxation = 0.0  # added to the scheduled target by the guard
        self.relaxed = 0
        self.steps_done = 0
        self.below_last = False  # the previous epoch's validation accuracy tripped the guard

    @property
    def active(self) -> bool:
        return self.asked is not None and self.asked < 1

    @property
    def binding(self) -> bool:
        """Whether the budget still holds anything back (the guard has not loosened it to 1)."""
        target = self.target
        return self.active and target is not None and target < 1

    @property
    def target(self) -> float | None:
        """The budget in force now (scheduled, plus what the guard relaxed)."""
        if self.asked is None:
            return None
        ramp = min(1.0, self.steps_done / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return min(1.0, 1.0 - (1.0 - self.asked) * ramp + self.relaxation)

    def penalty(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """The multiplier times the mean mask value (0 without a budget or masks)."""
        if not self.active or not masks:
            return self.multiplier * 0.0
        total = torch.stack([m.float().sum() for m in masks]).sum()
        count = sum(m.numel() for m in masks)
        return self.multiplier * (total / count)

    @torch.no_grad()
    def update(self, rate: torch.Tensor) -> None:
        """One dual-ascent step from the batch's share of kernels on."""
        target = self.target
        if self.active and target is not None:
            self.multiplier.add_(self.step * (rate - target)).clamp_(min=0.0)
        self.steps_done += 1

    def relax(self) -> None:
        """Loosen the budget by ``BUDGET_RELAX_STEP`` (the accuracy guard tripped)."""
        self.relaxation = round(self.relaxation + BUDGET_RELAX_STEP, 10)
        self.relaxed += 1

    def state(self) -> dict[str, Any]:
        return {"multiplier": float(self.multiplier), "relaxation": self.relaxation,
                "relaxed": self.relaxed, "steps_done": self.steps_done,
                "below_last": self.below_last}

    def load(self, state: dict[str, Any]) -> None:
        self.multiplier.fill_(float(state["multiplier"]))
        self.relaxation = float(state["relaxation"])
        self.relaxed = int(state["relaxed"])
        self.steps_done = int(state["steps_done"])
        self.below_last = bool(state["below_last"])

    def report(self, reached: float | None) -> dict[str, Any]:
        """What the run was asked, what it ended with and how often the guard relaxed it."""
        return {"target_krr": self.asked, "final_target": self.target, "kernel_rate": reached,
                "relaxed": self.relaxed, "multiplier": float(self.multiplier)}


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps of an epoch over ``n`` shuffled images: full batches, plus the remainder
    as a last batch only when it holds at least half a batch (a set smaller than one batch is
    one step).

    Why: batch norm normalises a training batch by its own statistics, and a trailing batch of
    a few images gives statistics (and a gradient, at the full learning rate) so noisy that a
    small data set whose size leaves such a remainder stops learning. The images left out
    differ every epoch, since the order is reshuffled.
    """
    full, rest = divmod(n, batch_size)
    if full == 0:
        return 1
    return full + (1 if 2 * rest >= batch_size else 0)


def guard_margin(guard_pp: float, best: float, n_val: int) -> float:
    """How far validation accuracy may fall below the run's best before the guard trips:
    ``guard_pp`` points, or two standard errors of a difference of two accuracies on
    ``n_val`` images where that is larger, so that on a small slice the epoch-to-epoch
    noise of a few images does not read as modularity costing accuracy. The accuracy in the
    standard error is smoothed by one image right and one wrong (Laplace's rule): a perfect
    score on a few images does not mean a spread of zero."""
    n = max(1, n_val)
    p = (best * n + 1.0) / (n + 2.0)
    noise = 2.0 * math.sqrt(2.0 * p * (1.0 - p) / n)
    return max(guard_pp / 100.0, noise)


def kernel_rate(masks: list[torch.Tensor]) -> torch.Tensor:
    """Share of all masked kernels on (mask > 0) over a batch, every kernel weighing the same."""
    on = torch.stack([(m > 0).sum() for m in masks]).sum()
    return on / sum(m.numel() for m in masks)


def build_model_for(cfg: TrainConfig, data: DatasetBundle) -> MwTNet:
    """The model ``cfg`` describes, shaped for ``data``'s input spec and classes."""
    # __post_init__ fills in the default; None here only if it was set back afterwards.
    width = default_width(cfg.arch) if cfg.width is None else cfg.width
    return create_model(
        cfg.arch, data.num_classes, in_channels=data.spec.channels,
        input_size=data.spec.size, width=width, masked=cfg.modular,
    )


def param_groups(model: MwTNet, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Network weights and mask-generator weights, the latter at ``cfg.mask_lr`` if set."""
    gate_ids = {id(p) for u in model.mask_units() if u.gate is not None for p in u.gate.parameters()}
    net = [p for p in model.parameters() if id(p) not in gate_ids]
    gates = [p for p in model.parameters() if id(p) in gate_ids]
    groups: list[dict[str, Any]] = [{"params": net}]
    if gates:
        groups.append({"params": gates, "lr": cfg.mask_lr if cfg.mask_lr is not None else cfg.lr})
    return groups


def _autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The mixed-precision type of the step (None: full precision), decided once per run:
    asking the device inside the step would break torch.compile's graph there."""
    if not (enabled and device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "gen": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gen: torch.Generator, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two configs describe the same run; the device may differ (a job retried
    on another worker resumes there). A key an older checkpoint lacks counts as the value
    such runs used (``LEGACY_VALUES``), else as today's default."""
    defaults = {f.name: f.default for f in fields(TrainConfig)} | LEGACY_VALUES

    def norm(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in {**defaults, **cfg}.items() if k != "device"}

    return norm(a) == norm(b)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` next to ``path`` then rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    # Our own checkpoints hold only tensors and plain containers: no pickle needed.
    return torch.load(path, map_location="cpu", weights_only=True)


def train(
    cfg: TrainConfig,
    data: DatasetBundle,
    *,
    progress: Callable[[Progress], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    should_stop: Callable[[], bool] | None = None,
    progress_every: int = 10,
) -> TrainResult:
    """Train ``cfg.arch`` on ``data`` (MwT when ``cfg.modular``), return the model and metrics."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest kernels; TF32 for fp32 matmuls/convs.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)

    # channels_last lets oneDNN (CPU) and cuDNN (GPU) pick their faster conv kernels.
    model = build_model_for(cfg, data)
    if cfg.init_from is not None:
        from mwt_core.models.weights import init_from

        init_from(model, cfg.init_from)  # checked before any training; generators stay fresh
    model = model.to(device)
    model = model.to(memory_format=torch.channels_last)
    fit, val = split_validation(data, cfg.val_fraction, cfg.seed)
    train_set = ImageBatches(fit.train_x, fit.train_y, data.spec, device)
    test_set = ImageBatches(data.test_x, data.test_y, data.spec, device)
    val_set = ImageBatches(val.test_x, val.test_y, data.spec, device) if val is not None else None
    optimizer = torch.optim.SGD(
        param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    # Loss scaling is for float16 only (bf16 keeps float32's range).
    use_scaler = _autocast_dtype(device, cfg.amp) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    n = len(train_set)
    steps = steps_per_epoch(n, cfg.batch_size)
    budget = KernelBudget(cfg.target_krr if cfg.modular else None, cfg.budget_rate,
                          steps * cfg.epochs, device, cfg.budget_warmup)
    best_val = 0.0
    history: list[dict[str, Any]] = []
    start_epoch, spent = 0, 0.0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if ckpt_path is not None and resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if not same_run(state["config"], cfg.to_json()):
            raise ValueError(f"checkpoint {ckpt_path} was written for another config; "
                             "use a fresh checkpoint directory or resume=False")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(gen, state["rng"])
        start_epoch, spent = state["epoch"], state["train_seconds"]
        history = [progress_record(r) for r in state["history"]]
        if "budget" in state:
            budget.load(state["budget"])
            best_val = float(state["budget"].get("best_val", 0.0))

    test_acc = history[-1]["test_acc"] if history else 0.0
    # Walk the module tree once, not every step.
    units = model.mask_units() if cfg.modular else []
    static_shapes = steps * cfg.batch_size <= n or steps == 1  # every step sees one batch shape
    forward = _loss_step(model, units, cfg, device, static_shapes, gen, budget)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sums = torch.zeros(6, device=device)  # loss, ce, coh, coup, correct, kernel_rate
        seen = 0
        perm = torch.randperm(n, device=device, generator=gen)
        for step in range(steps):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x, y = train_set.batch(idx, augment=cfg.augment, generator=gen)
            loss, ce, cohesion, coupling, logits, masks = forward(x, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

            last_step = step == steps - 1
            reporting = step % progress_every == 0 or last_step
            with torch.no_grad():
                b = y.shape[0]
                seen += b
                rate = kernel_rate(masks) if masks else torch.zeros((), device=device)
                budget.update(rate)
                sums += torch.stack([loss.detach() * b, ce.detach() * b, cohesion.detach() * b,
                                     coupling.detach() * b, (logits.argmax(1) == y).sum().float(),
                                     rate * b])
            if should_stop is not None and reporting and should_stop():
                raise TrainingCancelled(f"stopped at epoch {epoch + 1}, step {step + 1}")
            if progress is not None and step % progress_every == 0 and not last_step:
                progress(_report(cfg, epoch, step, steps, sums, seen, None, spent + time.perf_counter() - t0,
                                 budget))
        scheduler.step()
        spent += time.perf_counter() - t0
        test_acc = accuracy(model, test_set.ordered(512))
        val_acc = accuracy(model, val_set.ordered(512)) if val_set is not None else None
        report = _report(cfg, epoch, steps - 1, steps, sums, seen, test_acc, spent, budget, val_acc)
        if val_set is not None and val_acc is not None:
            # The guard: validation accuracy stayed clearly below the run's best for two epochs
            # in a row while the budget binds, so modularity is costing accuracy (one epoch
            # alone is as often the learning rate's noise); loosen the budget for what is left.
            below = best_val - val_acc > guard_margin(cfg.guard_pp, best_val, len(val_set))
            if budget.binding and below and budget.below_last:
                budget.relax()
                below = False  # the next trip needs two more epochs below
            budget.below_last = below
            best_val = max(best_val, val_acc)
        history.append({k: v for k, v in report.to_json().items() if k not in ("step", "steps")})
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, {
                "config": cfg.to_json(), "epoch": epoch + 1, "train_seconds": spent,
                "history": history, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": _rng_state(gen), "budget": {**budget.state(), "best_val": best_val},
            })
        if progress is not None:
            progress(report)
    if cfg.modular:
        recalibrate_batchnorm(model, train_set.ordered(cfg.batch_size))
        test_acc = accuracy(model, test_set.ordered(512))
    val_acc = accuracy(model, val_set.ordered(512)) if val_set is not None else None
    model.eval()
    reached = history[-1].get("kernel_rate") if history else None
    return TrainResult(model=model, test_acc=test_acc, train_seconds=spent,
                       epochs_run=cfg.epochs - start_epoch, history=history, val_acc=val_acc,
                       budget=budget.report(reached) if cfg.modular else None)


def recalibrate_batchnorm(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                          ) -> None:
    """Recompute every batch norm's running statistics as the average over ``batches``
    (un-augmented training images) with the network as it now is.

    Why: a mask multiplies a unit's output after its BN, so the statistics of every later
    BN depend on the masks, which keep moving while they specialise; the running averages
    trail them. In a short run (MwT from trained weights) that lag costs held-out accuracy
    (docs/architectures.md); over a long run it is small.
    Only the BN layers run in training mode (dropout and stochastic depth stay off), under
    no_grad; the model is left in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.train()
    try:
        with torch.no_grad():
            seen = 0
            for x, _ in batches:
                if x.shape[0] < 2:  # batch statistics of one image are undefined
                    continue
                # A cumulative average (every batch weighs the same) as a moving average of
                # rate 1/(k+1): BN's own momentum=None would read its batch counter back to the
                # host once per layer and batch.
                seen += 1
                for m in bns:
                    m.momentum = 1.0 / seen
                model(x)
    finally:
        for m, momentum in zip(bns, saved, strict=True):
            m.momentum = momentum
        model.eval()


def _loss_step(model: MwTNet, units: list[ConvUnit], cfg: TrainConfig, device: torch.device,
               static_shapes: bool, gen: torch.Generator | None = None,
               budget: KernelBudget | None = None) -> Callable[[torch.Tensor, torch.Tensor], tuple[Any, ...]]:
    """The forward half of a training step: ``(loss, ce, cohesion, coupling, logits, masks)``.

    Free of host synchronisation (no ``.item()`` or tensor-valued ``if``), so with
    ``cfg.compile`` it compiles to one graph and, on CUDA with static shapes, replays as
    a CUDA graph.
    """

    amp_dtype = _autocast_dtype(device, cfg.amp)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[Any, ...]:
        with _autocast(device, amp_dtype):
            if cfg.modular:
                logits, masks = model.forward_with_masks(x, units)
            else:
                logits, masks = model(x), []
            ce = F.cross_entropy(logits.float(), y)
            cohesion, coupling = mask_similarity_losses(masks, y)
            loss = ce + cfg.alpha * cohesion + cfg.beta * coupling
            if cfg.gamma > 0 and masks:
                loss = loss + cfg.gamma * mask_overlap(masks, y)
            if budget is not None and budget.active:
                loss = loss + budget.penalty(masks)
            if cfg.outlier_weight > 0:
                outliers = quadrant_mix(x, y, generator=gen)
                loss = loss + cfg.outlier_weight * outlier_exposure(model(outliers).float())
        return loss, ce, cohesion, coupling, logits, masks

    if not cfg.compile or not hasattr(torch, "compile"):
        return step
    graphs = device.type == "cuda" and static_shapes
    # Compiled code of an earlier run guards on that run's model; once it is freed every
    # call would recompile, and dynamo falls back to eager at its recompile limit.
    torch.compiler.reset()
    compiled = torch.compile(step, mode="reduce-overhead" if graphs else None, dynamic=False)
    if not graphs:
        return compiled

    def graphed_step(x: torch.Tensor, y: torch.Tensor) -> tuple[Any, ...]:
        # A new step: outputs of the previous replay (already consumed) may be overwritten.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, y)

    return graphed_step


def _report(cfg: TrainConfig, epoch: int, step: int, steps: int, sums: torch.Tensor, seen: int,
            test_acc: float | None, elapsed: float, budget: KernelBudget,
            val_acc: float | None = None) -> Progress:
    loss, ce, coh, coup, correct, rate = (sums / max(1, seen)).tolist()
    done = epoch + (step + 1) / steps
    eta = elapsed / done * (cfg.epochs - done) if done > 0 else math.inf
    return Progress(
        epoch=epoch + 1, epochs=cfg.epochs, step=step + 1, steps=steps, loss=loss, ce=ce,
        cohesion_loss=coh, coupling_loss=coup, train_acc=correct, test_acc=test_acc,
        kernel_rate=rate if cfg.modular else None, elapsed_s=elapsed, eta_s=eta,
        val_acc=val_acc, kernel_budget=budget.target if budget.active else None,
    )
