"""Compositions of module artifacts (mwt_core.module_parts): what a client composes from downloads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mwt_core.module_parts import compose_modules


@pytest.fixture(scope="module")
def exported(digits32, tmp_path_factory) -> Path:
    """A tiny MwT model on 256 digits and its per-class modules, as the pipeline writes them."""
    from mwt_core.artifacts import save_artifact
    from mwt_core.modularize import modularize
    from mwt_core.pipeline import export_class_modules
    from mwt_core.training import TrainConfig, train

    root = tmp_path_factory.mktemp("exported")
    small = replace(digits32, train_x=digits32.train_x[:256], train_y=digits32.train_y[:256])
    from mwt_core.config import PAPER_SETTINGS

    # Pinned to the paper's loss on every image (the model these tests were written on). On a
    # one-epoch model with the kernel budget's defaults the thread-count test below finds the
    # fitted states apart: an open finding, reported with issue 29, to be fixed in the fit.
    cfg = TrainConfig(arch="simcnn", width=0.125, epochs=1, batch_size=64, seed=0, device="cpu",
                      val_fraction=0.0, **PAPER_SETTINGS)
    model = train(cfg, small).model
    mz = modularize(model, small, device="cpu")
    written = save_artifact(root / "model", model, {
        "dataset": "digits", "dataset_ref": "digits", "input_spec": digits32.spec.to_json(),
        "class_names": list(digits32.class_names), "modularization": mz.to_json()})
    export_class_modules(model, mz, written, root / "modules", dirnames=[str(c) for c in range(10)])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", ["head", "gauss_head", "gauss_map"])
def test_the_fit_does_not_depend_on_the_thread_count(exported, method):
    """A one-class module's logits are a matrix-vector product whose float32 sum the BLAS
    splits by thread count; the fit must not inherit that (the registry and a client run
    different thread counts), so the fitted state is the same to the last bit."""
    dirs = [exported / "modules" / str(c) for c in range(10)]
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            net, _ = compose_modules(dirs, combine=method, calibration_per_class=20)
            states.append(net.state_dict())
    finally:
        torch.set_num_threads(before)
    diff = max(float((states[0][k].double() - states[1][k].double()).abs().max())
               for k in states[0] if states[0][k].numel())
    print(f"{method}: max |fitted state, 1 thread - 3 threads| = {diff:.3g}")
    assert diff == 0.0


def test_compose_local_mixes_module_directories_and_models(exported, tmp_path):
    from typer.testing import CliRunner

    from mwt_core.artifacts import load_artifact
    from mwt_core.cli import app

    module = exported / "modules" / "8"
    r = CliRunner().invoke(app, ["compose", f"{exported / 'model'}:3,5", str(module), "--out",
                                 str(tmp_path / "c"), "--combine", "raw", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["class_names"] == ["3", "5", "8"] and s["baseline_accuracy"] is None
    assert [src.get("module_dir") for src in s["sources"]] == [None, str(module)]
    net, manifest = load_artifact(tmp_path / "c")
    with torch.no_grad():  # raw: the downloaded module itself is the third output
        x = torch.rand(4, 1, 32, 32)
        part, _ = load_artifact(module)
        assert torch.allclose(net(x)[:, 2:], net.parts[1].__class__(part, net.parts[1].spec)(x))
    wrong = CliRunner().invoke(app, ["compose", str(exported / "model"), "--out", str(tmp_path / "d")])
    assert wrong.exit_code == 1 and "MODEL_DIR:CLASSES" in wrong.output


def test_a_model_is_not_a_module(exported):
    from mwt_core.compose import CompositionError

    with pytest.raises(CompositionError, match="not a module"):
        compose_modules([exported / "model"])
