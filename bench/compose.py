"""Composing models that learned different classes (open set), on digits or ``--dataset``.

Trains, with one architecture, epochs and seed: (a) one model on all ten digits, (b) models
on 0-4 and 5-9, (c) on 0-3, 4-6 and 7-9, (d) five models on the pairs 0-1, ..., 8-9; then
composes a ten-class classifier from (b), (c) and (d) with every method of
``mwt_core.combine`` and measures it on the union of the test splits (``--holdout``: on a
held-out part of the training split, for choosing the method), plus a 3-class composition
from one model. Labelled images for the methods that need them come from the training split.

Prints a table, then exactly one final line of JSON.

    OMP_NUM_THREADS=1 python bench/compose.py --seeds 0 1 2 --width 0.25 --epochs 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _main import bench_main
from rich.console import Console
from rich.table import Table

from mwt_core.artifacts import load_artifact, save_artifact
from mwt_core.combine import (
    DEFAULT_COMBINE,
    DEFAULT_PER_CLASS,
    SETTINGS,
    ZERO_LABEL_METHODS,
    CombineSettings,
)
from mwt_core.compose import Source, class_subset, compose_and_measure, validation_union
from mwt_core.compose_options import AUTO_COMBINE, CHOICES
from mwt_core.config import PAPER_SETTINGS
from mwt_core.data.bundle import split_validation
from mwt_core.data.datasets import DatasetBundle, holdout, load_dataset
from mwt_core.models import MwTNet, architecture_info, default_width
from mwt_core.modularize import Modularization, modularize
from mwt_core.reuse import evaluate
from mwt_core.training import TrainConfig, train

SPLITS: dict[str, list[list[int]]] = {
    "single": [list(range(10))],
    "halves": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
    "thirds": [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]],
    "pairs": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]],
}
COMPOSED = ("halves", "thirds", "pairs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", default="digits",
                   help="a built-in ten-class data set (digits, digits28, synthetic) or .npz path")
    p.add_argument("--loss", choices=("default", "paper"), default="paper",
                   help="default: TrainConfig's defaults (kernel budget included); paper: the "
                        "paper's loss without a budget (PAPER_SETTINGS), which "
                        "bench/results/compose.md's figures used")
    p.add_argument("--arch", default="simcnn")
    p.add_argument("--width", type=float, default=None, help="default: the architecture's")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--budget", choices=("steps", "epochs"), default="steps",
                   help="steps: every source model gets the single model's optimiser steps "
                        "(epochs scaled by dataset size, capped by --max-epochs); epochs: every "
                        "model trains --epochs epochs (a 2-class model then gets a fifth of the "
                        "updates)")
    p.add_argument("--max-epochs", type=int, default=60,
                   help="cap on a source model's epochs under --budget steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=list(CHOICES), choices=list(CHOICES),
                   help=f"{AUTO_COMBINE}: the zero-label method that scores best on the source "
                        "models' validation slices (mwt_core.compose.choose_combine)")
    p.add_argument("--splits", nargs="+", default=list(COMPOSED), choices=list(COMPOSED),
                   help="which multi-model splits to compose (all three for the JSON targets)")
    p.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                   help="labelled training images per class for the methods that use labels")
    p.add_argument("--outlier-weight", type=float, default=0.0,
                   help="TrainConfig.outlier_weight of every model trained (0: off)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="measure on this stratified fraction of the training split instead of the "
                        "test split (for choosing the method and its settings)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override mwt_core.combine.CombineSettings fields for every composition "
                        "(e.g. head_weight_decay=0.01 head_standardise=own), to compare settings "
                        "on --holdout")
    p.add_argument("--timing-repeats", type=int, default=5,
                   help="compose calls timed for compose_p50_s (0: skip the timing)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (smoke tests)")
    p.add_argument("--cache", type=Path, default=None,
                   help="keep trained models here (safetensors) and reuse them on the next run")
    args = p.parse_args(argv)
    if args.width is None:
        args.width = default_width(args.arch)
    return args


def trained(cfg: TrainConfig, data: DatasetBundle, cache: Path | None
            ) -> tuple[MwTNet, Modularization, float]:
    """``train`` + ``modularize`` (the pipeline the service runs), cached by config and data."""
    key = hashlib.sha256(json.dumps(
        [cfg.to_json(), data.name, int(data.train_y.sum()), len(data.train_y), len(data.test_y)],
        sort_keys=True).encode()).hexdigest()[:16]
    where = cache / key if cache is not None else None
    if where is not None and (where / "manifest.json").is_file():
        net, manifest = load_artifact(where)
        return net, Modularization.from_json(manifest["modularization"]), manifest["train_seconds"]
    result = train(cfg, data)
    mod = modularize(result.model, data, device=cfg.device)
    if where is not None:
        save_artifact(where, result.model.cpu(), {"modularization": mod.to_json(),
                                                  "train_seconds": result.train_seconds})
    return result.model.cpu().eval(), mod, result.train_seconds


def budget_epochs(cfg: TrainConfig, n_full: int, n_subset: int, budget: str, max_epochs: int
                  ) -> int:
    """Epochs for a model trained on ``n_subset`` of the ``n_full`` training images.

    ``steps``: as many optimiser steps as the single model's ``cfg.epochs`` over all images
    (a model owner trains to convergence; with equal epochs a 2-class model on a fifth of the
    images gets a fifth of the updates and is under-trained, which is not what composition
    is meant to measure), at most ``max_epochs``. ``epochs``: ``cfg.epochs`` for every model.
    """
    if budget == "epochs" or n_subset >= n_full:
        return cfg.epochs
    return min(max_epochs, math.ceil(cfg.epochs * n_full / n_subset))


def sources_for(cfg: TrainConfig, data: DatasetBundle, groups: list[list[int]], cache: Path | None,
                budget: str = "epochs", max_epochs: int = 60
                ) -> tuple[list[Source], list[DatasetBundle], list[dict[str, Any]]]:
    """One trained, modularized model per class group; its module is all its classes."""
    sources, subs, info = [], [], []
    for g in groups:
        sub = class_subset(data, g)
        epochs = budget_epochs(cfg, len(data.train_y), len(sub.train_y), budget, max_epochs)
        net, mod, seconds = trained(replace(cfg, epochs=epochs), sub, cache)
        sources.append(Source(net, mod, list(range(len(g))), sub.spec, sub.class_names))
        subs.append(sub)
        info.append({"classes": g, "own_acc": evaluate(net, sub, device=cfg.device),
                     "krr": mod.model_krr, "train_s": seconds, "epochs": epochs})
    return sources, subs, info


def source_validation(cfg: TrainConfig, subs: list[DatasetBundle], groups: list[list[int]]
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sources' validation slices, as each training run held its slice out of its data
    (what ``combine="auto"`` chooses on)."""
    slices = [split_validation(sub, cfg.val_fraction, cfg.seed)[1] for sub in subs]
    return validation_union([None if v is None else (v, list(range(len(g))))
                             for v, g in zip(slices, groups, strict=True)])


