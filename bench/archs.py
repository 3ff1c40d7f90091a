"""Every catalogued architecture converted to MwT: size, cost, slimming exactness, training.

Per architecture, on real digits resized to its minimum input size (32x32, 3 channels), or
with ``--dataset synthetic`` on CIFAR-shaped synthetic images (3x32x32):

- ``convert_s``: building and converting the masked model (trace, units, slimming check);
- params and FLOPs per image of the plain network and of its masked form (mask generators);
- ``slim_max_diff`` / ``static_max_diff``: largest absolute difference between a module
  slimmed to a random 30% of the kernels (3 classes) and the full masked model with the
  other kernels forced to zero, with and without mask generators (exact: < 1e-5);
- ``step_s``: median time of one MwT training step (forward with masks, the three losses,
  backward, SGD) at ``--batch`` images on this device;
- with ``--epochs`` > 0: that many MwT epochs on ``--train-limit`` training images, then test
  accuracy, KRR, coupling, and the 1-class / 3-class modules' params, FLOPs and latency
  (batch ``--batch``) as ratios of the full model.

Prints a table, then exactly one final line of JSON.

    OMP_NUM_THREADS=1 python bench/archs.py --device cpu
    python bench/archs.py --archs tv_resnet18,tv_mobilenet_v2 --epochs 3 --train-limit 1437
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch
from _main import bench_main
from rich.console import Console
from rich.table import Table

from mwt_core.config import PAPER_SETTINGS, TrainConfig
from mwt_core.data.datasets import load_dataset
from mwt_core.devices import resolve_device
from mwt_core.metrics import count_flops, count_params, measure_latency
from mwt_core.models import architecture_info, create_model, list_architectures
from mwt_core.models.masking import set_keep
from mwt_core.slimming import slim
from mwt_core.training import _loss_step, param_groups

CLASSES = {"module1": [0], "module3": [0, 1, 2]}


# "default": TrainConfig's, as every entry point takes them; "paper": the paper's loss and mask
# rate without a kernel budget (PAPER_SETTINGS), the reference a default is compared against.
LOSS_SETTINGS: dict[str, dict[str, Any]] = {"default": {}, "paper": dict(PAPER_SETTINGS)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--archs", default="", help="comma-separated names (default: every trainable tv_*; none: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    p.add_argument("--dataset", choices=("digits", "synthetic"), default="digits",
                   help="real digits (resized) or CIFAR-shaped synthetic images")
    p.add_argument("--epochs", type=int, default=0, help="MwT epochs (0: none)")
    p.add_argument("--train-limit", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-study", type=int, default=0, metavar="EPOCHS",
                   help="also: tv_resnet18 on digits, standard training for EPOCHS, then MwT from "
                        "those weights for EPOCHS/4 vs MwT from scratch for the same total epochs")
    p.add_argument("--init-lr", type=float, default=TrainConfig.lr,
                   help="network learning rate of the MwT run that starts from the weights")
    p.add_argument("--loss-settings", choices=sorted(LOSS_SETTINGS), default="default",
                   help="mask lr, loss weights and kernel budget of both MwT runs: TrainConfig's "
                        "defaults, or the paper's without a budget (PAPER_SETTINGS, mwt_core.config)")
    return p.parse_args(argv)


def _catalogue(names: str) -> list[str]:
    if names:
        out = [architecture_info(n.strip()).name for n in names.split(",") if n.strip()]
    else:
        out = [n for n in list_architectures() if architecture_info(n).source == "torchvision"]
    trainable = [n for n in out if architecture_info(n).unsupported is None]
    if not trainable:
        raise ValueError("no trainable architecture chosen")
    return trainable


def _max_diff(net: Any, keep: list[torch.Tensor], x: torch.Tensor, generators: bool) -> float:
    classes = CLASSES["module3"]
    module = slim(net, keep, keep_mask_generators=generators, classes=classes).eval()
    reference = copy.deepcopy(net).eval()
    set_keep(reference.mask_units(), keep)
    if not generators:
        for u in reference.mask_units():
            u.gate = None
    with torch.no_grad():
        return float((module(x) - reference(x)[:, classes]).abs().max())


def _step_seconds(net: Any, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    cfg = TrainConfig(arch=net.config["arch"], width=net.config["width"], device=str(x.device))
    net.train()
    opt = torch.optim.SGD(param_groups(net, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    forward = _loss_step(net, net.mask_units(), cfg, x.device, static_shapes=True)  # the loop's step
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = forward(x, y)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _trained(arch: str, data: Any, args: argparse.Namespace, shape: tuple[int, int, int]) -> dict[str, Any]:
    from mwt_core.modularize import modularize
    from mwt_core.training import train

    cfg = TrainConfig(arch=arch, width=1, epochs=args.epochs, batch_size=args.batch,
                      device=args.device, seed=args.seed)
    t0 = time.perf_counter()
    result = train(cfg, data)
    seconds = time.perf_counter() - t0
    model = result.model.eval()
    mod = modularize(model, data, device=args.device)
    out: dict[str, Any] = {"mwt_acc": result.test_acc, "krr": mod.model_krr, "coupling": mod.coupling,
                           "cohesion": mod.cohesion, "train_s": seconds}
    full_flops, full_params = count_flops(model, shape), count_params(model)
    full_latency = measure_latency(model, shape, batch=args.batch, device=args.device, repeats=5)
    for key, classes in CLASSES.items():
        module = slim(model, mod.union(classes), classes=classes).eval()
        out[f"{key}_krr"] = mod.krr_of(classes)
        out[f"{key}_params_ratio"] = count_params(module) / full_params
        out[f"{key}_flops_ratio"] = count_flops(module, shape) / full_flops
        out[f"{key}_latency_ratio"] = measure_latency(
            module, shape, batch=args.batch, device=args.device, repeats=5) / full_latency
    return out


def _init_study(args: argparse.Namespace) -> dict[str, Any]:
    """Standard training, then MwT from its weights vs MwT from scratch at equal total epochs."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from mwt_core.modularize import modularize
    from mwt_core.training import train

    arch = "tv_resnet18"
    data = load_dataset("digits", min_input_size=architecture_info(arch).min_input_size)
    data = replace(data, train_x=data.train_x[:args.train_limit], train_y=data.train_y[:args.train_limit])
    std_epochs, init_epochs = args.init_study, max(1, args.init_study // 4)
    base = {"arch": arch, "width": 1, "batch_size": args.batch, "device": args.device, "seed": args.seed}
    loss = LOSS_SETTINGS[args.loss_settings]
    out: dict[str, Any] = {"std_epochs": std_epochs, "init_epochs": init_epochs,
                           "scratch_epochs": std_epochs + init_epochs, "init_lr": args.init_lr,
                           "settings": args.loss_settings}
    t0 = time.perf_counter()
    std = train(TrainConfig(**base, epochs=std_epochs, modular=False), data)
    out.update(std_acc=std.test_acc, std_s=time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "std.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in std.model.state_dict().items()}, str(weights))
        runs = {"init": TrainConfig(**base, **loss, epochs=init_epochs, lr=args.init_lr,
                                    init_from=str(weights)),
                "scratch": TrainConfig(**base, **loss, epochs=std_epochs + init_epochs)}
        for key, cfg in runs.items():
            t0 = time.perf_counter()
            result = train(cfg, data)
            seconds = time.perf_counter() - t0
            mod = modularize(result.model, data, device=args.device)
            out.update({f"{key}_acc": result.test_acc, f"{key}_krr": mod.model_krr,
                        f"{key}_coupling": mod.coupling, f"{key}_s": seconds})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = _catalogue(args.archs) if args.archs != "none" else []
    dev = resolve_device(args.device)
    results: dict[str, Any] = {}
    for arch in names:
        size = architecture_info(arch).min_input_size
        data = load_dataset(args.dataset, min_input_size=size)
        data = replace(data, train_x=data.train_x[:args.train_limit], train_y=data.train_y[:args.train_limit])
        shape = (data.spec.channels, size, size)
        x = ((data.test_x[:args.batch].float() / 255 - 0.5) / 0.5).to(dev)
        y = data.test_y[:args.batch].long().to(dev)
        torch.manual_seed(args.seed)
        plain = create_model(arch, data.num_classes, in_channels=shape[0], input_size=size, width=1,
                             masked=False)
        t0 = time.perf_counter()
        net = create_model(arch, data.num_classes, in_channels=shape[0], input_size=size, width=1)
        convert_s = time.perf_counter() - t0
        r: dict[str, Any] = {
            "convert_s": convert_s, "masked_units": len(net.mask_units()),
            "plain_params": count_params(plain), "plain_flops": count_flops(plain, shape),
            "params": count_params(net), "flops": count_flops(net, shape),
        }
        del plain
        for m in net.modules():  # trained-looking BN statistics make the comparison bite
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        keep = [torch.rand(u.out_channels) < 0.3 for u in net.mask_units()]
        net.eval()
        r["slim_max_diff"] = _max_diff(net, keep, x.cpu(), generators=True)
        r["static_max_diff"] = _max_diff(net, keep, x.cpu(), generators=False)
        r["step_s"] = _step_seconds(net.to(dev), x, y, args.steps)
        del net
        if args.epochs > 0:
            r.update(_trained(arch, data, args, shape))
        results[arch] = r
    out = {"device": str(dev), "dataset": args.dataset, "batch": args.batch, "epochs": args.epochs,
           "train_limit": args.train_limit, "archs": results}
    if args.init_study > 0:
        out["init_study"] = _init_study(args)
    return out


def render(r: dict[str, Any], console: Console) -> None:
    if r["archs"]:
        _render_archs(r, console)
    if "init_study" in r:
        s = r["init_study"]
        t = Table(title=f"tv_resnet18 on digits: MwT from standard weights (lr {s['init_lr']:g}) vs from "
                        f"scratch, {s['settings']} loss settings", title_justify="left")
        for c in ("run", "epochs", "acc", "KRR", "coupling", "seconds"):
            t.add_column(c)
        t.add_row("standard", str(s["std_epochs"]), f"{s['std_acc']:.4f}", "", "", f"{s['std_s']:.0f}")
        for key, label in (("init", "MwT from its weights"), ("scratch", "MwT from scratch")):
            t.add_row(label, str(s[f"{key}_epochs"]), f"{s[f'{key}_acc']:.4f}", f"{s[f'{key}_krr']:.3f}",
                      f"{s[f'{key}_coupling']:.3f}", f"{s[f'{key}_s']:.0f}")
        console.print(t)


def _render_archs(r: dict[str, Any], console: Console) -> None:
    t = Table(title=f"conversion on {r['device']} (32x32 {r.get('dataset', 'digits')}, step at batch {r['batch']})",
              title_justify="left")
    for c in ("arch", "units", "params plain/MwT", "MFLOPs plain/MwT", "convert s", "slim diff",
              "static diff", "step s"):
        t.add_column(c)
    for arch, a in r["archs"].items():
        t.add_row(arch.removeprefix("tv_"), str(a["masked_units"]),
                  f"{a['plain_params'] / 1e6:.2f}M/{a['params'] / 1e6:.2f}M",
                  f"{a['plain_flops'] / 1e6:.1f}/{a['flops'] / 1e6:.1f}", f"{a['convert_s']:.2f}",
                  f"{a['slim_max_diff']:.1e}", f"{a['static_max_diff']:.1e}", f"{a['step_s']:.3f}")
    console.print(t)
    if r["epochs"] <= 0:
        return
    t = Table(title=f"{r['epochs']} MwT epochs on {r['train_limit']} {r.get('dataset', 'digits')} images; modules as ratios of the "
                    "model (params/FLOPs/latency)", title_justify="left")
    for c in ("arch", "acc", "KRR", "coupling", "train s", "1-class module", "3-class module"):
        t.add_column(c)
    for arch, a in r["archs"].items():
        t.add_row(arch.removeprefix("tv_"), f"{a['mwt_acc']:.3f}", f"{a['krr']:.3f}",
                  f"{a['coupling']:.3f}", f"{a['train_s']:.1f}", *(
                      f"{a[f'{k}_params_ratio']:.2f}/{a[f'{k}_flops_ratio']:.2f}/"
                      f"{a[f'{k}_latency_ratio']:.2f}" for k in CLASSES))
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args, run, render, argv)


if __name__ == "__main__":
    sys.exit(main())
