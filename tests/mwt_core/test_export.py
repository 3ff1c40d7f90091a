"""TorchScript and ONNX exports run in clean processes and reproduce in-process outputs.

The clean processes are ``python -I`` (no PYTHONPATH, no user site, no script directory):
the TorchScript one imports torch only, the ONNX one onnxruntime and numpy only, and each
checks that neither this project nor (for ONNX) torch was imported. Their inputs are real
digit test images, prepared from the raw 8x8 images by the input spec; the references are
the loaded artifacts run on the datasets' own preprocessed images, so the whole chain
(preparation, normalisation inside the export, the network) is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mwt_core.artifacts import load_artifact, save_artifact
from mwt_core.combine import fit
from mwt_core.compose import Source, calibrate, compose, composition_manifest, labelled_union
from mwt_core.data.datasets import load_dataset
from mwt_core.export import (
    ExportError,
    check_format,
    export,
    export_artifact,
    prepare_images,
    probabilities,
    read_export_metadata,
)
from mwt_core.modularize import modularize
from mwt_core.reuse import extract_module
from mwt_core.training import TrainConfig, train

TOLERANCE = 1e-4  # largest difference, relative to the largest output (at least 1)
N_IMAGES = 37  # not the batch size the exports were traced with (2): the batch axis is dynamic

TORCHSCRIPT_RUNNER = r"""
import json, sys
import torch
jobs = json.loads(sys.argv[1])
x = torch.load(jobs["input"], weights_only=True)
out = {}
for name, path in jobs["files"].items():
    extra = {"mwt.json": ""}
    net = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    with torch.no_grad():
        y = torch.cat([net(x[:1]), net(x[1:])])  # batch 1 and batch N-1
    torch.save(y, path + ".out")
    out[name] = json.loads(extra["mwt.json"])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("mwt_core", "app", "onnxruntime"))
print(json.dumps({"meta": out, "leaked": leaked}))
"""

ONNX_RUNNER = r"""
import json, sys
import numpy as np
import onnxruntime as ort
jobs = json.loads(sys.argv[1])
x = np.load(jobs["input"])
out = {}
for name, path in jobs["files"].items():
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    y = np.concatenate([sess.run(None, {feed: x[:1]})[0], sess.run(None, {feed: x[1:]})[0]])
    np.save(path + ".out.npy", y)
    meta = sess.get_modelmeta().custom_metadata_map
    out[name] = {"mwt": json.loads(meta["mwt.json"]), "class_names": json.loads(meta["class_names"]),
                 "input_shape": [str(d) for d in sess.get_inputs()[0].shape]}
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("mwt_core", "app", "torch"))
print(json.dumps({"meta": out, "leaked": leaked}))
"""


def _clean_run(script: str, jobs: dict, tmp: Path) -> dict:
    """Run ``script`` with ``python -I`` from an empty directory (nothing of this project on sys.path)."""
    r = subprocess.run(
        [sys.executable, "-I", "-c", script, json.dumps(jobs)],
        capture_output=True, text=True, timeout=300, cwd=tmp,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def digits_raw():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, digits32):
    """A model, modules with and without mask generators (one a single class), and
    cross-model compositions with and without mask generators, saved and loaded back."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export-artifacts")
    data = replace(digits32, train_x=digits32.train_x[:256], train_y=digits32.train_y[:256])
    sources = []
    for seed in (0, 1):
        cfg = TrainConfig(arch="simcnn", width=0.125, epochs=1, batch_size=64, device="cpu",
                          seed=seed, mask_lr=0.1)
        model = train(cfg, data).model.eval()
        sources.append(Source(model, modularize(model, data, device="cpu"), [], digits32.spec,
                              digits32.class_names))
    base = {"dataset": "digits", "input_spec": digits32.spec.to_json()}
    out: dict[str, Path] = {}
    save_artifact(root / "model", sources[0].model,
                  {**base, "class_names": list(digits32.class_names)})
    out["model"] = root / "model"
    for name, classes, keep in (("module", [3, 5, 8], True), ("module_nomg", [3, 5, 8], False),
                                ("module_1class", [7], True)):
        module = extract_module(sources[0].model, sources[0].modularization, classes, keep)
        save_artifact(root / name, module, {**base, "class_names": [str(c) for c in classes]})
        out[name] = root / name
    picks = [replace(sources[0], classes=[0, 1, 2, 3, 4]), replace(sources[1], classes=[5, 6, 7, 8, 9])]
    cal_x, cal_y = labelled_union([(digits32, p.classes) for p in picks], "train", per_class=5)
    for name, keep in (("composition", True), ("composition_nomg", False)):
        composed = calibrate(compose(picks, keep_mask_generators=keep), cal_x, cal_y, steps=20)
        labels = [str(c) for p in picks for c in p.classes]
        composed.labels = labels
        save_artifact(root / name, composed,
                      composition_manifest(digits32.spec, labels, [{"dataset": "digits"}] * 2, {},
                                           "test"))
        out[name] = root / name
    # gauss_map: its features come from a hook on a mid-depth conv unit (2x2 average pooling),
    # which the traced and ONNX graphs must carry along with the fitted buffers.
    gauss_map = compose(picks, combine="gauss_map")
    own = [labelled_union([(data, p.classes)], "train") for p in picks]
    fit(gauss_map, own, None)
    labels = [str(c) for p in picks for c in p.classes]
    gauss_map.labels = labels
    save_artifact(root / "composition_gauss_map", gauss_map,
                  composition_manifest(digits32.spec, labels, [{"dataset": "digits"}] * 2, {}, "test"))
    out["composition_gauss_map"] = root / "composition_gauss_map"
    return out


