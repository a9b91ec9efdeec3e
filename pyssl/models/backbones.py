"""The built-in backbones: small ResNets and ConvNets sized for 8x8 to 96x96 images.

Up to 64x64 they use the CIFAR stem (3x3 conv, stride 1, no max-pool); above it the ImageNet
stem (7x7 stride 2 + max-pool).
"""

from __future__ import annotations

from torch import Tensor, nn

from pyssl.models.errors import ModelError
from pyssl.models.registry import register_backbone
from pyssl.models.staged import StagedEncoder


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(StagedEncoder, nn.Module):
    """ResNet of basic blocks.  ``stem="cifar"``: 3x3 conv stride 1, no max-pool (the CIFAR
    variant of SimCLR/MoCo papers); ``stem="imagenet"``: 7x7 conv stride 2 + 3x3 max-pool."""

    def __init__(self, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), in_channels: int = 3, stem: str = "cifar"):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ModelError(f"ResNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        w0 = widths[0]
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False),
                nn.BatchNorm2d(w0),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        blocks, cin = [], w0
        self._stage_container, self._stage_ends = "layers", []
        for i, (n, w) in enumerate(zip(layers, widths)):
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
            self._stage_ends.append(len(blocks) - 1)
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


class ConvNet(StagedEncoder, nn.Module):
    """A small VGG-like encoder: ``len(widths)`` stages of conv-BN-ReLU, each halving the image
    (the last stage pools globally).  Fast on a CPU; the demo's default."""

    def __init__(self, widths=(32, 64, 128), in_channels: int = 3):
        super().__init__()
        stages, cin = [], in_channels
        self._stage_container, self._stage_ends = "features", []
        for i, w in enumerate(widths):
            stages += [nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            stages += [nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                stages.append(nn.MaxPool2d(2))
            self._stage_ends.append(len(stages) - 1)  # a stage ends at its max-pool (the last at its ReLU)
            cin = w
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.features(x)).flatten(1)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ConvEncoder(StagedEncoder, nn.Module):
    """Conv stages; every stage after the first halves the resolution.

    Args:
        in_channels: image channels.
        widths: channels per stage.
        pool: global-average-pool the last map into ``(N, widths[-1])`` features.
        depth: conv layers per stage.
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64), pool: bool = True, depth: int = 1):
        super().__init__()
        layers, cin = [], in_channels
        self._stage_container, self._stage_ends = "features", []
        for i, w in enumerate(widths):
            layers.append(conv_bn_relu(cin, w, stride=1 if i == 0 else 2))
            layers += [conv_bn_relu(w, w) for _ in range(depth - 1)]
            self._stage_ends.append(len(layers) - 1)
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = pool
        self.in_channels = in_channels
        self.feature_dim = self.out_dim = widths[-1]
        self.downsample = 2 ** (len(widths) - 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map ``(N, widths[-1], H / downsample, W / downsample)``."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        return f.mean(dim=(2, 3)) if self.pool else f


def _resnet(layers, widths, in_channels: int, image_size: int, stem: str | None) -> ResNet:
    return ResNet(layers, widths, in_channels, stem or ("cifar" if image_size <= 64 else "imagenet"))


@register_backbone("resnet18")
def resnet18(in_channels=3, image_size=32, stem=None):
    return _resnet((2, 2, 2, 2), (64, 128, 256, 512), in_channels, image_size, stem)


@register_backbone("resnet34")
def resnet34(in_channels=3, image_size=32, stem=None):
    return _resnet((3, 4, 6, 3), (64, 128, 256, 512), in_channels, image_size, stem)


@register_backbone("resnet10-small")
def resnet10_small(in_channels=3, image_size=32, stem=None):
    return _resnet((1, 1, 1, 1), (32, 64, 128, 256), in_channels, image_size, stem)


@register_backbone("resnet-tiny")
def resnet_tiny(in_channels=3, image_size=32, stem=None):
    return _resnet((1, 1, 1), (16, 32, 64), in_channels, image_size, stem)


@register_backbone("convnet")
def convnet(in_channels=3, image_size=32, stem=None):
    return ConvNet((32, 64, 128), in_channels)


@register_backbone("convnet-small")
def convnet_small(in_channels=3, image_size=32, stem=None):
    return ConvNet((16, 32, 64), in_channels)


# The pretext methods' default: one conv per stage (16-32-64), so other methods can be compared
# with them on the same network.
@register_backbone("small")
def small(in_channels=3, image_size=32, stem=None):
    return ConvEncoder(in_channels, (16, 32, 64))
