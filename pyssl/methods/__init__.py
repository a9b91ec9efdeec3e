"""Self-supervised methods behind one registry.

Each method is a :class:`Method`: a ``backbone`` (the encoder evaluated downstream),
``training_step(batch) -> StepOutput(loss, metrics)`` and a ``spec`` (:class:`MethodSpec`) that
tells the trainer and the run configuration what it needs; methods with momentum teachers derive
from :class:`MomentumMethod`. A new method registers itself with ``@register("name")`` and is
then built by ``build_method("name", **cfg)`` or trained through :mod:`pyssl.config`.
"""

from pyssl.methods.base import Method, MethodError, StepOutput
from pyssl.methods.momentum_method import MomentumMethod
from pyssl.methods.registry import available_methods, build_method, method_class, method_preset, register
from pyssl.methods.spec import MethodSpec

# isort: split
# Each method module registers itself when imported.
from pyssl.methods.barlow_twins import BarlowTwins, VICReg
from pyssl.methods.byol import BYOL
from pyssl.methods.clip import CLIP  # image-text pairs
from pyssl.methods.dino import DINO  # multi-crop, a momentum teacher
from pyssl.methods.mae import MAE  # masked generation, on a ViT
from pyssl.methods.moco import MoCo
from pyssl.methods.mocov3 import MoCoV3
from pyssl.methods.simclr import SimCLR
from pyssl.methods.simsiam import SimSiam
from pyssl.methods.swav import SwAV

# isort: split
# Self-prediction pretext tasks (pyssl.pretext holds their transforms, colour space and nets).
from pyssl.methods.colorization import Colorization
from pyssl.methods.cpc import CPC
from pyssl.methods.inpainting import Inpainting
from pyssl.methods.jigsaw import Jigsaw
from pyssl.methods.relative_patch import RelativePatch
from pyssl.methods.rotnet import RotNet
from pyssl.methods.split_brain import SplitBrain
from pyssl.methods.video_colorization import VideoColorization

__all__ = [
    "Method",
    "MethodError",
    "MethodSpec",
    "StepOutput",
    "MomentumMethod",
    "register",
    "build_method",
    "available_methods",
    "method_class",
    "method_preset",
    "SimCLR",
    "MoCo",
    "MoCoV3",
    "BYOL",
    "SimSiam",
    "BarlowTwins",
    "VICReg",
    "MAE",
    "RotNet",
    "RelativePatch",
    "Jigsaw",
    "Inpainting",
    "Colorization",
    "SplitBrain",
    "VideoColorization",
    "CPC",
    "CLIP",
    "DINO",
    "SwAV",
]
