"""Peak memory and time of modularization (DESIGN §1.3/§1.4) at scale, each in a fresh process.

Two measurements, each run in its own subprocess so that its peak resident set size
(``ru_maxrss``) belongs to it alone:

- ``images``: ``modularize`` of a model over ``--images`` images (the digit images tiled
  with random shifts up to that count), forward pass included;
- ``class``: the metrics (frequencies, masks, KRR, cohesion, coupling) of a synthetic
  activity where ONE class has ``--class-size`` samples (rows drawn independently, so
  nearly every row is unique: the worst case for cohesion's pairwise Jaccard mean).

Times are wall-clock and CPU seconds (CPU time is the steadier figure on a shared
machine). ``rss_before_mb`` is the process before modularization starts (interpreter, torch, data
or activity); ``peak_rss_mb`` its peak over the whole run. Prints a table, then one final
line of JSON.

    python bench/modularize_memory.py --model-dir /tmp/speed_models/simcnn
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from _main import bench_main
from rich.console import Console
from rich.table import Table

from mwt_core.config import ModularizeConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model-dir", default=None,
                   help="an mwt model artifact (trained); default: an untrained SimCNN x0.25")
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--class-size", type=int, default=100_000)
    p.add_argument("--tau", type=float, default=ModularizeConfig.tau)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=["images", "class"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _model(args: argparse.Namespace, in_channels: int) -> Any:
    from mwt_core.artifacts import load_artifact
    from mwt_core.models import create_model

    if args.model_dir:
        return load_artifact(args.model_dir)[0]
    return create_model("simcnn", 10, in_channels=in_channels, input_size=32, width=0.25)


def _part_images(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    from mwt_core.data.datasets import load_dataset
    from mwt_core.modularize import modularize

    digits = load_dataset("digits", min_input_size=32)
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randint(0, len(digits.train_y), (args.images,), generator=g)
    images = digits.train_x[pick]
    # Shift each image by up to 2 pixels so the tiled copies are not identical samples.
    shifts = torch.randint(-2, 3, (args.images, 2), generator=g)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            sel = ((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).nonzero().flatten()
            images[sel] = torch.roll(images[sel], (dy, dx), dims=(2, 3))
    data = replace(digits, train_x=images, train_y=digits.train_y[pick])
    model = _model(args, data.spec.channels)
    before = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    mz = modularize(model, data, tau=args.tau, device="cpu")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"n": args.images, "seconds": seconds, "cpu_seconds": cpu, "rss_before_mb": before, "peak_rss_mb": _peak_mb(),
            "kernels": sum(model.kernel_counts()), "model_krr": mz.model_krr, "cohesion": mz.cohesion}


def _part_class(args: argparse.Namespace) -> dict[str, Any]:
    from mwt_core.modularize import modularize_activity

    kernels = _model(args, 1).kernel_counts()
    g = torch.Generator().manual_seed(args.seed)
    n0, n1 = args.class_size, 1000  # one large class, one small one (coupling needs two)
    labels = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
    activity = []
    for k in kernels:
        rate = torch.rand(k, generator=g)  # each kernel's chance of being active
        activity.append(torch.rand(n0 + n1, k, generator=g) < rate)
    before = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    mz = modularize_activity(activity, labels, 2, args.tau)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    kept = sum(int(m.sum()) for m in mz.class_masks[0])
    return {"n": n0, "seconds": seconds, "cpu_seconds": cpu, "rss_before_mb": before, "peak_rss_mb": _peak_mb(),
            "kernels": sum(kernels), "kept_kernels": kept, "cohesion": mz.per_class_cohesion[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.part == "images":
        return _part_images(args)
    if args.part == "class":
        return _part_class(args)
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "tau": args.tau,
                           "model_dir": args.model_dir}
    for part in ("images", "class"):
        cmd = [sys.executable, __file__, "--part", part, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ValueError(f"{part} measurement failed: {proc.stderr.strip()[-500:]}")
        out[part] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def render(r: dict[str, Any], console: Console) -> None:
    if "images" not in r:  # a child: its JSON line is all the parent reads
        return
    t = Table(title=f"modularization memory (tau {r['tau']}, {r['torch_threads']} thread(s))",
              title_justify="left")
    for col in ("measurement", "samples", "kernels", "time s", "CPU s", "RSS before MiB", "peak RSS MiB"):
        t.add_column(col, justify="right")
    for part, label in (("images", "modularize (forward + metrics)"), ("class", "metrics, one class")):
        m = r[part]
        t.add_row(label, f"{m['n']:,}", str(m["kernels"]), f"{m['seconds']:.1f}", f"{m['cpu_seconds']:.1f}",
                  f"{m['rss_before_mb']:.0f}", f"{m['peak_rss_mb']:.0f}")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args, run, render, argv)


if __name__ == "__main__":
    sys.exit(main())
