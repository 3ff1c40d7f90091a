"""Cost of MwT (DESIGN §2 "Speed", §1.4 size and cost) on synthetic CIFAR-shaped data.

Measures, in one process on the same data:

- training throughput (images/s) of standard and MwT training, whole epochs timed by
  ``train`` itself (with ``--epochs`` > 1, the epochs after the first: that one also pays
  compilation and cuDNN autotuning), and ``mwt_over_std`` = MwT / standard time per epoch;
- ``modularize_s``: modularizing the MwT model over a ``--modularize-size`` training set;
- latency at batch 256 (``measure_latency``) and FLOPs per image (``count_flops``) of the
  full MwT model against its 1-class and 3-class modules, each also with its cut layers
  padded to a multiple of 8 channels (``--channel-multiple``: same outputs; on a GPU,
  tensor-core kernels want such counts);
- ``projected_200ep_min``: 200 MwT epochs at the measured rate plus one modularization,
  the figure the paper gives as 108 minutes (VGG16 on CIFAR-10, one GPU).

``--compile`` times both trainings with ``TrainConfig.compile`` (torch.compile; CUDA
graphs on a GPU); the untimed warm-up then also pays the compilation.

A model trained for an epoch or two keeps most kernels in every module, so module
ratios close to 1 are expected there; the KRR of each module is reported with them.
Prints a table, then exactly one final line of JSON.

    python bench/speed.py --arch simcnn --width 1.0 --epochs 1 --train-size 5000
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

import torch
from _main import bench_main
from rich.console import Console
from rich.table import Table

from mwt_core.config import ModularizeConfig, TrainConfig
from mwt_core.data.datasets import load_dataset
from mwt_core.devices import resolve_device
from mwt_core.metrics import count_flops, count_params, measure_latency
from mwt_core.models import architecture_info
from mwt_core.pipeline import PipelineEvent, PipelineResult, run_pipeline
from mwt_core.reuse import extract_module
from mwt_core.training import train

MODULE_CLASSES = {"module1": [0], "module3": [0, 1, 2]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--arch", default="simcnn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--modularize-size", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--latency-batch", type=int, default=256)
    p.add_argument("--tau", type=float, default=ModularizeConfig.tau)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (TrainConfig.compile)")
    p.add_argument("--channel-multiple", type=int, default=8,
                   help="also time each module with cut layers padded to this many channels")
    p.add_argument("--gamma", type=float, default=TrainConfig.gamma,
                   help="cross-class mask-overlap weight of the MwT run (0: the paper's loss)")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed one-epoch warm-up on a few batches (CUDA/cuDNN setup)",
    )
    return p.parse_args(argv)


def _timed_run(cfg: TrainConfig, data: Any, warmup: bool, err: Console,
               modularize_on: Any = None, tau: float = ModularizeConfig.tau) -> PipelineResult:
    """One pipeline run in memory (MwT: then modularized over ``modularize_on``)."""
    if warmup:
        n = min(len(data.train_y), 4 * cfg.batch_size)
        small = replace(
            data,
            train_x=data.train_x[:n],
            train_y=data.train_y[:n],
            test_x=data.test_x[:64],
            test_y=data.test_y[:64],
        )
        with err.status(f"warm-up ({'MwT' if cfg.modular else 'standard'})"):
            train(replace(cfg, epochs=1), small)
    label = f"{'MwT' if cfg.modular else 'standard'} training, {cfg.epochs} epoch(s)"
    with err.status(label) as status:

        def on_event(ev: PipelineEvent) -> None:
            if ev.phase == "modularizing":
                status.update(f"modularizing {len(modularize_on.train_y)} images")

        return run_pipeline(cfg, data, tau=tau, modularize_on=modularize_on, progress=on_event)


def _epoch_seconds(result: Any) -> float:
    """Seconds per epoch; over the epochs after the first when there are several (the
    first also pays compilation and cuDNN's autotuning of the trailing batch's shape)."""
    elapsed = [h["elapsed_s"] for h in result.history]
    if len(elapsed) < 2:
        return float(result.train_seconds)
    return (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    err = Console(stderr=True)
    device = resolve_device(args.device)
    architecture_info(args.arch)  # fail fast on a bad name
    with err.status("generating data"):
        data = load_dataset(
            "synthetic",
            num_train=args.train_size,
            num_test=args.test_size,
            seed=args.seed,
            min_input_size=architecture_info(args.arch).min_input_size,
        )
        big = load_dataset(
            "synthetic",
            num_train=args.modularize_size,
            num_test=1,
            seed=args.seed + 1,
            min_input_size=architecture_info(args.arch).min_input_size,
        )
    base = TrainConfig(
        arch=args.arch,
        width=args.width,
        epochs=args.epochs,
        seed=args.seed,
        device=str(device),
        batch_size=args.batch_size,
        amp=not args.no_amp,
        gamma=args.gamma,
        compile=args.compile,
    )
    std_run = _timed_run(replace(base, modular=False), data, not args.no_warmup, err)
    mwt_run = _timed_run(replace(base, modular=True), data, not args.no_warmup, err,
                         modularize_on=big, tau=args.tau)
    del big
    std, mwt = std_run.training, mwt_run.training
    mz = mwt_run.modularization
    assert mz is not None
    # ``train`` drops a trailing batch of one sample; count what it saw.
    n = args.train_size - (1 if args.train_size % args.batch_size == 1 else 0)
    std_epoch, mwt_epoch = _epoch_seconds(std), _epoch_seconds(mwt)
    modularize_s = float(mwt_run.metrics["modularize_seconds"])
    model = mwt_run.model

    shape = tuple(data.spec.shape)
    out: dict[str, Any] = {
        "std_img_s": n / std_epoch,
        "mwt_img_s": n / mwt_epoch,
        "mwt_over_std": mwt_epoch / std_epoch,
        "std_epoch_s": std_epoch,
        "std_first_epoch_s": std.history[0]["elapsed_s"],
        "mwt_first_epoch_s": mwt.history[0]["elapsed_s"],
        "mwt_epoch_s": mwt_epoch,
        "modularize_s": modularize_s,
        "modularize_img_s": args.modularize_size / modularize_s,
        "projected_200ep_min": (200 * mwt_epoch + modularize_s) / 60,
    }
    with err.status("measuring latency"):
        full_latency = measure_latency(model, shape, batch=args.latency_batch, device=str(device))
        std_latency = measure_latency(
            std.model, shape, batch=args.latency_batch, device=str(device)
        )
        full_flops = count_flops(model.to(device), shape)
        out.update(
            {
                "full_latency_s": full_latency,
                "std_latency_s": std_latency,
                "full_flops": full_flops,
                "full_params": count_params(model),
                "std_flops": count_flops(std.model.to(device), shape),
            }
        )
        for key, classes in MODULE_CLASSES.items():
            module = extract_module(model, mz, classes).to(device)
            latency = measure_latency(module, shape, batch=args.latency_batch, device=str(device))
            flops = count_flops(module, shape)
            padded = extract_module(model, mz, classes, channel_multiple=args.channel_multiple)
            padded_latency = measure_latency(padded.to(device), shape, batch=args.latency_batch,
                                             device=str(device))
            out.update(
                {
                    f"{key}_padded_latency_ratio": padded_latency / full_latency,
                    f"{key}_padded_flops_ratio": count_flops(padded, shape) / full_flops,
                    f"{key}_latency_ratio": latency / full_latency,
                    f"{key}_flops_ratio": flops / full_flops,
                    f"{key}_krr": module.krr,
                    f"{key}_latency_s": latency,
                    f"{key}_flops": flops,
                    f"{key}_params": count_params(module),
                    f"{key}_classes": classes,
                }
            )
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out.update(
        {
            "device": str(device),
            "device_name": dev_name,
            "arch": args.arch,
            "width": args.width,
            "epochs": args.epochs,
            "train_size": args.train_size,
            "modularize_size": args.modularize_size,
            "batch_size": args.batch_size,
            "gamma": args.gamma,
            "latency_batch": args.latency_batch,
            "tau": args.tau,
            "amp": not args.no_amp,
            "compile": args.compile,
            "channel_multiple": args.channel_multiple,
            "model_krr": mz.model_krr,
            "std_test_acc": std.test_acc,
            "mwt_test_acc": mwt.test_acc,
            "torch_threads": torch.get_num_threads(),
        }
    )
    return out


def render(r: dict[str, Any], console: Console) -> None:
    t = Table(
        title=f"speed: {r['arch']} x{r['width']} on {r['device_name']}, synthetic 3x32x32, "
        f"{r['train_size']} images x {r['epochs']} epoch(s), batch {r['batch_size']}"
        f"{', compiled' if r['compile'] else ''}",
        title_justify="left",
    )
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("standard training", f"{r['std_img_s']:.0f} img/s ({r['std_epoch_s']:.2f} s/epoch)")
    t.add_row("MwT training", f"{r['mwt_img_s']:.0f} img/s ({r['mwt_epoch_s']:.2f} s/epoch)")
    t.add_row("MwT / standard time per epoch", f"{r['mwt_over_std']:.2f}x")
    t.add_row("200 MwT epochs + modularization (projected)", f"{r['projected_200ep_min']:.1f} min")
    t.add_row(
        f"modularize {r['modularize_size']} images",
        f"{r['modularize_s']:.2f} s ({r['modularize_img_s']:.0f} img/s)",
    )
    t.add_row(
        f"latency, batch {r['latency_batch']}: full MwT model",
        f"{1000 * r['full_latency_s']:.1f} ms ({r['full_flops'] / 1e6:.1f} MFLOPs/img)",
    )
    t.add_row(
        "  standard model (no mask generators)",
        f"{1000 * r['std_latency_s']:.1f} ms ({r['std_flops'] / 1e6:.1f} MFLOPs/img)",
    )
    for key, label in (("module1", "1-class module"), ("module3", "3-class module")):
        t.add_row(
            f"  {label} (KRR {100 * r[f'{key}_krr']:.1f}%)",
            f"{1000 * r[f'{key}_latency_s']:.1f} ms = {r[f'{key}_latency_ratio']:.2f}x, "
            f"FLOPs {r[f'{key}_flops_ratio']:.2f}x",
        )
        t.add_row(
            f"    padded to x{r['channel_multiple']} channels",
            f"{r[f'{key}_padded_latency_ratio']:.2f}x, FLOPs {r[f'{key}_padded_flops_ratio']:.2f}x",
        )
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args, run, render, argv)


if __name__ == "__main__":
    sys.exit(main())
