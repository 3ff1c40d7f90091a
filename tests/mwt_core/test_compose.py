from dataclasses import replace

import pytest
import torch

from mwt_core.compose import (
    CompositionError,
    Source,
    accuracy,
    calibrate,
    compose,
    export_torchscript,
    labelled_union,
)
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

    path = export_torchscript(composed, tmp_path / "composed.pt", digits32.spec.shape)
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
