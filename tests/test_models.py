"""Backbones and heads: shapes for 8..96 px, the CIFAR stem, external backbones, bad names."""

import pytest
import torch
from torch import nn

from pyssl.models import (
    BACKBONES,
    ModelError,
    PredictionHead,
    ProjectionHead,
    ResNet,
    build_backbone,
    linear_head,
    mlp_head,
)


@pytest.mark.parametrize("name", ["small", "convnet-small", "resnet-tiny", "resnet10-small"])
@pytest.mark.parametrize("size", [8, 16, 33])
def test_small_backbones_any_size(name, size):
    net = build_backbone(name, in_channels=3, image_size=size)
    out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, net.out_dim)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_one_channel_and_96px_imagenet_stem():
    net = build_backbone("resnet-tiny", in_channels=1, image_size=96)
    assert isinstance(net.stem[-1], nn.MaxPool2d)  # ImageNet stem above 64 px
    assert net(torch.randn(2, 1, 96, 96)).shape == (2, 64)


def test_resnet18_cifar_variant():
    net = build_backbone("resnet18", image_size=32)
    conv = net.stem[0]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert net.out_dim == 512
    n_params = sum(p.numel() for p in net.parameters())
    assert 11_000_000 < n_params < 11_300_000  # the usual 11.2M of ResNet-18 without fc


def test_torchvision_backbone_by_name():
    pytest.importorskip("torchvision")
    net = build_backbone("tv:resnet18", image_size=32)
    assert net.out_dim == 512 and net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_unknown_backbones():
    with pytest.raises(ModelError, match="unknown backbone"):
        build_backbone("resnet999")
    with pytest.raises(ModelError, match="torchvision has no model"):
        build_backbone("tv:not_a_model")
    with pytest.raises(ModelError, match="stem"):
        ResNet(stem="weird")


def test_heads():
    x = torch.randn(4, 32)
    lin = linear_head(32, 16)
    assert len(lin) == 1 and lin(x).shape == (4, 16)
    v2 = mlp_head(32, 64, 16)
    assert [type(m) for m in v2] == [nn.Linear, nn.ReLU, nn.Linear]
    simclr = ProjectionHead(32, 64, 16, num_layers=2, batch_norm=True)
    assert [type(m) for m in simclr] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    three = ProjectionHead(32, 64, 16, num_layers=3, last_bn=True)
    assert three(x).shape == (4, 16) and isinstance(three[-1], nn.BatchNorm1d)
    pred = PredictionHead(16, 32, 16)
    assert pred(torch.randn(4, 16)).shape == (4, 16)
    with pytest.raises(ModelError):
        ProjectionHead(32, num_layers=0)


def test_registry_lists_backbones():
    assert {"resnet18", "resnet34", "convnet"} <= set(BACKBONES)


@pytest.mark.parametrize(
    "name,channels,stride",
    [
        ("small", 32, 2),  # ConvEncoder 16-32-64: stage 1 halves once
        ("convnet-small", 32, 4),  # ConvNet 16-32-64: stage 1 ends with its second max-pool
        ("resnet18", 256, 4),  # CIFAR ResNet-18: layer3
        ("resnet-tiny", 32, 2),
    ],
)
def test_middle_layer_is_the_second_to_last_stage(name, channels, stride):
    from pyssl.eval import extract_features, middle_layer

    net = build_backbone(name, in_channels=3, image_size=32)
    layer = middle_layer(net)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    seen = []
    handle = dict(net.named_modules())[layer].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    extract_features(net, images, lambda x: x.float() / 255)
    handle.remove()
    assert seen == [(2, channels, 32 // stride, 32 // stride)]
    assert extract_features(net, images, lambda x: x.float() / 255, layer=layer, grid=2).shape == (2, 4 * channels)


def test_middle_layer_of_an_unstaged_encoder_is_none():
    from pyssl.eval import middle_layer

    assert middle_layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())) is None
