"""Modularity on several data sets: standard training, the paper's loss and the default.

For each data set and seed, three runs of the same architecture at equal epochs:

- ``standard``: no mask generators (the accuracy to match);
- ``paper``: MwT with the paper's loss weights and no kernel budget (``PAPER_SETTINGS``);
- ``default``: MwT with ``TrainConfig``'s defaults (the kernel budget, the validation slice
  and its accuracy guard).

Each MwT model is modularized at the fixed ``tau`` and measured: test accuracy, KRR and
coupling, the parameters of every one-class module and of three-class modules as a share
of the model's, and each three-class module's accuracy against the full model restricted
to the same classes (test split). Every seed is reported; the JSON line carries the means
of the default per data set (``<ds>_acc``, ``<ds>_krr`` ...) and the paper's
(``<ds>_paper_...``). The table also goes to ``--results``.

    python bench/modularity.py --datasets digits digits28 synthetic --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from _main import bench_main
from rich.console import Console
from rich.table import Table

from mwt_core.config import PAPER_SETTINGS, ModularizeConfig, TrainConfig
from mwt_core.data.datasets import holdout, load_dataset
from mwt_core.metrics import count_params
from mwt_core.models import architecture_info, default_width
from mwt_core.pipeline import run_pipeline
from mwt_core.reuse import evaluate, extract_module, restrict

# Epochs per data set where --epochs names none: enough for each to train to a useful
# model on a 2-core CPU in minutes (digits28 has ten times digits' images).
DEFAULT_EPOCHS = {"digits": 30, "digits28": 5, "synthetic": 5}
VARIANTS = ("standard", "paper", "default")
# Three-class sets measured, as offsets into the class list (every data set here has 10).
THREE_CLASS_SETS = ([3, 5, 8], [0, 1, 2], [4, 7, 9])
DEFAULT_RESULTS = Path(__file__).parent / "results" / "modularity.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_EPOCHS))
    p.add_argument("--arch", default=TrainConfig.arch)
    p.add_argument("--width", type=float, default=None, help="default: the architecture's")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs of every run (default per data set: {DEFAULT_EPOCHS})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tau", type=float, default=ModularizeConfig.tau)
    p.add_argument("--device", default=TrainConfig.device)
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (smoke tests)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="measure on this stratified fraction of the training split instead of "
                        "the test split (for choosing settings)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="TrainConfig fields of the default runs (to compare settings on --holdout)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="where the table is written")
    args = p.parse_args(argv)
    if args.width is None:
        args.width = default_width(args.arch)
    return args


def overrides(pairs: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs as TrainConfig fields (``none`` for None), checked by name."""
    out: dict[str, Any] = {}
    known = TrainConfig.__dataclass_fields__
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--set wants FIELD=VALUE with a TrainConfig field, got {pair!r}")
        try:  # numbers, true/false and null as JSON writes them; anything else is a string
            out[name] = None if text.lower() == "none" else json.loads(text)
        except json.JSONDecodeError:
            out[name] = text
    return out


def _variant(base: TrainConfig, name: str) -> TrainConfig:
    if name == "standard":
        return replace(base, modular=False)
    if name == "paper":
        return replace(base, **PAPER_SETTINGS)
    return base


