import copy

import pytest
import torch

from mwt_core.models import create_model
from mwt_core.models.masking import set_keep
from mwt_core.slimming import SlimmingError, analyse, slim
from tests.support.nets import randomise_bn

ARCHS = ["simcnn", "rescnn", "vgg16", "resnet18"]


@pytest.mark.parametrize("arch", ARCHS)
def test_slimmed_module_equals_masked_model_with_dropped_kernels_zeroed(arch, digits32):
    torch.manual_seed(0)
    net = create_model(arch, 10, in_channels=3, input_size=32, width=0.25).eval()
    randomise_bn(net)
    keep = [torch.rand(u.out_channels) < 0.3 for u in net.mask_units()]
    classes = [3, 5, 8]
    module = slim(net, keep, classes=classes).eval()

    x = (digits32.test_x[:64].float() / 255 - 0.5) / 0.5  # real digit images
    set_keep(net.mask_units(), keep)
    with torch.no_grad():
        reference = net(x)[:, classes]
        out = module(x)
    set_keep(net.mask_units(), None)
    assert out.shape == (64, 3)
    assert torch.allclose(out, reference, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in module.parameters()) < 0.7 * sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("generators", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_channel_padding_keeps_values_and_rounds_cut_layers_to_the_multiple(arch, generators,
                                                                             digits32):
    torch.manual_seed(1)
    net = create_model(arch, 10, in_channels=3, input_size=32, width=0.25).eval()
    randomise_bn(net)
    keep = [torch.rand(u.out_channels) < 0.3 for u in net.mask_units()]
    plain = slim(net, keep, keep_mask_generators=generators, classes=[3, 5, 8]).eval()
    padded = slim(net, keep, keep_mask_generators=generators, classes=[3, 5, 8],
                  channel_multiple=8).eval()

    x = (digits32.test_x[:64].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        assert torch.allclose(padded(x), plain(x), atol=1e-5, rtol=0)
    full = {n: m.out_channels for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    cut = {n: m.out_channels for n, m in plain.named_modules() if isinstance(m, torch.nn.Conv2d)}
    grown = 0
    for name, m in padded.named_modules():
        if isinstance(m, torch.nn.Conv2d) and cut[name] < full[name]:
            # A cut layer grows to the next multiple of 8, or back to its full size.
            assert m.out_channels == min(-(-cut[name] // 8) * 8, full[name]), name
            grown += m.out_channels > cut[name]
    assert grown, "a random 30% keep must leave some layer off a multiple of 8"
    if arch in ("simcnn", "vgg16"):  # no residual ties: padding is zeroed by the weights alone
        assert all(u.keep is None for u in padded.mask_units())


@pytest.mark.parametrize("arch", ["rescnn", "resnet18"])
def test_residual_additions_share_one_channel_set(arch):
    net = create_model(arch, 10, width=0.25)
    graph = analyse(net)
    tied = [g for g in graph.groups if len(g.producers) > 1]
    assert tied, "residual architectures must tie producers across additions"
    keep = [torch.rand(u.out_channels) < 0.3 for u in net.mask_units()]
    module = slim(net, keep)
    for group in analyse(module).groups:
        sizes = {p.out_channels for p in group.producers}
        assert len(sizes) <= 1


def test_resnet_stem_stream_is_never_cut():
    net = create_model("resnet18", 10, width=0.25)
    keep = [torch.zeros(u.out_channels, dtype=torch.bool) for u in net.mask_units()]
    for k in keep:
        k[0] = True
    module = slim(net, keep)
    # The first stage's stream is fed by the unmasked stem: all its channels stay.
    assert module.stem.unit.out_channels == net.stem.unit.out_channels
    assert module.layers[0].conv1.unit.out_channels == 1


def test_dropping_generators_gives_static_module():
    net = create_model("simcnn", 10, width=0.25).eval()
    keep = [torch.rand(u.out_channels) < 0.5 for u in net.mask_units()]
    module = slim(net, keep, keep_mask_generators=False)
    assert all(u.gate is None for u in module.modules() if hasattr(u, "gate"))
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bad_keep_is_rejected():
    net = create_model("simcnn", 10, width=0.25)
    with pytest.raises(ValueError, match="masked units"):
        slim(net, [])
    keep = [torch.ones(u.out_channels, dtype=torch.bool) for u in net.mask_units()]
    keep[0] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool vector"):
        slim(net, keep)


def test_unsupported_op_is_reported():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = create_model("simcnn", 10, width=0.125)

        def forward(self, x):
            return torch.roll(self.inner.features(x), 1, dims=1).flatten(1)

    odd = Odd()
    odd.config = {"in_channels": 3, "input_size": 32}
    with pytest.raises(SlimmingError, match="roll"):
        analyse(odd)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("generators", [True, False])
def test_modules_run_channels_last_whatever_the_input_layout(in_channels, generators):
    # In NCHW, convs with slimmed channel counts (11, 37...) are slower on CPU than the
    # model's wider ones; in NHWC their time follows their FLOPs. A one-channel image is
    # both NCHW and NHWC, so the stem's weight must fix the layout, not the image.
    torch.manual_seed(0)
    net = create_model("simcnn", 10, in_channels=in_channels, input_size=32, width=0.25).eval()
    randomise_bn(net)
    keep = [torch.rand(u.out_channels) < 0.5 for u in net.mask_units()]
    module = slim(net, keep, keep_mask_generators=generators, classes=[2, 7]).eval()
    layouts = []
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: layouts.append(
                out.is_contiguous(memory_format=torch.channels_last) and out.stride(1) == 1))
    # The reference: the full net with the dropped kernels forced to zero (and, for a
    # static module, no generators: kept kernels always pass).
    reference_net = copy.deepcopy(net)
    units = reference_net.mask_units()
    set_keep(units, keep)
    if not generators:
        for u in units:
            u.gate = None
    x = torch.randn(4, in_channels, 32, 32)  # plain NCHW input, as a client sends it
    with torch.no_grad():
        out = module(x)
        reference = reference_net(x)[:, [2, 7]]
    assert layouts and all(layouts), layouts
    assert torch.allclose(out, reference, atol=1e-5, rtol=0)
