"""Starting a run from the user's own weights (safetensors state dicts, checked first)."""

import pickle
from dataclasses import replace

import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

from mwt_core.config import TrainConfig
from mwt_core.models import create_model
from mwt_core.models.weights import WeightsError, init_from, load_weights, read_weights


def _tv_resnet18(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(1)
    net = tvm.resnet18(weights=None, num_classes=num_classes).eval()
    for m in net.modules():  # trained-looking BN statistics, so a wrong mapping shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return net


def _save(state: dict[str, torch.Tensor], path) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_torchvision_state_dict_loads_and_computes_the_same(tmp_path):
    tv = _tv_resnet18()
    path = _save(tv.state_dict(), tmp_path / "r18.safetensors")
    for masked in (False, True):
        model = create_model("tv_resnet18", 10, in_channels=3, input_size=32, width=1, masked=masked)
        gate_before = {k: v.clone() for k, v in model.state_dict().items() if ".gate." in k}
        assert init_from(model, path) == len(tv.state_dict())
        # the generators were not touched by the load (fresh, MwT trains them)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in gate_before.items())
        model.eval()
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            if masked:  # every kernel on: the masked net is the plain one times its masks
                for u in model.mask_units():
                    u.gate = None
            assert torch.allclose(model(x), tv(x), atol=1e-5, rtol=0)


def test_a_models_own_state_dict_loads_with_fresh_generators(tmp_path):
    trained = create_model("simcnn", 10, width=0.125)
    with torch.no_grad():
        for p in trained.parameters():  # "trained": every tensor differs from a fresh model's
            p.add_(1.0)
    path = _save(trained.state_dict(), tmp_path / "own.safetensors")
    fresh = create_model("simcnn", 10, width=0.125)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    init_from(fresh, path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k] if ".gate." in k else trained.state_dict()[k]), k


def test_mismatched_shape_names_the_first_tensor(tmp_path):
    path = _save(_tv_resnet18(num_classes=1000).state_dict(), tmp_path / "imagenet.safetensors")
    model = create_model("tv_resnet18", 10, width=1)
    with pytest.raises(WeightsError, match=r"'fc.bias' has shape \[1000\], tv_resnet18 expects \[10\]"):
        init_from(model, path)


def test_unknown_and_missing_tensors_are_named(tmp_path):
    state = _tv_resnet18().state_dict()
    model = create_model("tv_resnet18", 10, width=1)
    with pytest.raises(WeightsError, match="'head.weight' is not a weight of tv_resnet18"):
        load_weights(model, {**state, "head.weight": torch.zeros(1)})
    del state["layer4.1.bn2.running_var"]
    with pytest.raises(WeightsError, match=r"lack 'net.layer4.1.conv2.bn.running_var'"):
        load_weights(model, state)


def test_files_are_size_checked_and_never_unpickled(tmp_path):
    pickled = tmp_path / "weights.safetensors"
    pickled.write_bytes(pickle.dumps({"fc.weight": [1.0]}))
    with pytest.raises(WeightsError, match="not a safetensors state dict"):
        read_weights(pickled)
    path = _save({"a": torch.zeros(1000)}, tmp_path / "big.safetensors")
    with pytest.raises(WeightsError, match="more than the 100 allowed"):
        read_weights(path, max_bytes=100)
    with pytest.raises(WeightsError, match="no weights file"):
        read_weights(tmp_path / "absent.safetensors")


@pytest.mark.slow
def test_training_starts_from_the_given_weights(tmp_path, digits32):
    from mwt_core.training import train

    tv = _tv_resnet18()
    path = _save(tv.state_dict(), tmp_path / "r18.safetensors")
    data = replace(digits32, train_x=digits32.train_x[:64], train_y=digits32.train_y[:64])
    # a learning rate so small that the weights barely move: the result shows the start
    cfg = TrainConfig(arch="tv_resnet18", width=1, epochs=1, batch_size=32, lr=1e-8, device="cpu",
                      init_from=path, augment=False)
    model = train(cfg, data).model
    start = tv.state_dict()["layer3.0.conv1.weight"]
    assert torch.allclose(model.state_dict()["net.layer3.0.conv1.conv.weight"], start, atol=1e-6)
    bad = replace(cfg, init_from=str(tmp_path / "absent.safetensors"))
    with pytest.raises(WeightsError, match="no weights file"):
        train(bad, data)
