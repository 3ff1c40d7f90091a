"""Module inference cost against the model it came from (DESIGN §1.4 "size and cost", §1.5).

For a trained model (an mwt artifact with its modularization, see ``--model-dir``;
trained here on digits at 32x32 with the TrainConfig defaults when not given), on the
CPU with ``--threads`` threads, at each ``--batch``:

- the model's latency as loaded (NCHW) and in channels_last (the baseline of the ratios);
- 1-class and 3-class modules, with and without mask generators, and a composition of
  three 1-class modules: latency ratio and FLOPs ratio against the model, and their gap;
- with ``--every-class``, the 1-class module of every class (with and without generators),
  timed in the same rounds: how far class 0's module, which the targets are read on, is
  typical of the model's classes;
- beside it, the FLOPs ratio with every conv's output channels rounded up to ``--block``
  (oneDNN's CPU convolutions compute output channels in blocks of the vector width: 16
  floats with AVX-512, where 1 to 16 output channels take the same time), which is the
  work the convolutions really do. It explains a gap; the targets stay on plain FLOPs.

Latencies (process CPU time with one thread, see ``--clock``) are medians over ``--rounds`` rounds in which every network runs once, so a
load change on the machine hits all of them alike. Prints a table, then one final JSON line.

    python bench/modules.py --model-dir /tmp/speed_models/simcnn
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _main import bench_main
from rich.console import Console
from rich.table import Table
from torch import nn

from mwt_core.artifacts import load_artifact, save_artifact
from mwt_core.compose import Source, compose
from mwt_core.config import PAPER_SETTINGS
from mwt_core.data.datasets import InputSpec, load_dataset
from mwt_core.metrics import count_flops
from mwt_core.models import default_width
from mwt_core.modularize import Modularization, modularize
from mwt_core.reuse import extract_module
from mwt_core.slimming import channels_last
from mwt_core.training import TrainConfig, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model-dir", default=None,
                   help="trained mwt model artifact with a 'modularization' in its manifest; "
                        "if missing, one is trained and saved there")
    p.add_argument("--arch", default="simcnn", help="architecture to train when --model-dir is empty")
    p.add_argument("--width", type=float, default=None, help="default: the architecture's")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, nargs="+", default=[256, 1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="auto: process CPU time with one thread, wall clock otherwise")
    p.add_argument("--block", type=int, default=16,
                   help="output channels a CPU conv computes at once (the 'blocked FLOPs' column)")
    p.add_argument("--every-class", action="store_true",
                   help="also time the 1-class module of every class (a table of its own)")
    args = p.parse_args(argv)
    if args.width is None:
        args.width = default_width(args.arch)
    return args


def _trained(args: argparse.Namespace) -> tuple[nn.Module, Modularization, dict[str, Any]]:
    if args.model_dir and (Path(args.model_dir) / "manifest.json").is_file():
        model, manifest = load_artifact(args.model_dir)
        return model, Modularization.from_json(manifest["modularization"]), manifest
    data = load_dataset("digits", min_input_size=32)
    # The paper's loss, not the default: bench/results/modules.md's figures were measured on
    # models trained with it.
    cfg = TrainConfig(arch=args.arch, width=args.width, epochs=args.epochs, device="cpu", seed=args.seed,
                      **PAPER_SETTINGS)
    result = train(cfg, data)
    mz = modularize(result.model, data, device="cpu")
    manifest = {"modularization": mz.to_json(), "test_acc": result.test_acc,
                "train_config": cfg.to_json(), "input_spec": data.spec.to_json()}
    if args.model_dir:
        save_artifact(args.model_dir, result.model, manifest)
    return result.model.cpu().eval(), mz, manifest


def flops_and_blocked(net: nn.Module, shape: tuple[int, ...], block: int) -> tuple[int, int]:
    """FLOPs of one image, and the same with every (ungrouped) conv's output channels rounded
    up to ``block``, from one counted forward pass."""
    extra: list[int] = []

    def hook(conv: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        assert isinstance(conv, nn.Conv2d)
        if conv.groups == 1:
            per_channel = 2 * out.shape[-2] * out.shape[-1] * conv.in_channels * conv.weight[0, 0].numel()
            extra.append(per_channel * (-conv.out_channels % block))

    # The hooks also keep every unit on its unfolded path, so each conv runs as a module.
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        flops = count_flops(net, shape)
    finally:
        for h in handles:
            h.remove()
    return flops, flops + sum(extra)


@torch.inference_mode()
def _latencies(nets: dict[str, nn.Module], shape: tuple[int, ...], batch: int, rounds: int,
               clock: Any) -> dict[str, float]:
    x = torch.randn(batch, *shape)  # NCHW, as images arrive
    times: dict[str, list[float]] = {k: [] for k in nets}
    for net in nets.values():  # warm-up: oneDNN primitive creation
        net(x)
        net(x)
    repeats = max(1, 64 // batch)  # small batches: time several calls per sample
    for _ in range(rounds):
        for name, net in nets.items():
            t0 = clock()
            for _ in range(repeats):
                net(x)
            times[name].append((clock() - t0) / repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    # One thread: the process's CPU time is its latency on an idle core, and does not
    # count the time other processes on a shared machine take the core away.
    use_cpu = args.clock == "cpu" or (args.clock == "auto" and args.threads == 1)
    clock = time.process_time if use_cpu else time.perf_counter
    model, mz, manifest = _trained(args)
    model.eval()
    cfg = manifest.get("train_config") or {}
    spec = InputSpec.from_json(manifest["input_spec"]) if manifest.get("input_spec") else None
    shape = (model.config["in_channels"], model.config["input_size"], model.config["input_size"])
    nets: dict[str, nn.Module] = {"model_nchw": model, "model": channels_last(copy.deepcopy(model))}
    krr: dict[str, float] = {}
    for classes in ([0], [0, 1, 2]):
        for gens in (True, False):
            key = f"module{len(classes)}_{'gen' if gens else 'static'}"
            nets[key] = extract_module(model, mz, classes, keep_mask_generators=gens)
            krr[key] = mz.krr_of(classes)
    every: list[str] = []
    if args.every_class:
        # Class 0's modules are already above; the others join the same rounds under their own keys.
        for c in range(mz.num_classes):
            for gens in (True, False):
                key = _class_key(c, gens)
                every.append(key)
                if key not in nets:
                    nets[key] = extract_module(model, mz, [c], keep_mask_generators=gens)
                    krr[key] = mz.krr_of([c])
    spec = spec or InputSpec(shape[0], shape[1], (0.5,) * shape[0], (0.5,) * shape[0])
    nets["compose3_gen"] = compose([Source(model, mz, [c], spec) for c in (0, 1, 2)])
    counted = {k: flops_and_blocked(n, shape, args.block) for k, n in nets.items()}
    flops = {k: c[0] for k, c in counted.items()}
    blocked = {k: c[1] for k, c in counted.items()}
    out: dict[str, Any] = {
        "arch": model.config.get("arch", cfg.get("arch")), "width": model.config.get("width"),
        "epochs": cfg.get("epochs"), "test_acc": manifest.get("test_acc"), "model_krr": mz.model_krr,
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "clock": "process CPU time" if use_cpu else "wall clock", "flops": flops, "krr": krr,
        "block": args.block, "blocked_flops": blocked,
        "batches": {},
    }
    for batch in args.batch:
        lat = _latencies(nets, shape, batch, args.rounds, clock)
        rows = {}
        for k in nets:
            lr, fr = lat[k] / lat["model"], flops[k] / flops["model"]
            rows[k] = {"latency_s": lat[k], "latency_ratio": lr, "flops_ratio": fr, "gap": lr - fr,
                       "blocked_flops_ratio": blocked[k] / blocked["model"]}
        out["batches"][str(batch)] = {k: rows[k] for k in nets if not k.startswith("class")}
        if every:
            out.setdefault("every_class", {})[str(batch)] = {k: rows[k] for k in every}
    modules = [k for k in nets if k.startswith(("module", "compose"))]
    b256 = out["batches"].get("256", next(iter(out["batches"].values())))
    out["targets"] = {
        "module1_latency_le_0.7": all(b256[k]["latency_ratio"] <= 0.7 for k in modules
                                      if k.startswith("module1")),
        "all_within_0.15_of_flops": all(abs(b256[k]["gap"]) <= 0.15 for k in modules),
    }
    if every:
        e256 = out["every_class"].get("256", next(iter(out["every_class"].values())))
        for gens in (True, False):
            tag = "gen" if gens else "static"
            keys = [_class_key(c, gens) for c in range(mz.num_classes)]
            out["targets"][f"classes_{tag}_le_0.7"] = sum(e256[k]["latency_ratio"] <= 0.7 for k in keys)
            out["targets"][f"classes_{tag}_within_0.15"] = sum(abs(e256[k]["gap"]) <= 0.15 for k in keys)
        out["targets"]["classes"] = mz.num_classes
    return out


def _class_key(c: int, gens: bool) -> str:
    """The key of class ``c``'s 1-class module; class 0's is the main table's ``module1_*``."""
    kind = "gen" if gens else "static"
    return f"module1_{kind}" if c == 0 else f"class{c}_{kind}"