def test_prepare_images_matches_the_datasets_preprocessing(digits_raw, digits32):
    """Raw 8x8 test digits prepared by the 3x32x32 spec are the resized dataset's images."""
    x = prepare_images(list(digits_raw.test_x[:N_IMAGES]), digits32.spec)
    assert torch.equal(x, digits32.test_x[:N_IMAGES].float() / 255.0)
    # RGB in, grey spec: Pillow's luma weights; a large image shrinks to the spec's size.
    rgb = torch.zeros(3, 64, 48, dtype=torch.uint8)
    rgb[0] = 200
    grey = prepare_images([rgb], replace(digits_raw.spec, size=8))
    assert grey.shape == (1, 1, 8, 8) and torch.allclose(grey, torch.full_like(grey, 60 / 255))
    with pytest.raises(ExportError, match="C x H x W"):
        prepare_images([torch.zeros(2, 8, 8, dtype=torch.uint8)], digits_raw.spec)


@pytest.mark.slow
def test_exports_reproduce_outputs_in_clean_processes(artifacts, digits_raw, digits32, tmp_path):
    x = prepare_images(list(digits_raw.test_x[:N_IMAGES]), digits32.spec)
    torch.save(x, tmp_path / "x.pt")
    np.save(tmp_path / "x.npy", x.numpy())
    expected, metas = {}, {}
    files: dict[str, dict[str, str]] = {"torchscript": {}, "onnx": {}}
    for name, directory in artifacts.items():
        net, manifest = load_artifact(directory)
        with torch.no_grad():
            if manifest["kind"] == "composition":
                expected[name] = net(digits32.test_x[:N_IMAGES].float() / 255.0)
            else:
                expected[name] = net(digits32.spec.normalize(digits32.test_x[:N_IMAGES]))
        metas[name] = manifest
        files["torchscript"][name] = str(export(net, manifest, tmp_path / f"{name}.torchscript.pt",
                                                "torchscript"))
        files["onnx"][name] = str(export_artifact(directory, "onnx", tmp_path / f"{name}.onnx"))

    ts = _clean_run(TORCHSCRIPT_RUNNER, {"input": str(tmp_path / "x.pt"), "files": files["torchscript"]},
                    tmp_path)
    ox = _clean_run(ONNX_RUNNER, {"input": str(tmp_path / "x.npy"), "files": files["onnx"]}, tmp_path)
    assert ts["leaked"] == [] and ox["leaked"] == []

    diffs = {}
    for name, ref in expected.items():
        got_ts = torch.load(files["torchscript"][name] + ".out", weights_only=True)
        got_onnx = torch.from_numpy(np.load(files["onnx"][name] + ".out.npy"))
        assert got_ts.shape == got_onnx.shape == ref.shape
        # Relative to the outputs' scale: float32 resolves 1e-4 of logits near 1, not of the
        # logits in the thousands that a static module of a one-epoch model can give.
        scale = max(1.0, float(ref.abs().max()))
        diffs[name] = (float((got_ts - ref).abs().max()) / scale, float((got_onnx - ref).abs().max()) / scale)
        assert diffs[name][0] <= TOLERANCE and diffs[name][1] <= TOLERANCE, (name, diffs[name], scale)
        names = [str(n) for n in metas[name]["class_names"]]
        meta_ts, meta_onnx = ts["meta"][name], ox["meta"][name]
        assert meta_ts["class_names"] == names == meta_onnx["class_names"]
        assert meta_ts == meta_onnx["mwt"] == read_export_metadata(files["onnx"][name])
        assert meta_ts["input"]["shape"][1:] == [3, 32, 32]
        assert meta_onnx["input_shape"][0] == "N" and meta_onnx["input_shape"][1:] == ["3", "32", "32"]
        assert meta_ts["output"]["scoring"] == ("sigmoid" if len(names) == 1 else "softmax")
        assert meta_ts["source_sha256"] == metas[name]["sha256"]
    print("max abs diff (torchscript, onnx):", json.dumps(diffs))


def test_export_refuses_bad_formats_and_specless_manifests(artifacts, tmp_path):
    with pytest.raises(ExportError, match="torchscript, onnx"):
        check_format("pickle")
    net, manifest = load_artifact(artifacts["module"])
    with pytest.raises(ExportError, match="input_spec"):
        export(net, {k: v for k, v in manifest.items() if k != "input_spec"}, tmp_path / "m.onnx",
               "onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_probabilities_softmax_or_one_class_sigmoid():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(probabilities(logits).sum(1), torch.ones(2))
    one = torch.tensor([[3.0], [-3.0]])
    assert torch.allclose(probabilities(one), torch.sigmoid(one))  # not a softmax's constant 1.0


def test_mwt_export_command(artifacts, tmp_path):
    from typer.testing import CliRunner

    from mwt_core.cli import app

    runner = CliRunner()
    out = tmp_path / "module.onnx"
    r = runner.invoke(app, ["export", str(artifacts["module_1class"]), "--format", "onnx",
                            "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["out"] == str(out) and out.is_file()
    assert s["metadata"] == read_export_metadata(out)
    assert s["metadata"]["class_names"] == ["7"] and s["metadata"]["output"]["scoring"] == "sigmoid"
    bad = runner.invoke(app, ["export", str(artifacts["module"]), "--format", "pickle",
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "unknown export format 'pickle'" in bad.output
    missing = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 1 and "error:" in missing.output
