from dataclasses import replace

import pytest
import torch

from mwt_core.compose import (
    CompositionError,
    Source,
    accuracy,
    calibrate,
    compose,
    identity_spec,
    labelled_union,
)
from mwt_core.export import export_torchscript
from mwt_core.modularize import modularize
from mwt_core.training import TrainConfig, train


@pytest.fixture(scope="module")
def two_models(digits32):
    data = replace(digits32, train_x=digits32.train_x[:256], train_y=digits32.train_y[:256])
    out = []
    for seed in (0, 1):
        cfg = TrainConfig(arch="simcnn", width=0.125, epochs=1, batch_size=64, device="cpu", seed=seed)
        model = train(cfg, data).model
        out.append(Source(model, modularize(model, data, device="cpu"), [], digits32.spec,
                          digits32.class_names))
    return out


def test_compose_across_models_calibrate_and_export(two_models, digits32, tmp_path):
    a, b = (replace(s, classes=c) for s, c in zip(two_models, ([0, 1], [7, 3]), strict=True))
    composed = compose([a, b])
    assert composed.labels == ["0:0", "0:1", "1:7", "1:3"]
    x, y = labelled_union([(digits32, [0, 1]), (digits32, [7, 3])])
    assert x.min() >= 0 and x.max() <= 1 and set(y.tolist()) == {0, 1, 2, 3}
    logits = composed(x[:8])
    assert logits.shape == (8, 4)
    before = accuracy(composed, x, y)
    xs, ys = labelled_union([(digits32, [0, 1]), (digits32, [7, 3])], split="train")
    calibrate(composed, xs[:80], ys[:80], steps=50)
    assert not torch.equal(composed.scale.detach(), torch.ones(2))
    assert 0.0 <= accuracy(composed, x, y) <= 1.0 and 0.0 <= before <= 1.0

    manifest = {"input_spec": identity_spec(digits32.spec).to_json(), "class_names": composed.labels}
    path = export_torchscript(composed, manifest, tmp_path / "composed.pt")
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.allclose(loaded(x[:8]), composed(x[:8]), atol=1e-5)


def test_compose_refuses_mismatched_inputs(two_models, digits):
    a = replace(two_models[0], classes=[0])
    b = replace(two_models[1], classes=[1], spec=digits.spec)
    with pytest.raises(CompositionError, match="input specs differ"):
        compose([a, b])
    with pytest.raises(CompositionError):
        compose([])


def test_calibrated_composition_round_trips_as_artifact(two_models, digits32, tmp_path):
    from mwt_core.artifacts import load_artifact, save_artifact
    from mwt_core.compose import ComposedClassifier, per_class_sample

    a, b = (replace(s, classes=c) for s, c in zip(two_models, ([2, 4], [9]), strict=True))
    composed = compose([a, b])
    xs, ys = labelled_union([(digits32, [2, 4]), (digits32, [9])], split="train", per_class=5)
    assert torch.bincount(ys).tolist() == [5, 5, 5] and xs.dtype == torch.float32
    again, _ = labelled_union([(digits32, [2, 4]), (digits32, [9])], split="train", per_class=5)
    assert torch.equal(xs, again)  # seeded
    assert per_class_sample(torch.tensor([0, 0, 1]), 5).tolist() == [0, 1, 2]  # fewer than asked
    calibrate(composed, xs, ys, steps=30)
    manifest = save_artifact(
        tmp_path / "comp", composed,
        {"note": "x", "metrics": {"sources": [{"model_id": 4, "classes": [2, 4], "krr": 0.5,
                                               "zero_training_accuracy": 1.0}]}},
    )
    assert manifest["kind"] == "composition" and len(manifest["config"]["parts"]) == 2
    loaded, read = load_artifact(tmp_path / "comp")
    assert isinstance(loaded, ComposedClassifier) and loaded.labels == composed.labels
    assert read["note"] == "x"
    x, _ = labelled_union([(digits32, [2, 4]), (digits32, [9])])
    with torch.no_grad():
        assert torch.allclose(loaded(x[:16]), composed(x[:16]), atol=1e-6)
        assert torch.equal(loaded.scale, composed.scale)

    from typer.testing import CliRunner

    from mwt_core.cli import app

    shown = CliRunner().invoke(app, ["show", str(tmp_path / "comp")], env={"COLUMNS": "160"})
    assert shown.exit_code == 0, shown.output
    assert "2 modules: simcnn x0.125, simcnn x0.125" in shown.output
    assert "source model 4" in shown.output and "verified" in shown.output
