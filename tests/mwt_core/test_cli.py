"""The ``mwt`` command line, through typer's CliRunner (one tiny training per session)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mwt_core.artifacts import load_artifact, read_manifest, save_artifact
from mwt_core.cli import app, parse_classes
from mwt_core.models import create_model

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must hold one JSON line, got: {result.stdout!r}"
    return json.loads(lines[0])


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cli") / "run"
    summary = run_json(
        "train", "--arch", "simcnn", "--dataset", "digits", "--width", "0.125", "--epochs", "1",
        "--batch-size", "64", "--train-limit", "400", "--device", "cpu", "--out", out,
    )
    return out, summary


@pytest.fixture()
def model_copy(trained, tmp_path) -> Path:
    """A private copy of the trained model (for commands that rewrite it)."""
    dst = tmp_path / "model"
    shutil.copytree(trained[0] / "model", dst)
    return dst


@pytest.fixture(scope="session")
def standard_model(tmp_path_factory) -> Path:
    """An untrained standard (unmasked) model artifact: cheap, enough for error paths."""
    out = tmp_path_factory.mktemp("std") / "model"
    net = create_model("simcnn", 10, in_channels=3, input_size=32, width=0.125, masked=False)
    save_artifact(out, net, {"dataset": "digits", "class_names": [str(i) for i in range(10)]})
    return out


def test_train_writes_model_modules_and_manifest(trained):
    out, summary = trained
    for key in ("test_acc", "train_seconds", "krr", "cohesion", "coupling", "params", "flops"):
        assert isinstance(summary[key], float | int), key
    assert summary["modular"] is True and summary["tau"] == 0.9
    assert (out / "checkpoint" / "last.pt").is_file()
    manifest = read_manifest(out / "model")
    assert manifest["kind"] == "model" and manifest["dataset"] == "digits"
    assert manifest["class_names"] == [str(i) for i in range(10)]
    assert manifest["input_spec"]["size"] == 32 and manifest["input_spec"]["channels"] == 3
    assert manifest["train_config"]["width"] == 0.125 and manifest["train_config"]["epochs"] == 1
    for key in ("test_acc", "train_seconds", "krr", "cohesion", "coupling"):
        assert key in manifest["metrics"]
    assert manifest["modularization"]["tau"] == 0.9
    assert len(manifest["modularization"]["class_masks"]) == 10
    index = json.loads((out / "modules" / "index.json").read_text())
    assert [m["class"] for m in index] == list(range(10))
    module, mm = load_artifact(out / "modules" / index[3]["dir"])
    assert mm["kind"] == "module" and mm["classes"] == [3] and mm["class_names"] == ["3"]
    assert mm["source_model"]["sha256"] == manifest["sha256"]
    assert module.classes == [3]


def test_train_resumes_finished_run(trained):
    out, summary = trained
    again = run_json("train", "--width", "0.125", "--epochs", "1", "--batch-size", "64",
                     "--train-limit", "400", "--device", "cpu", "--out", out)
    assert again["epochs_run"] == 0
    assert again["test_acc"] == summary["test_acc"]
    assert again["params"] == summary["params"] and again["krr"] == summary["krr"]


def test_show_human_and_json(trained):
    out, _ = trained
    result = run("show", out / "model")
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout and "simcnn" in result.stdout
    data = run_json("show", out / "model")
    assert data["kind"] == "model" and data["sha256_verified"] is True
    assert data["metrics"]["krr"] == pytest.approx(read_manifest(out / "model")["metrics"]["krr"])


def test_extract_evaluate_module(trained, tmp_path):
    out, summary = trained
    dst = tmp_path / "m358"
    s = run_json("extract", out / "model", "--classes", "3,5,8", "--out", dst,
                 "--finetune-epochs", "1", "--device", "cpu")
    assert s["classes"] == [3, 5, 8] and s["class_names"] == ["3", "5", "8"]
    for key in ("krr", "accuracy", "zero_shot_acc", "finetuned_acc", "full_model_acc"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["params"] <= s["full_params"] and s["flops"] <= s["full_flops"]
    assert s["full_params"] == summary["params"]
    manifest = read_manifest(dst)
    assert manifest["kind"] == "module" and manifest["classes"] == [3, 5, 8]
    assert manifest["metrics"]["krr"] == pytest.approx(s["krr"])
    ev = run_json("evaluate", dst, "--device", "cpu")
    assert ev["kind"] == "module" and ev["classes"] == [3, 5, 8]
    assert ev["accuracy"] == pytest.approx(s["accuracy"])
    assert ev["samples"] < 360


def test_extract_human_output_without_mask_generators(trained, tmp_path):
    out, _ = trained
    result = run("extract", out / "model", "--classes", "1,0", "--out", tmp_path / "m10",
                 "--no-mask-generators", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for word in ("KRR", "accuracy", "parameters", "FLOPs"):
        assert word in result.stdout
    module, manifest = load_artifact(tmp_path / "m10")
    assert manifest["classes"] == [1, 0] and manifest["mask_generators"] is False
    assert not any(getattr(m, "gate", None) is not None for m in module.modules())


def test_evaluate_model_matches_training_accuracy(trained):
    out, summary = trained
    ev = run_json("evaluate", out / "model", "--device", "cpu")
    assert ev["kind"] == "model" and ev["samples"] == 360
    assert ev["accuracy"] == pytest.approx(summary["test_acc"])
    human = run("evaluate", out / "model", "--device", "cpu")
    assert human.exit_code == 0 and "accuracy" in human.stdout


def test_modularize_updates_manifest(model_copy, tmp_path):
    before = read_manifest(model_copy)
    weights_before = load_file(str(model_copy / "weights.safetensors"))
    s = run_json("modularize", model_copy, "--tau", "0.5", "--device", "cpu",
                 "--modules-out", tmp_path / "mods")
    assert s["tau"] == 0.5 and s["previous_tau"] == 0.9
    after = read_manifest(model_copy)
    assert after["modularization"]["tau"] == 0.5
    assert after["metrics"]["tau"] == 0.5 and after["metrics"]["krr"] == pytest.approx(s["krr"])
    weights_after = load_file(str(model_copy / "weights.safetensors"))
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    assert after["metrics"]["test_acc"] == before["metrics"]["test_acc"]
    assert len(json.loads((tmp_path / "mods" / "index.json").read_text())) == 10
    assert run("show", model_copy).exit_code == 0


def test_archs_and_datasets():
    archs = run_json("archs")
    assert {a["name"] for a in archs["architectures"]} >= {"simcnn", "rescnn", "vgg16", "resnet18"}
    ds = run_json("datasets")
    assert "digits" in [d["name"] for d in ds["datasets"]]
    for cmd, word in (("archs", "simcnn"), ("datasets", "digits")):
        result = run(cmd)
        assert result.exit_code == 0 and word in result.stdout


def test_parse_classes_accepts_indices_and_names():
    names = ["cat", "dog", "7", "bird"]
    assert parse_classes("1, 0", names) == [1, 0]
    assert parse_classes("bird,cat", names) == [3, 0]
    for bad, message in (("", "bad class list"), ("1,", "bad class list"), ("4", "out of range"),
                         ("-1", "out of range"), ("cow", "unknown class"), ("1,dog", "twice")):
        with pytest.raises(ValueError, match=message):
            parse_classes(bad, names)


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    with open(dst / "weights.safetensors", "ab") as fh:
        fh.write(b"tampered")
    return dst


def _error_cases(trained, standard_model, tmp_path):
    out, _ = trained
    model = out / "model"
    bad = _corrupt_copy(model, tmp_path / "bad")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    empty = tmp_path / "empty"
    empty.mkdir()
    return [
        (["train", "--arch", "nonet", "--out", tmp_path / "x"], "unknown architecture"),
        (["train", "--dataset", "nodata", "--out", tmp_path / "x"], "unknown dataset"),
        (["train", "--dataset", "cifar10", "--data-dir", empty, "--out", tmp_path / "x"], "not found"),
        (["train", "--epochs", "0", "--out", tmp_path / "x"], "epochs"),
        (["extract", model, "--classes", "3,12", "--out", tmp_path / "m"], "out of range"),
        (["extract", model, "--classes", "3,,5", "--out", tmp_path / "m"], "bad class list"),
        (["extract", model, "--classes", "three", "--out", tmp_path / "m"], "unknown class"),
        (["extract", model, "--classes", "3,3", "--out", tmp_path / "m"], "twice"),
        (["extract", standard_model, "--classes", "3", "--out", tmp_path / "m"], "no modularization"),
        (["extract", tmp_path / "nowhere", "--classes", "3", "--out", tmp_path / "m"], "does not exist"),
        (["modularize", standard_model], "without MwT"),
        (["modularize", model, "--tau", "1.5"], "tau"),
        (["evaluate", bad], "checksum mismatch"),
        (["extract", bad, "--classes", "1", "--out", tmp_path / "m"], "checksum mismatch"),
        (["show", bad], "checksum mismatch"),
        (["show", broken], "not valid JSON"),
        (["show", empty], "no manifest.json"),
        (["show", tmp_path / "nowhere"], "does not exist"),
        (["evaluate", tmp_path / "nowhere"], "does not exist"),
        (["evaluate", out / "modules" / "index.json"], "not a directory"),
    ]


def test_errors_are_one_clean_line(trained, standard_model, tmp_path):
    for args, message in _error_cases(trained, standard_model, tmp_path):
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert "Traceback" not in result.output, args
        err_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(err_lines) == 1, (args, result.stderr)
        assert message in err_lines[0], (args, err_lines[0])
        assert result.exception is None or isinstance(result.exception, SystemExit), args


def test_json_errors_leave_stdout_empty(tmp_path):
    result = run("train", "--arch", "nonet", "--out", tmp_path / "x", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: unknown architecture")


@pytest.mark.slow
def test_demo_tiny(tmp_path):
    s = run_json("demo", "--epochs", "1", "--width", "0.125", "--device", "cpu", "--out", tmp_path / "demo")
    assert s["module_classes"] == [3, 5, 8]
    for key in ("test_acc", "krr", "cohesion", "coupling", "module_krr", "module_acc",
                "module_params", "full_params", "module_flops", "full_flops"):
        assert key in s
    assert (tmp_path / "demo" / "module_3_5_8" / "manifest.json").is_file()
    human = run("demo", "--epochs", "1", "--width", "0.125", "--device", "cpu", "--out", tmp_path / "demo")
    assert human.exit_code == 0, human.output
    assert "KRR" in human.stdout and "cohesion" in human.stdout


def test_compose_across_two_model_dirs(trained, tmp_path, standard_model):
    second = tmp_path / "second"
    run_json("train", "--arch", "simcnn", "--dataset", "digits", "--width", "0.125", "--epochs", "1",
             "--batch-size", "64", "--train-limit", "400", "--device", "cpu", "--seed", "1",
             "--out", second)
    a, b = trained[0] / "model", second / "model"
    ts = tmp_path / "comp.pt"
    s = run_json("compose", f"{a}:3,5", f"{b}:8", "--out", tmp_path / "comp", "--calibrate", "5",
                 "--torchscript", ts, "--device", "cpu")
    assert s["class_names"] == ["3", "5", "8"] and s["calibration_samples"] == 15
    assert [src["classes"] for src in s["sources"]] == [[3, 5], [8]]
    from mwt_core.data.datasets import load_dataset

    test_y = load_dataset("digits").test_y
    assert s["test_samples"] == int(sum((test_y == c).sum() for c in (3, 5, 8)))
    assert 0 <= s["accuracy"] <= 1 and ts.is_file()
    net, manifest = load_artifact(tmp_path / "comp")
    assert manifest["kind"] == "composition" and manifest["sources"][1]["model_dir"] == str(b)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(ts))(x), net(x), atol=1e-5)
    # The same class name in two sources is told apart by the source's position.
    s = run_json("compose", f"{a}:3", f"{b}:3", "--out", tmp_path / "comp2", "--calibrate", "0",
                 "--combine", "raw")
    assert s["class_names"] == ["0:3", "1:3"] and s["accuracy"] == s["uncalibrated_accuracy"]
    assert s["combine"] == "raw" and load_artifact(tmp_path / "comp2")[1]["config"]["combine"] == "raw"
    for args, message in [
        ([f"{a}", "--out", tmp_path / "x"], "write MODEL_DIR:CLASSES"),
        ([f"{a}:3,12", "--out", tmp_path / "x"], "out of range"),
        ([f"{standard_model}:3", "--out", tmp_path / "x"], "no modularization"),
        ([f"{a}:3", "--out", tmp_path / "x", "--calibrate", "-1"], "--calibrate must be >= 0"),
        ([f"{a}:3", "--out", tmp_path / "x", "--combine", "vote"], "unknown --combine"),
        ([f"{a}:3", f"{b}:5", "--out", tmp_path / "x", "--calibrate", "0", "--combine", "head"],
         "calibration_per_class > 0"),
    ]:
        result = run("compose", *args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
