"""Backbones and heads.

Backbones map images (B, C, H, W) to flat features (B, ``out_dim``).  The small ResNets and the
ConvNet here are sized for 8x8 to 96x96 images: up to 64x64 they use the CIFAR stem (3x3 conv,
stride 1, no max-pool); above it the ImageNet stem (7x7 stride 2 + max-pool).  Any torchvision
(``tv:resnet50``) or timm (``timm:vit_tiny_patch16_224``) model also works when installed.
"""

from pyssl.models.backbones import BasicBlock, ConvNet, ResNet
from pyssl.models.batchnorm import SplitBatchNorm
from pyssl.models.dino_head import DINOProjectionHead
from pyssl.models.errors import ModelError
from pyssl.models.heads import PredictionHead, ProjectionHead, SwaVPrototypes, linear_head, mlp_head
from pyssl.models.registry import BACKBONES, build_backbone, register_backbone
from pyssl.models.staged import StagedEncoder
from pyssl.models.text import TextTransformer
from pyssl.models.vit import TransformerBlock, ViT

__all__ = [
    "ResNet",
    "ConvNet",
    "BasicBlock",
    "BACKBONES",
    "build_backbone",
    "register_backbone",
    "StagedEncoder",
    "ProjectionHead",
    "PredictionHead",
    "SwaVPrototypes",
    "linear_head",
    "mlp_head",
    "DINOProjectionHead",
    "SplitBatchNorm",
    "ModelError",
    "TextTransformer",
    "ViT",
    "TransformerBlock",
]
