"""Reuse quality of MwT against standard training, on digits or --dataset (DESIGN §1.4, §1.6).

Trains a standard and an MwT model with the same architecture, epochs and seed,
modularizes the MwT model and, for the class subsets {0,1} and {3,5,8}, compares:

- the module's KRR,
- the standard model's accuracy with its logits restricted to the subset,
- the module's accuracy with zero training (physically slimmed, logits of the subset),
- the module's accuracy after fine-tuning its head (a fresh extract, ``finetune_head``).

Prints a table, then exactly one final line of JSON (the figures below).

    python bench/quality.py --arch simcnn --width 0.25 --epochs 200 --seed 0 --tau 0.9
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from _main import bench_main
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mwt_core.config import (
    DEFAULT_DATASET,
    PAPER_SETTINGS,
    ModularizeConfig,
    TrainConfig,
)
from mwt_core.data.datasets import holdout, load_dataset
from mwt_core.devices import resolve_device
from mwt_core.models import architecture_info, default_width
from mwt_core.pipeline import PipelineEvent, PipelineResult, run_pipeline
from mwt_core.reuse import evaluate, extract_module, finetune_head, restrict

SUBSETS = {"tc01": [0, 1], "tc358": [3, 5, 8]}


_T = TrainConfig  # defaults: mwt_core.config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="dataset name or .npz path")
    p.add_argument("--arch", default=_T.arch)
    p.add_argument("--width", type=float, default=None, help="default: the architecture's")
    p.add_argument("--epochs", type=int, default=_T.epochs)
    p.add_argument("--seed", type=int, default=_T.seed)
    p.add_argument("--tau", type=float, default=ModularizeConfig.tau)
    p.add_argument("--device", default=_T.device)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=_T.batch_size)
    p.add_argument("--lr", type=float, default=_T.lr)
    # TrainConfig's defaults, as `mwt train` and POST /jobs take them, whatever the data set.
    p.add_argument("--mask-lr", type=float, default=_T.mask_lr,
                   help="learning rate of the mask generators (None: same as --lr)")
    p.add_argument("--alpha", type=float, default=_T.alpha, help="cohesion loss weight")
    p.add_argument("--beta", type=float, default=_T.beta, help="coupling loss weight")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="evaluate on this stratified fraction of the training split instead of "
                        "the test split (for choosing settings)")
    p.add_argument("--gamma", type=float, default=_T.gamma, help="cross-class mask-overlap weight")
    p.add_argument("--target-krr", type=float, default=_T.target_krr,
                   help="kernel budget of the MwT run (1: no budget)")
    p.add_argument("--paper", action="store_true",
                   help=f"the paper's loss, mask-generator rate and no kernel budget "
                        f"{PAPER_SETTINGS} (mask_lr None: same as --lr; overrides those options)")
    p.add_argument(
        "--no-mask-generators",
        action="store_true",
        help="drop the mask generators from the modules (kept kernels always pass)",
    )
    p.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="use only the first N training images (smoke tests)",
    )
    args = p.parse_args(argv)
    if args.width is None:
        args.width = default_width(args.arch)
    if args.paper:
        for key, value in PAPER_SETTINGS.items():
            setattr(args, key, value)
    return args


def _train(cfg: TrainConfig, data: Any, label: str, tau: float, err: Console) -> PipelineResult:
    """One pipeline run in memory: training, then (MwT) modularization."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task(label, total=cfg.epochs)

        def on_event(ev: PipelineEvent) -> None:
            p = ev.training
            if p is not None and p.test_acc is not None:
                bar.update(
                    task,
                    completed=p.epoch,
                    description=f"{label} loss {p.loss:.3f} test {100 * p.test_acc:.1f}%",
                )
            elif ev.phase == "modularizing":
                bar.update(task, description=f"{label}: modularizing (tau={tau})")

        return run_pipeline(cfg, data, tau=tau, progress=on_event)


