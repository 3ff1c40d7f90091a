"""The settings of a run, their defaults and their bounds: written here once.

Every other place (the ``mwt`` CLI, the service's job schema and ``mwt submit``, the
benchmarks) reads its defaults and limits from these classes, so ``POST /jobs {}``,
``mwt submit`` and ``mwt train`` with no options train the same thing. How the defaults
were chosen (held-out parts of training splits): docs/defaults.md.

This module imports no torch, so the web service can read it without loading PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mwt_core.limits import LIMITS

DEFAULT_DATASET = "digits"  # built in (scikit-learn), so a fresh install trains without downloads

# The paper's training: its loss weights and mask-generator rate (DESIGN §1.2; mask_lr None:
# same as lr), and no kernel budget, which the paper does not have. TrainConfig's loss fields
# read their defaults from here where no other value was chosen; named so that comparisons
# (the benchmarks' "paper" runs, ``**PAPER_SETTINGS``) say what they compare against.
PAPER_SETTINGS: dict[str, Any] = {"mask_lr": None, "alpha": 0.5, "beta": 1.5, "gamma": 0.0,
                                  "target_krr": None}


@dataclass
class TrainConfig:
    """Everything that determines a training run (with the dataset).

    Defaults: a CPU-only machine trains SimCNN at its default width on digits with them in a
    few minutes. They are the same for every data set and for a run that starts from weights:
    the kernel budget (``target_krr``), not per-data-set loss weights, decides how far the
    masks specialise (docs/defaults.md, "Kernel budget").
    """

    arch: str = "simcnn"
    # None: the architecture's default (its ArchInfo.default_width: the built-in CNNs' scaled
    # DEFAULT_WIDTH, 1 for torchvision's fixed layouts); set to it when the config is made.
    width: float | None = None
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0  # the paper trains without weight decay
    mask_lr: float | None = PAPER_SETTINGS["mask_lr"]  # of the mask generators (None: lr)
    # Weight of the cohesion loss. Under a kernel budget it is what keeps a class's samples on
    # the same few kernels (a module keeps the kernels most of its class uses): chosen with
    # gamma on held-out parts of digits and digits28 (docs/defaults.md, "Kernel budget").
    alpha: float = 2.0
    beta: float = PAPER_SETTINGS["beta"]  # weight of the coupling loss
    gamma: float = 0.5  # weight of the cross-class mask-overlap term (the paper: 0)
    # Kernel budget of modular training: the share of the masked kernels a sample may keep
    # switched on, on average. Enforced during training by a Lagrange multiplier on the mean
    # mask (training.KernelBudget), whatever the data set or run length; None: no budget (the
    # paper's loss alone).
    target_krr: float | None = 0.3
    # How fast the multiplier may grow, per run: its step is budget_rate / (optimiser steps of
    # the run), so a short run and a long one tighten alike.
    budget_rate: float = 40.0
    # Share of the run over which the budget tightens from every kernel to target_krr.
    budget_warmup: float = 0.3
    # A stratified share of the training split held out for validation (fixed by the seed):
    # the accuracy guard, the per-epoch validation accuracy and the choice of tau read it. The
    # test split is never read to decide anything. 0: no validation slice.
    val_fraction: float = 0.1
    # Accuracy guard, in percentage points: when an epoch's validation accuracy falls more than
    # this below the run's best, the kernel budget is relaxed by BUDGET_RELAX_STEP.
    guard_pp: float = 1.0
    # Weight of an outlier-exposure term (losses.outlier_exposure): synthetic images made of
    # other images' quadrants are pushed to a uniform softmax, so the model scores low on
    # what it has not seen; 0 (off) is the paper's loss (docs/defaults.md: it did not help
    # composition).
    outlier_weight: float = 0.0
    modular: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    augment: bool = True
    # torch.compile the training step (opt-in: compiling costs tens of seconds up front);
    # on CUDA with one batch shape throughout, also CUDA graphs ("reduce-overhead").
    compile: bool = False
    # A safetensors state dict to start from (mwt_core.models.weights): the network's
    # weights are loaded, the mask generators start fresh. None: random initialisation.
    init_from: str | None = None

    def __post_init__(self) -> None:
        lim = LIMITS
        checks = [
            (1 <= self.epochs <= lim.epochs, f"epochs must be in 1..{lim.epochs}, got {self.epochs}"),
            (2 <= self.batch_size <= lim.batch_size,
             f"batch_size must be in 2..{lim.batch_size}, got {self.batch_size}"),
            (0 < self.lr <= lim.lr, f"lr must be in (0, {lim.lr:g}], got {self.lr}"),
            (self.mask_lr is None or 0 < self.mask_lr <= lim.lr,
             f"mask_lr must be in (0, {lim.lr:g}], got {self.mask_lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (0 <= self.weight_decay <= lim.weight_decay,
             f"weight_decay must be in [0, {lim.weight_decay:g}], got {self.weight_decay}"),
            (all(0 <= w <= lim.loss_weight for w in (self.alpha, self.beta, self.gamma)),
             f"alpha, beta and gamma must be in [0, {lim.loss_weight:g}]"),
            (0 <= self.outlier_weight <= lim.loss_weight,
             f"outlier_weight must be in [0, {lim.loss_weight:g}], got {self.outlier_weight}"),
            (self.target_krr is None or 0 < self.target_krr <= 1,
             f"target_krr must be in (0, 1] or None, got {self.target_krr}"),
            (0 <= self.budget_warmup <= 1,
             f"budget_warmup must be in [0, 1], got {self.budget_warmup}"),
            (0 <= self.budget_rate <= lim.loss_weight,
             f"budget_rate must be in [0, {lim.loss_weight:g}], got {self.budget_rate}"),
            (0 <= self.val_fraction <= lim.val_fraction,
             f"val_fraction must be in [0, {lim.val_fraction:g}], got {self.val_fraction}"),
            (0 <= self.guard_pp <= lim.guard_pp, f"guard_pp must be in [0, {lim.guard_pp:g}], got {self.guard_pp}"),
            (0 <= self.seed <= lim.seed, f"seed must be in 0..{lim.seed}, got {self.seed}"),
            (self.init_from is None or (isinstance(self.init_from, str) and self.init_from != ""),
             f"init_from must be a path to a safetensors file or None, got {self.init_from!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        from mwt_core.models import check_architecture, default_width  # torch: only here

        if self.width is None:
            self.width = default_width(self.arch)
        check_architecture(self.arch, self.width)  # unknown names, bad widths fail here

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**data)


@dataclass(frozen=True)
class ModularizeConfig:
    """Settings of modularization (DESIGN §1.3)."""

    tau: float = 0.9  # keep a kernel for a class when it is active on >= tau of its samples
    # Accuracy budget of a class set's module when its tau is chosen on the validation slice
    # ("auto"): the smallest module whose validation accuracy is at most this many percentage
    # points below the full model's on the same classes (reuse.choose_tau).
    margin_pp: float = 1.0

    def __post_init__(self) -> None:
        check_tau(self.tau)
        check_margin(self.margin_pp)


# The thresholds "auto" chooses among, largest (smallest module) first is how they are tried.
TAU_GRID: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))

# What a request for a chosen threshold is called wherever a tau may be given.
AUTO_TAU = "auto"


def check_tau(tau: float) -> float:
    """``tau`` if it is a valid modularization threshold, else ``ValueError``."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    return tau