def compose_timing(cfg: TrainConfig, data: DatasetBundle, cache: Path | None, repeats: int
                   ) -> dict[str, Any]:
    """Wall and CPU seconds of the service's compose call (``compose_and_measure`` with the
    default method and labelled images per class, as ``app.services.compose.build_across``
    calls it) across the halves models trained ``cfg.epochs`` epochs each (the issue's "two
    10-epoch models"), ``repeats`` times after one warm-up call; medians."""
    sources, subs, _ = sources_for(cfg, data, SPLITS["halves"], cache, "epochs")
    labels = [n for sub in subs for n in sub.class_names]
    validation = source_validation(cfg, subs, SPLITS["halves"])
    wall, cpu = [], []
    for i in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        compose_and_measure(sources, subs, DEFAULT_PER_CLASS, labels=labels, combine=DEFAULT_COMBINE,
                            validation=validation)
        if i:  # the first call pays one-off costs (allocator, lazy imports)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"compose_p50_s": statistics.median(wall), "compose_cpu_p50_s": statistics.median(cpu),
            "compose_wall_s": wall, "compose_cpu_s": cpu, "compose_torch_threads": torch.get_num_threads()}


def combine_settings(pairs: list[str]) -> CombineSettings:
    """``SETTINGS`` with ``FIELD=VALUE`` overrides (values cast to the field's type)."""
    out = SETTINGS
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep or not hasattr(SETTINGS, field):
            raise SystemExit(f"error: --set wants FIELD=VALUE with a CombineSettings field, got {pair!r}")
        out = replace(out, **{field: type(getattr(SETTINGS, field))(value)})
    return out


