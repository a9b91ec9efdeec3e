"""Self-supervised methods behind one registry.

Each method is a small ``nn.Module`` with ``backbone`` (the encoder evaluated downstream) and
``training_step(batch) -> loss``; the trainer and the CLI only use that.  A new method registers
itself with ``@register("name")`` and is then built by ``build_method("name", **cfg)``.
"""

from pyssl.methods.base import Method, MethodError
from pyssl.methods.registry import available_methods, build_method, method_class, method_preset, register
from pyssl.methods.spec import MethodSpec

# isort: split
# Each method module registers itself when imported.
from pyssl.methods.clip import CLIP  # image-text pairs
from pyssl.methods.moco import MoCo
from pyssl.methods.simclr import SimCLR

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
    "register",
    "build_method",
    "available_methods",
    "method_class",
    "method_preset",
    "SimCLR",
    "MoCo",
    "RotNet",
    "RelativePatch",
    "Jigsaw",
    "Inpainting",
    "Colorization",
    "SplitBrain",
    "VideoColorization",
    "CPC",
    "CLIP",
]
