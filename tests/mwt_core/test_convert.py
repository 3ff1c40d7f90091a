"""Conversion of torch.nn CNNs (torchvision's catalogue and hand-written ones) to MwT form."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from mwt_core.config import TrainConfig
from mwt_core.models import architecture_info, create_model, list_architectures
from mwt_core.models.catalogue import CATALOGUE, REFUSED
from mwt_core.models.convert import ConversionError, convert
from mwt_core.models.masking import ConvUnit, set_keep
from mwt_core.slimming import analyse, slim
from tests.support.nets import randomise_bn


def _assert_slim_exact(net, x: torch.Tensor, classes: list[int], fraction: float = 0.3) -> None:
    """Slimmed modules (with and without generators) equal the full masked net with the
    dropped kernels forced to zero (without generators: and every mask replaced by keep)."""
    net.eval()
    keep = [torch.rand(u.out_channels) < fraction for u in net.mask_units()]
    full = sum(p.numel() for p in net.parameters())
    # Padding to 8 channels (zeroed) must not change a value either, depthwise ties included.
    for generators, multiple in ((True, 1), (False, 1), (True, 8)):
        module = slim(net, keep, keep_mask_generators=generators, classes=classes,
                      channel_multiple=multiple).eval()
        reference = copy.deepcopy(net)
        set_keep(reference.mask_units(), keep)
        if not generators:
            for u in reference.mask_units():
                u.gate = None
        with torch.no_grad():
            expected = reference(x)[:, classes]
            out = module(x)
        assert out.shape == expected.shape
        assert expected.abs().max() > 1e-3  # a non-trivial output, so equality means something
        assert torch.allclose(out, expected, atol=1e-5, rtol=0), (out - expected).abs().max()
        assert sum(p.numel() for p in module.parameters()) < full


def _digits(digits32, n: int = 8) -> torch.Tensor:
    return (digits32.test_x[:n].float() / 255 - 0.5) / 0.5  # real digit images, 3 x 32 x 32


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CATALOGUE))
def test_catalogue_slims_exactly_on_real_digits(name, digits32):
    torch.manual_seed(0)
    net = create_model(f"tv_{name}", 10, in_channels=3, input_size=32, width=1)
    randomise_bn(net)
    units = net.mask_units()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(u, ConvUnit) for u in units) and units
    # every conv but the image's has a generator, except squeeze-and-excitation FC convs
    unit_convs = {id(u.conv) for u in net.modules() if isinstance(u, ConvUnit)}
    assert len(units) == len(unit_convs) - 1
    assert len(unit_convs) <= len(convs)
    _assert_slim_exact(net, _digits(digits32), classes=[1, 4, 7])


def test_catalogue_lists_each_requested_architecture_with_what_it_supports():
    names = set(list_architectures())
    wanted = ["resnet18", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_small",
              "efficientnet_b0", "densenet121", "regnet_y_400mf"]
    assert {f"tv_{n}" for n in wanted} <= names
    assert {"simcnn", "rescnn", "vgg16", "resnet18"} <= names  # the built-ins stay
    info = architecture_info("tv_mobilenet_v2")
    assert info.source == "torchvision" and not info.width_multiplier
    assert "depthwise" in info.features
    assert architecture_info("TV-MobileNet-V2") == info
    for name in REFUSED:
        assert architecture_info(f"tv_{name}").unsupported


def test_width_and_refused_architectures_fail_at_configuration():
    with pytest.raises(ValueError, match="set width to 1"):
        TrainConfig(arch="tv_resnet18", width=0.25)
    TrainConfig(arch="tv_resnet18", width=1)
    with pytest.raises(ValueError, match="LayerNorm"):
        TrainConfig(arch="tv_convnext_tiny", width=1)
    with pytest.raises(ValueError, match="LayerNorm"):
        create_model("tv_convnext_tiny", 10, width=1)


def test_unsupported_torchvision_ops_are_refused_naming_op_and_layer():
    import torchvision.models as tvm

    with pytest.raises(ConversionError, match=r"\.view\(\) at layer stage2\.0"):
        convert(tvm.get_model("shufflenet_v2_x1_0", num_classes=10), in_channels=3, input_size=32)
    with pytest.raises(ConversionError, match=r"\.permute\(\) at layer features\.0\.1"):
        convert(tvm.get_model("convnext_tiny", num_classes=10), in_channels=3, input_size=32)


class Rolled(nn.Module):
    """A CNN with a channel roll: channels move between positions, which slimming refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(self.body(self.stem(x)), 1, dims=1)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_unsupported_op_in_a_user_network_names_op_and_layer():
    with pytest.raises(ConversionError, match=r"roll at layer .*roll"):
        convert(Rolled(), in_channels=3, input_size=16)
    # nothing trainable without a conv after the first, nor a network fx cannot trace
    with pytest.raises(ConversionError, match="no convolution after the first"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)), in_channels=3,
                input_size=8)