def _config(args: argparse.Namespace, seed: int) -> TrainConfig:
    """The training settings of every model of the run (``--loss``)."""
    loss = PAPER_SETTINGS if args.loss == "paper" else {}
    return TrainConfig(arch=args.arch, width=args.width, epochs=args.epochs, seed=seed,
                       device=args.device, outlier_weight=args.outlier_weight, **loss)


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = load_dataset(args.dataset, min_input_size=architecture_info(args.arch).min_input_size)
    if args.train_limit:
        base = replace(base, train_x=base.train_x[:args.train_limit],
                       train_y=base.train_y[:args.train_limit])
    data = holdout(base, args.holdout) if args.holdout else base
    settings = combine_settings(args.set)
    rows: list[dict[str, Any]] = []
    singles: list[dict[str, Any]] = []
    fit_s: list[float] = []
    for seed in args.seeds:
        cfg = _config(args, seed)
        (single,), (single_data,), (single_info,) = sources_for(cfg, data, SPLITS["single"],
                                                                 args.cache)
        # A 3-class composition from one model: its module, against the full model restricted.
        _, three = compose_and_measure([replace(single, classes=[3, 5, 8])], [single_data],
                                       0, combine="raw", device=args.device)
        singles.append({"seed": seed, "acc": single_info["own_acc"], "krr": single_info["krr"],
                        "tc358_acc": three["accuracy"],
                        "tc358_baseline": three["baseline_accuracy"]})
        for split in args.splits:
            sources, subs, info = sources_for(cfg, data, SPLITS[split], args.cache, args.budget,
                                              args.max_epochs)
            validation = source_validation(cfg, subs, SPLITS[split])
            for method in args.methods:
                t0 = time.perf_counter()
                _, m = compose_and_measure(sources, subs, args.per_class, combine=method,
                                           device=args.device, settings=settings,
                                           validation=validation)
                elapsed = time.perf_counter() - t0
                if split == "halves" and method == DEFAULT_COMBINE:
                    fit_s.append(m["fit_seconds"])
                rows.append({
                    "seed": seed, "split": split, "method": method, "chosen": m["combine"],
                    "acc": m["accuracy"],
                    "raw_acc": m["raw_accuracy"], "baseline_acc": m["baseline_accuracy"],
                    "single_acc": single_info["own_acc"],
                    "loss_vs_single": single_info["own_acc"] - m["accuracy"],
                    "labelled": m["calibration_samples"], "own_images": m["own_samples"],
                    "params": m["params"], "combine_params": m["combine_params"],
                    "flops": m["flops"], "latency_ms": m["latency_ms"], "compose_s": elapsed,
                    "sources_own_acc": [i["own_acc"] for i in info],
                    "sources_krr": [i["krr"] for i in info],
                    "sources_epochs": [i["epochs"] for i in info],
                })
    out = summarise(args, rows, singles)
    out["compose_fit_p50_s"] = statistics.median(fit_s) if fit_s else None
    out["compose_p50_s"] = None
    if args.timing_repeats > 0:
        cfg = _config(args, args.seeds[0])
        out.update(compose_timing(cfg, data, args.cache, args.timing_repeats))
    return out


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarise(args: argparse.Namespace, rows: list[dict[str, Any]], singles: list[dict[str, Any]]
              ) -> dict[str, Any]:
    """Means over seeds; the best method is ONE method for all splits (highest mean over them)."""
    out: dict[str, Any] = {
        "eval_split": f"holdout {args.holdout} of train" if args.holdout else "test",
        "dataset": args.dataset, "loss": args.loss,
        "seeds": args.seeds, "arch": args.arch, "width": args.width, "epochs": args.epochs,
        "budget": args.budget, "settings": args.set, "outlier_weight": args.outlier_weight,
        "single_acc": _mean([s["acc"] for s in singles]),
        "single_krr": _mean([s["krr"] for s in singles]),
        "tc358_acc": _mean([s["tc358_acc"] for s in singles]),
        "tc358_baseline_acc": _mean([s["tc358_baseline"] for s in singles]),
    }
    for split in args.splits:
        for method in args.methods:
            accs = [r["acc"] for r in rows if r["split"] == split and r["method"] == method]
            out[f"{split}_{method}_acc"] = _mean(accs)

    def overall(method: str) -> float:
        return _mean([out[f"{split}_{method}_acc"] for split in args.splits])

    out["best_method"] = max(args.methods, key=overall)
    zero = [m for m in args.methods if m in ZERO_LABEL_METHODS]
    out["zero_label_best_method"] = max(zero, key=overall) if zero else None
    out["default_method"] = DEFAULT_COMBINE
    out["samples_per_class"] = args.per_class
    out["singles"] = singles
    out["rows"] = rows
    return out


