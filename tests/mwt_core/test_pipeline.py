"""mwt_core.pipeline: one run of train -> modularize -> export, its progress and cancellation;
the shared helpers it brought together (class lists, checksums, defaults, accuracy)."""

import hashlib
import json

import pytest
import torch

from mwt_core.artifacts import load_artifact
from mwt_core.checksums import sha256_file
from mwt_core.config import LIMITS, TrainConfig
from mwt_core.data.classes import ClassListError, class_items, parse_classes, resolve_classes
from mwt_core.data.datasets import load_dataset
from mwt_core.evaluation import accuracy, class_recall
from mwt_core.pipeline import Layout, checkpoint_epoch, run_pipeline
from mwt_core.training import CHECKPOINT_NAME, TrainingCancelled


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic", num_train=120, num_test=40, num_classes=4, seed=3)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"width": 0.125, "epochs": 1, "batch_size": 32, "device": "cpu", **kw})


def test_pipeline_writes_model_and_modules_and_reports_phases(tiny, tmp_path):
    events = []
    layout = Layout(tmp_path / "model", tmp_path / "modules", tmp_path / "ckpt")
    r = run_pipeline(_cfg(), tiny, layout, dataset_ref="synthetic", progress=events.append)
    phases = [e.phase for e in events if e.training is None]
    assert phases[0] == "training" and phases.index("modularizing") < phases.index("saving")
    assert [e.info["module"] for e in events if "module" in e.info] == [1, 2, 3, 4]
    assert any(e.training is not None and e.training.test_acc is not None for e in events)
    net, manifest = load_artifact(layout.model_dir)
    assert manifest["sha256"] == r.manifest["sha256"] == sha256_file(layout.model_dir / "weights.safetensors")
    assert manifest["metrics"]["class_recall"] == r.metrics["class_recall"]
    # Validation accuracy (the slice of the training split) per epoch and at the end, and the
    # kernel budget asked and reached, land in the manifest (the registry's model card reads it).
    assert r.training.val_acc is not None and manifest["metrics"]["val_acc"] == r.training.val_acc
    assert 0 <= r.training.val_acc <= 1
    assert manifest["metrics"]["kernel_budget"] == r.training.budget
    assert manifest["metrics"]["kernel_budget"]["target_krr"] == TrainConfig.target_krr
    assert all(h["val_acc"] is not None for h in manifest["history"])
    # Every module names its source model by checksum and records its class's recall.
    assert [m.class_index for m in r.modules] == [0, 1, 2, 3]
    for m in r.modules:
        module, mm = load_artifact(m.dir)
        assert mm["source_model"]["sha256"] == manifest["sha256"] and mm["classes"] == [m.class_index]
        assert mm["metrics"]["accuracy"] == r.metrics["class_recall"][m.class_index]
        assert 0 < m.kept_kernels <= m.total_kernels
        # Timed beside the full model, per image, and written into the module's manifest.
        assert m.metrics["latency_ms"] > 0 and m.metrics["full_latency_ms"] > 0
        assert mm["metrics"]["latency_ms"] == m.metrics["latency_ms"]
    index = json.loads((layout.modules_dir / "index.json").read_text())
    assert [e["sha256"] for e in index] == [m.manifest["sha256"] for m in r.modules]
    assert (layout.checkpoint_dir / CHECKPOINT_NAME).is_file()


def test_pipeline_stops_between_modules_when_asked(tiny, tmp_path):
    seen = []

    def progress(ev):
        seen.append(ev)

    def stop() -> bool:  # stop once the second module is about to be written
        return any(e.info.get("module") == 2 for e in seen)

    layout = Layout(tmp_path / "model", tmp_path / "modules")
    with pytest.raises(TrainingCancelled):
        run_pipeline(_cfg(), tiny, layout, progress=progress, should_stop=stop)
    assert len(list(layout.modules_dir.iterdir())) == 1  # the first module only


def test_module_timing_stops_at_its_budget(tiny, tmp_path, monkeypatch):
    # A big network's modules must not hold the job: past the budget they are not timed.
    import mwt_core.pipeline as pipeline

    monkeypatch.setattr(pipeline, "EXPORT_LATENCY_BUDGET_S", 1e-9)
    r = run_pipeline(_cfg(), tiny, Layout(tmp_path / "model", tmp_path / "modules"))
    timed = ["latency_ms" in m.metrics for m in r.modules]
    assert timed == [True, False, False, False]  # the first one spends the whole budget


def test_checkpoint_for_other_settings_fails_or_restarts(tiny, tmp_path):
    layout = Layout(tmp_path / "model", None, tmp_path / "ckpt")
    run_pipeline(_cfg(modular=False), tiny, layout)
    assert checkpoint_epoch(tmp_path / "ckpt", _cfg(modular=False), restart_on_mismatch=False)[0] == 1
    with pytest.raises(ValueError, match="other settings"):
        checkpoint_epoch(tmp_path / "ckpt", _cfg(seed=1, modular=False), restart_on_mismatch=False)
    done, note = checkpoint_epoch(tmp_path / "ckpt", _cfg(seed=1, modular=False), restart_on_mismatch=True)
    assert done == 0 and "starting over" in note and not (tmp_path / "ckpt" / CHECKPOINT_NAME).exists()


def test_accuracy_and_recall_count_predictions():
    class Fixed(torch.nn.Module):  # predicts the label stored in the input's first value
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[0.0], [1.0], [2.0], [2.0], [0.0]])
    y = torch.tensor([0, 1, 1, 2, 2])
    assert accuracy(Fixed(), [(x[:3], y[:3]), (x[3:], y[3:])]) == pytest.approx(3 / 5)
    pred = x[:, 0].long()
    assert class_recall(pred, y, 4) == [1.0, 0.5, 0.5, 0.0]


def test_class_lists():
    names = ["cat", "dog", "7", "bird"]
    assert parse_classes("1, 0", names) == [1, 0]
    assert parse_classes("7", names) == [2]  # a class name wins over an index
    assert resolve_classes([3, "dog"], names) == [3, 1]
    assert class_items("3,cat") == [3, "cat"]
    for bad in ("²", "1,²", "٣"):  # str.isdigit() is true for these; int() is not the way in
        with pytest.raises(ClassListError, match="unknown class"):
            parse_classes(bad, names)
    with pytest.raises(ClassListError, match="no class named 'cow'"):
        resolve_classes(["cow"], names, owner="model 3")


def test_checksum_is_sha256(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()


def test_config_enforces_the_limits_the_api_publishes():
    with pytest.raises(ValueError, match="width"):
        TrainConfig(width=LIMITS.width * 2)
    with pytest.raises(ValueError, match="gamma"):
        TrainConfig(gamma=LIMITS.loss_weight + 1)
    TrainConfig(width=LIMITS.width)  # the bound itself is allowed