def _measure(result: Any, data: Any, tau: float, device: str) -> dict[str, Any]:
    """Modularity figures of one MwT run (modularized at ``tau`` by the pipeline)."""
    model, mod = result.model, result.modularization
    full = count_params(model)
    k = data.num_classes
    module1 = [count_params(extract_module(model, mod, [c])) / full for c in range(k)]
    sets = [s for s in THREE_CLASS_SETS if max(s) < k]
    module3, gaps = [], []
    for classes in sets:
        module = extract_module(model, mod, classes)
        module3.append(count_params(module) / full)
        gaps.append(evaluate(restrict(model, classes, k), data, classes, device=device)
                    - evaluate(module, data, classes, device=device))
    budget = result.training.budget or {}
    return {"krr": mod.model_krr, "coupling": mod.coupling,
            "module1_params": statistics.mean(module1),
            "module1_params_max": max(module1),
            "module3_params": statistics.mean(module3), "module3_acc_gap": statistics.mean(gaps),
            "module3_acc_gap_max": max(gaps), "budget_relaxed": budget.get("relaxed"),
            "final_target": budget.get("final_target")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    err = Console(stderr=True)
    runs: list[dict[str, Any]] = []
    for ds in args.datasets:
        data = load_dataset(ds, min_input_size=architecture_info(args.arch).min_input_size)
        if args.train_limit is not None:
            data = replace(data, train_x=data.train_x[:args.train_limit],
                           train_y=data.train_y[:args.train_limit])
        if args.holdout:
            data = holdout(data, args.holdout)
        epochs = args.epochs or DEFAULT_EPOCHS.get(ds, 10)
        for seed in args.seeds:
            base = TrainConfig(arch=args.arch, width=args.width, epochs=epochs, seed=seed,
                               device=args.device, **overrides(args.set))
            for name in VARIANTS:
                cfg = _variant(base, name)
                with err.status(f"{ds} seed {seed}: {name} ({epochs} epochs)"):
                    result = run_pipeline(cfg, data, tau=args.tau)
                row: dict[str, Any] = {"dataset": ds, "seed": seed, "variant": name,
                                       "epochs": epochs, "acc": result.training.test_acc,
                                       "val_acc": result.training.val_acc,
                                       "train_s": result.training.train_seconds}
                if cfg.modular:
                    row.update(_measure(result, data, args.tau, args.device))
                runs.append(row)
                err.print(f"{ds} seed {seed} {name}: "
                          + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                      if isinstance(v, float)))
    out: dict[str, Any] = {"arch": args.arch, "width": args.width, "tau": args.tau,
                           "eval_split": f"holdout {args.holdout} of train" if args.holdout else "test",
                           "settings": args.set,
                           "seeds": args.seeds, "runs": runs}
    for ds in args.datasets:
        def mean(variant: str, key: str, ds: str = ds) -> float:
            return statistics.mean(r[key] for r in runs if r["dataset"] == ds and r["variant"] == variant)

        std_s = mean("standard", "train_s")
        out[f"{ds}_std_acc"] = mean("standard", "acc")
        for variant, prefix in (("default", ds), ("paper", f"{ds}_paper")):
            for key in ("acc", "krr", "coupling", "module1_params", "module3_params",
                        "module3_acc_gap"):
                out[f"{prefix}_{key}"] = mean(variant, key)
            out[f"{prefix}_train_s_ratio"] = mean(variant, "train_s") / std_s
    return out


def render(r: dict[str, Any], console: Console) -> None:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    table = Table(title=f"Modularity: {r['arch']} x{r['width']}, tau {r['tau']}, seeds "
                        f"{', '.join(map(str, r['seeds']))} ({r['eval_split']})", title_justify="left")
    for col in ("data set", "epochs", "seed", "training", "accuracy", "val. acc.", "KRR",
                "coupling", "1-class module", "3-class module", "3-class gap (pp)", "time s"):
        table.add_column(col, justify="left" if col in ("data set", "training") else "right")
    for row in r["runs"]:
        gap = row.get("module3_acc_gap")
        table.add_row(row["dataset"], str(row["epochs"]), str(row["seed"]), row["variant"],
                      pct(row["acc"]), pct(row["val_acc"]), num(row.get("krr")),
                      num(row.get("coupling")), num(row.get("module1_params")),
                      num(row.get("module3_params")), "-" if gap is None else f"{100 * gap:.2f}",
                      f"{row['train_s']:.0f}")
    console.print(table)
    means = Table(title="Means over seeds (module sizes: share of the model's parameters)",
                  title_justify="left")
    for col in ("data set", "training", "accuracy", "vs standard (pp)", "KRR", "coupling",
                "1-class", "3-class", "3-class gap (pp)", "time / standard"):
        means.add_column(col, justify="left" if col in ("data set", "training") else "right")
    for ds in dict.fromkeys(row["dataset"] for row in r["runs"]):
        means.add_row(ds, "standard", pct(r[f"{ds}_std_acc"]), "", "", "", "", "", "", "1.00")
        for prefix, label in ((f"{ds}_paper", "paper"), (ds, "default")):
            means.add_row(ds, label, pct(r[f"{prefix}_acc"]),
                          f"{100 * (r[f'{prefix}_acc'] - r[f'{ds}_std_acc']):+.2f}",
                          num(r[f"{prefix}_krr"]), num(r[f"{prefix}_coupling"]),
                          num(r[f"{prefix}_module1_params"]), num(r[f"{prefix}_module3_params"]),
                          f"{100 * r[f'{prefix}_module3_acc_gap']:.2f}",
                          f"{r[f'{prefix}_train_s_ratio']:.2f}")
    console.print(means)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def write_and_render(result: dict[str, Any], console: Console) -> None:
        render(result, console)
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as fh:
            fh.write("```\n")
            render(result, Console(file=fh, width=160, color_system=None))
            fh.write("```\n\nCommand: `python bench/modularity.py " + " ".join(argv or []) + "`\n")

    return bench_main(lambda _: args, run, write_and_render, argv)


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
