"""How exactly a client rebuilds a composition of downloaded modules (issue 10, deliverable 2).

Trains two tiny MwT models on digits (SimCNN x0.125, 1 epoch, 256 images, seeds 0 and 1),
writes their per-class modules as the pipeline does, then

1. composes the ten modules (0-4 of the first model, 5-9 of the second) with each method in a
   fresh process per thread count, and reports the largest output difference on digits' test
   split against the first thread count (what the registry and a client with another thread
   count get);
2. adds a relative noise of ``--noise`` to the features and logits the fit sees (what another
   CPU's float32 convolutions may give) and reports how far the fitted outputs move.

    OMP_NUM_THREADS=1 python bench/compose_repro.py [--threads 1,2,3,4] [--noise 1e-7]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("raw", "scale_bias", "energy", "gauss", "gauss_map", "head", "gauss_head")


def export_modules(out: Path) -> list[Path]:
    from mwt_core.artifacts import save_artifact
    from mwt_core.data.datasets import load_dataset
    from mwt_core.modularize import modularize
    from mwt_core.pipeline import export_class_modules
    from mwt_core.training import TrainConfig, train

    data = load_dataset("digits", min_input_size=32)
    small = replace(data, train_x=data.train_x[:256], train_y=data.train_y[:256])
    dirs = []
    for seed, classes in ((0, range(5)), (1, range(5, 10))):
        cfg = TrainConfig(arch="simcnn", width=0.125, epochs=1, batch_size=64, seed=seed,
                          device="cpu")
        model = train(cfg, small).model
        mz = modularize(model, small, device="cpu")
        written = save_artifact(out / f"m{seed}" / "model", model, {
            "dataset": "digits", "dataset_ref": "digits", "input_spec": data.spec.to_json(),
            "class_names": list(data.class_names), "modularization": mz.to_json()})
        export_class_modules(model, mz, written, out / f"m{seed}" / "modules",
                             dirnames=[str(c) for c in range(10)])
        dirs += [out / f"m{seed}" / "modules" / str(c) for c in classes]
    return dirs


def outputs(dirs: list[str], method: str, noise: float = 0.0) -> torch.Tensor:
    """The composition's outputs on digits' test split (``noise``: on what the fit sees)."""
    import mwt_core.combine as combine
    from mwt_core.data.datasets import load_dataset
    from mwt_core.module_parts import compose_modules

    if noise:
        exact = combine._exact

        def noisy(part, logits, feats):  # type: ignore[no-untyped-def]
            z, f = exact(part, logits, feats)
            g = torch.Generator().manual_seed(1)

            def jitter(t: torch.Tensor) -> torch.Tensor:
                return t * (1 + noise * torch.randn(t.shape, generator=g, dtype=t.dtype))

            return jitter(z), (None if f is None else jitter(f))

        combine._exact = noisy
    try:
        net, _ = compose_modules(dirs, combine=method)
    finally:
        if noise:
            combine._exact = exact
    x = load_dataset("digits", min_input_size=32).test_x.float() / 255.0
    with torch.no_grad():
        return net(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2,3,4")
    p.add_argument("--noise", type=float, default=1e-7)
    p.add_argument("--child", nargs=3, metavar=("DIRS", "METHOD", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:  # one composition in a process of its own
        dirs, method, out = a.child
        torch.save(outputs(json.loads(dirs), method), out)
        return
    threads = [int(t) for t in a.threads.split(",")]
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [str(d) for d in export_modules(Path(tmp))]
        print(f"{'method':<12}{'max diff across threads ' + a.threads:>36}{'noise ' + str(a.noise):>18}")
        for method in METHODS:
            outs = []
            for t in threads:
                f = Path(tmp) / f"{method}-{t}.pt"
                env = {**os.environ, "OMP_NUM_THREADS": str(t), "PYTHONPATH": str(ROOT)}
                subprocess.run([sys.executable, __file__, "--child", json.dumps(dirs), method,
                                str(f)], env=env, check=True)
                outs.append(torch.load(f))
            across = max(float((o - outs[0]).abs().max()) for o in outs)
            moved = float((outputs(dirs, method, a.noise) - outs[0]).abs().max())
            result[f"{method}_threads_max_diff"] = across
            result[f"{method}_noise_max_diff"] = moved
            print(f"{method:<12}{across:>36.3g}{moved:>18.3g}")
    print(json.dumps({"threads": threads, "noise": a.noise, **result}))


if __name__ == "__main__":
    main()