class Mixed(nn.Module):
    """Dilation, conv bias, grouped and depthwise convs, GELU, concat, SE and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=True)  # no BN: bias stays
        self.act = nn.GELU()
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16),
                                     nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
                                nn.BatchNorm2d(32), nn.ReLU6())
        self.se_fc1 = nn.Conv2d(32, 8, 1)
        self.se_fc2 = nn.Conv2d(8, 32, 1)
        self.proj = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        a = self.act(self.dilated(s))
        b = self.grouped(s)
        y = self.dw(torch.cat([a, b], dim=1))
        gate = torch.sigmoid(self.se_fc2(torch.relu(self.se_fc1(self.pool(y)))))
        z = self.proj(y * gate) + a
        return self.fc(self.drop(torch.flatten(self.pool(z), 1)))


def test_hand_written_cnn_with_every_supported_layer_kind_slims_exactly():
    torch.manual_seed(0)
    net = convert(Mixed(), in_channels=1, input_size=16)
    net.config.update(num_classes=10)
    randomise_bn(net)
    inner = net.net
    assert isinstance(inner.stem[0], ConvUnit) and inner.stem[0].gate is None  # reads the image
    assert inner.stem[0].conv.in_channels == 1  # rebuilt for the data's channels
    assert isinstance(inner.stem[1], nn.Identity)  # its BN moved into the unit
    assert isinstance(inner.dilated, ConvUnit) and inner.dilated.conv.dilation == (2, 2)
    assert isinstance(inner.se_fc1, nn.Conv2d)  # squeeze-and-excitation convs stay plain
    assert len(net.mask_units()) == 4  # dilated, grouped, depthwise, proj
    x = torch.randn(6, 1, 16, 16)
    _assert_slim_exact(net, x, classes=[0, 3], fraction=0.5)

    keep = [torch.rand(u.out_channels) < 0.5 for u in net.mask_units()]
    module = slim(net, keep).net
    # a grouped conv's channels all stay (its mask zeroes them); a depthwise conv is cut
    # to the channels of its input, with as many groups
    assert module.grouped[0].conv.out_channels == 16
    assert module.dw[0].conv.groups == module.dw[0].conv.out_channels == module.dw[0].conv.in_channels
    assert module.se_fc2.out_channels == module.dw[0].conv.out_channels


@pytest.mark.slow
def test_converted_network_trains_and_modularizes(digits32):
    from mwt_core.modularize import modularize
    from mwt_core.training import train

    torch.manual_seed(0)
    data = replace(digits32, train_x=digits32.train_x[:128], train_y=digits32.train_y[:128])
    cfg = TrainConfig(arch="tv_mobilenet_v3_small", width=1, epochs=1, batch_size=64, device="cpu")
    result = train(cfg, data)
    model = result.model.cpu().eval()
    (epoch,) = result.history
    # the MwT losses ran on the converted units' masks: finite, and not the trivial values
    assert all(torch.isfinite(torch.tensor(epoch[k])) for k in ("loss", "cohesion_loss", "coupling_loss"))
    assert 0 < epoch["coupling_loss"] < 1 and epoch["kernel_rate"] is not None
    mod = modularize(model, data, device="cpu")
    assert len(mod.class_masks) == 10
    assert [m.numel() for m in mod.class_masks[0]] == model.kernel_counts()
    module = slim(model, mod.union([2, 5]), classes=[2, 5]).eval()
    reference = copy.deepcopy(model)
    set_keep(reference.mask_units(), mod.union([2, 5]))
    x = _digits(digits32, 16)
    with torch.no_grad():
        assert torch.allclose(module(x), reference(x)[:, [2, 5]], atol=1e-5, rtol=0)


def test_analysis_ties_depthwise_conv_to_its_input():
    net = create_model("tv_mobilenet_v2", 10, width=1)
    graph = analyse(net)
    dw_units = [u for u in net.mask_units() if u.conv.groups > 1]
    assert dw_units
    for g in graph.groups:
        dws = [p for p in g.producers if p.conv.groups > 1]
        # each depthwise unit shares its space with the unit (or stem) feeding it
        assert not dws or len(g.producers) > len(dws) or g.fixed