def run(args: argparse.Namespace) -> dict[str, Any]:
    err = Console(stderr=True)
    device = str(resolve_device(args.device))
    data = load_dataset(args.dataset, min_input_size=architecture_info(args.arch).min_input_size)
    if args.holdout:
        data = holdout(data, args.holdout)
    if args.train_limit is not None:
        data = replace(
            data, train_x=data.train_x[: args.train_limit], train_y=data.train_y[: args.train_limit]
        )
    base = TrainConfig(
        arch=args.arch,
        width=args.width,
        epochs=args.epochs,
        seed=args.seed,
        device=device,
        batch_size=args.batch_size,
        lr=args.lr,
        mask_lr=args.mask_lr,
        alpha=args.alpha,
        beta=args.beta,
        gamma=args.gamma,
        target_krr=args.target_krr,
    )

    std = _train(replace(base, modular=False), data, "standard", args.tau, err)
    mwt = _train(replace(base, modular=True), data, "MwT", args.tau, err)
    mz = mwt.modularization
    assert mz is not None
    modularize_s = float(mwt.metrics["modularize_seconds"])

    keep_gens = not args.no_mask_generators
    out: dict[str, Any] = {
        "standard_acc": std.training.test_acc,
        "mwt_acc": mwt.training.test_acc,
        "krr": mz.model_krr,
        "cohesion": mz.cohesion,
        "coupling": mz.coupling,
        "layer_coupling": [round(c, 3) for c in mz.layer_coupling()],
    }
    for key, classes in SUBSETS.items():
        with err.status(f"reusing classes {classes}"):
            std_acc = evaluate(
                restrict(std.model, classes, data.num_classes), data, classes, device=device
            )
            mwt_full = evaluate(
                restrict(mwt.model, classes, data.num_classes), data, classes, device=device
            )
            zero = evaluate(
                extract_module(mwt.model, mz, classes, keep_mask_generators=keep_gens),
                data,
                classes,
                device=device,
            )
            fresh = extract_module(mwt.model, mz, classes, keep_mask_generators=keep_gens)
            ft = evaluate(
                finetune_head(
                    fresh, data, epochs=args.finetune_epochs, seed=args.seed, device=device
                ),
                data,
                classes,
                device=device,
            )
        out.update(
            {
                f"{key}_krr": mz.krr_of(classes),
                f"{key}_std_acc": std_acc,
                f"{key}_zero_acc": zero,
                f"{key}_ft_acc": ft,
                f"{key}_mwt_full_acc": mwt_full,
            }
        )
    out.update(
        {
            # mwt_s: what MwT costs to deliver modules, i.e. training plus modularization.
            "standard_s": std.training.train_seconds,
            "mwt_s": mwt.training.train_seconds + modularize_s,
            "mwt_train_s": mwt.training.train_seconds,
            "modularize_s": modularize_s,
            "standard_epoch_s": std.training.train_seconds / max(1, std.training.epochs_run),
            "mwt_epoch_s": mwt.training.train_seconds / max(1, mwt.training.epochs_run),
            "dataset": args.dataset,
            "arch": args.arch,
            "width": args.width,
            "epochs": args.epochs,
            "seed": args.seed,
            "tau": args.tau,
            "finetune_epochs": args.finetune_epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "mask_lr": args.mask_lr,
            "alpha": args.alpha,
            "beta": args.beta,
            "gamma": args.gamma,
            "target_krr": args.target_krr,
            "kernel_budget": mwt.training.budget,
            "mwt_val_acc": mwt.training.val_acc,
            "eval_split": f"holdout {args.holdout} of train" if args.holdout else "test",
            "device": device,
            "mask_generators": keep_gens,
            "num_train": int(data.train_y.numel()),
        }
    )
    return out


def render(r: dict[str, Any], console: Console) -> None:
    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    head = Table(
        title=f"MwT vs standard: {r['arch']} x{r['width']} on {r['dataset']}, {r['epochs']} epochs, "
        f"seed {r['seed']}, tau {r['tau']}",
        title_justify="left",
    )
    head.add_column("")
    head.add_column("standard", justify="right")
    head.add_column("MwT", justify="right")
    head.add_row("test accuracy", pct(r["standard_acc"]), pct(r["mwt_acc"]))
    head.add_row("training time", f"{r['standard_s']:.1f} s", f"{r['mwt_train_s']:.1f} s")
    head.add_row("time per epoch", f"{r['standard_epoch_s']:.2f} s", f"{r['mwt_epoch_s']:.2f} s")
    head.add_row("modularization", "-", f"{r['modularize_s']:.1f} s")
    head.add_row(
        "KRR / cohesion / coupling",
        "-",
        f"{pct(r['krr'])} / {r['cohesion']:.3f} / {r['coupling']:.3f}",
    )
    console.print(head)

    reuse = Table(
        title=f"reuse on sub-tasks (head fine-tuned {r['finetune_epochs']} epochs)",
        title_justify="left",
    )
    for col in (
        "classes",
        "module KRR",
        "standard (restricted)",
        "module, zero training",
        "loss (pp)",
        "module, fine-tuned",
        "loss (pp)",
    ):
        reuse.add_column(col, justify="right")
    for key, classes in SUBSETS.items():
        std_acc = r[f"{key}_std_acc"]
        reuse.add_row(
            "{" + ",".join(map(str, classes)) + "}",
            pct(r[f"{key}_krr"]),
            pct(std_acc),
            pct(r[f"{key}_zero_acc"]),
            f"{100 * (std_acc - r[f'{key}_zero_acc']):+.2f}",
            pct(r[f"{key}_ft_acc"]),
            f"{100 * (std_acc - r[f'{key}_ft_acc']):+.2f}",
        )
    console.print(reuse)


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args, run, render, argv)


if __name__ == "__main__":
    sys.exit(main())