def check_margin(margin_pp: float) -> float:
    """``margin_pp`` if it is a valid accuracy margin in percentage points, else ``ValueError``."""
    if not 0 <= margin_pp <= 100:
        raise ValueError(f"margin_pp must be in [0, 100] percentage points, got {margin_pp}")
    return margin_pp


def parse_tau(value: str | float) -> float | str:
    """A tau as a user writes it: ``"auto"`` (:data:`AUTO_TAU`) or a threshold in (0, 1];
    ``ValueError`` naming both forms otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO_TAU:
            return AUTO_TAU
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"tau must be {AUTO_TAU!r} or a number in (0, 1], got {value!r}") from None
    return check_tau(float(value))


def validation_fraction(train_config: dict[str, Any] | None) -> float:
    """The validation share a run held out, from its recorded ``train_config`` (a run recorded
    before the slice existed held none): a model has a validation slice where this is > 0."""
    value = (train_config or {}).get("val_fraction", LEGACY_VALUES["val_fraction"])
    try:
        return max(0.0, float(value or 0.0))
    except (TypeError, ValueError):
        return 0.0


# Values of fields added after the first checkpoints were written, as those runs used them:
# a checkpoint that lacks a key ran with this value, whatever today's default is.
LEGACY_VALUES: dict[str, Any] = {"mask_lr": None, "gamma": 0.0, "weight_decay": 0.0,
                                 "outlier_weight": 0.0, "compile": False,
                                 "init_from": None, "target_krr": None, "budget_warmup": 0.0, "budget_rate": 0.0,
                                 "val_fraction": 0.0, "guard_pp": 0.0}

# How much the accuracy guard loosens the kernel budget each time it trips.
BUDGET_RELAX_STEP = 0.05

