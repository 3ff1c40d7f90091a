import pytest
import torch

from mwt_core.models import (
    UnknownArchitecture,
    architecture_info,
    create_model,
    list_architectures,
)

ARCHS = ["simcnn", "rescnn", "vgg16", "resnet18"]


def test_all_four_registered():
    assert set(ARCHS) <= set(list_architectures())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("masked", [True, False])
def test_forward_shapes(arch, masked):
    net = create_model(arch, num_classes=7, in_channels=1, input_size=32, width=0.125, masked=masked)
    logits = net(torch.randn(3, 1, 32, 32))
    assert logits.shape == (3, 7)
    assert (len(net.mask_units()) > 0) == masked


@pytest.mark.parametrize("arch", ARCHS)
def test_masks_on_every_conv_but_the_first(arch):
    net = create_model(arch, num_classes=10, width=0.125)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(net.mask_units()) == len(convs) - 1
    _, masks = net.forward_with_masks(torch.randn(2, 3, 32, 32))
    assert [m.shape[1] for m in masks] == net.kernel_counts()


def test_width_multiplier_scales_params():
    small = create_model("simcnn", 10, width=0.25)
    big = create_model("simcnn", 10, width=0.5)
    assert sum(p.numel() for p in big.parameters()) > 3 * sum(p.numel() for p in small.parameters())


def test_config_rebuilds_same_structure():
    net = create_model("rescnn", 5, in_channels=1, input_size=40, width=0.25)
    clone = create_model(**net.config)
    assert net.state_dict().keys() == clone.state_dict().keys()


def test_resnet_takes_small_inputs_and_others_refuse():
    assert create_model("resnet18", 10, in_channels=1, input_size=8, width=0.125)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 32x32"):
        create_model("simcnn", 10, input_size=8)


def test_unknown_architecture_message():
    with pytest.raises(UnknownArchitecture, match="choose one of"):
        architecture_info("alexnet")
    assert architecture_info("VGG16-BN").name == "vgg16"


def test_a_config_without_a_width_takes_its_architectures_default():
    """TrainConfig's width is each architecture's own default, valid for it: a fixed-layout
    torchvision network trains at 1, a built-in at the default it declares."""
    from mwt_core.config import TrainConfig

    assert TrainConfig(arch="tv_mobilenet_v2").width == 1
    assert TrainConfig(arch="tv_mobilenet_v2", width=1).to_json()["width"] == 1

    from mwt_core.models import check_architecture, default_width, register_model

    for arch in list_architectures():
        info = architecture_info(arch)
        if info.unsupported is not None:
            continue
        assert TrainConfig(arch=arch).width == info.default_width == default_width(arch)
        check_architecture(arch, info.default_width)
    # A registration cannot declare a default its layout refuses.
    with pytest.raises(ValueError, match="default width"):
        register_model("fixed_but_scaled", min_input_size=8, description="x",
                       width_multiplier=False, default_width=0.5)(lambda **kw: None)