def render(r: dict[str, Any], console: Console) -> None:
    for batch, rows in r["batches"].items():
        t = Table(title=f"{r['arch']} x{r['width']} ({r['epochs']} epochs, test acc {r['test_acc']:.3f}, "
                        f"model KRR {r['model_krr']:.2f}), CPU {r['threads']} thread(s), batch {batch}, "
                        f"{r['clock']}",
                  title_justify="left")
        for col in ("network", "KRR", "MFLOPs/img", "latency ms", "latency x", "FLOPs x", "gap",
                    f"FLOPs x, c_out to {r['block']}"):
            t.add_column(col, justify="right")
        for k, row in rows.items():
            t.add_row(k, f"{r['krr'][k]:.2f}" if k in r["krr"] else "", f"{r['flops'][k] / 1e6:.2f}",
                      f"{1000 * row['latency_s']:.2f}", f"{row['latency_ratio']:.2f}",
                      f"{row['flops_ratio']:.2f}", f"{row['gap']:+.2f}", f"{row['blocked_flops_ratio']:.2f}")
        console.print(t)
    for batch, rows in r.get("every_class", {}).items():
        t = Table(title=f"1-class module of every class, batch {batch} (latency x / FLOPs x, gap)",
                  title_justify="left")
        for col in ("class", "KRR", "with generators", "gap", "static", "gap", f"FLOPs x, c_out to {r['block']}"):
            t.add_column(col, justify="right")
        for c in range(r["targets"]["classes"]):
            gen, static = rows[_class_key(c, True)], rows[_class_key(c, False)]
            t.add_row(str(c), f"{r['krr'][_class_key(c, True)]:.2f}",
                      f"{gen['latency_ratio']:.2f} / {gen['flops_ratio']:.2f}", f"{gen['gap']:+.2f}",
                      f"{static['latency_ratio']:.2f} / {static['flops_ratio']:.2f}", f"{static['gap']:+.2f}",
                      f"{gen['blocked_flops_ratio']:.2f}")
        console.print(t)
    console.print(f"targets (batch 256): {r['targets']}")


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args, run, render, argv)


if __name__ == "__main__":
    sys.exit(main())