def render(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Composed ten-class {result.get('dataset', 'digits')} ({result['eval_split']}), "
                        f"{result['arch']} x{result['width']}, {result['epochs']} epochs (budget {result['budget']}); "
                        f"single model {result['single_acc']:.2%}")
    for col in ("seed", "split", "method", "acc", "raw", "modules vs models", "vs single",
                "labelled", "params (combine)", "MFLOPs", "ms/img"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        method = r["method"] if r["chosen"] == r["method"] else f"{r['method']} ({r['chosen']})"
        table.add_row(str(r["seed"]), r["split"], method, f"{r['acc']:.2%}",
                      f"{r['raw_acc']:.2%}", f"{r['baseline_acc']:.2%}",
                      f"{-r['loss_vs_single'] * 100:+.2f}", str(r["labelled"]),
                      f"{r['params']:,} ({r['combine_params']:,})", f"{r['flops'] / 1e6:.1f}",
                      f"{r['latency_ms']:.1f}")
    console.print(table)
    means = Table(title="Means over seeds " + ", ".join(map(str, result["seeds"])))
    means.add_column("method")
    splits = [s for s in COMPOSED if any(k.startswith(f"{s}_") for k in result)]
    for split in splits:
        means.add_column(split, justify="right")
    for method in sorted({r["method"] for r in result["rows"]}):
        means.add_row(method, *[f"{result[f'{s}_{method}_acc']:.2%} "
                                f"({(result[f'{s}_{method}_acc'] - result['single_acc']) * 100:+.2f})"
                                for s in splits])
    console.print(means)
    for s in result["singles"]:
        console.print(f"seed {s['seed']}: single model {s['acc']:.2%} (KRR {s['krr']:.3f}); "
                      f"3-class module [3,5,8] {s['tc358_acc']:.2%} vs model {s['tc358_baseline']:.2%}")
    console.print(f"best method {result['best_method']}, best zero-label "
                  f"{result['zero_label_best_method']}; compose p50 {result['compose_p50_s']} s wall, "
                  f"{result.get('compose_cpu_p50_s')} s CPU")


if __name__ == "__main__":
    raise SystemExit(bench_main(parse_args, run, render))
