"""Self-supervised methods behind one registry.

Each method is a small ``nn.Module`` with ``backbone`` (the encoder evaluated downstream) and
``training_step(batch) -> loss``; the trainer and the CLI only use that.  A new method registers
itself with ``@register("name")`` and is then built by ``build_method("name", **cfg)``.
"""

from __future__ import annotations

from collections.abc import Callable

from pyssl.methods.base import Method, MethodError

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str, **preset) -> Callable:
    """Class decorator: ``build_method(name, **cfg)`` builds ``cls(**preset, **cfg)``.
    The same class can be registered under several names with different presets."""

    def deco(cls):
        if name in _REGISTRY:
            raise MethodError(f"method {name!r} is already registered")

        def factory(**cfg):
            return cls(**{**preset, **cfg})

        factory.cls, factory.preset = cls, preset
        _REGISTRY[name] = factory
        return cls

    return deco


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str):
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r} (choose from {', '.join(available_methods())})")
    return _REGISTRY[name].cls


def method_preset(name: str) -> dict:
    method_class(name)
    return dict(_REGISTRY[name].preset)


def build_method(name: str, **cfg) -> Method:
    """Builds the registered method ``name``; unknown names and options raise ``MethodError``."""
    method_class(name)
    try:
        method = _REGISTRY[name](**cfg)
    except MethodError:
        raise
    except (TypeError, ValueError) as e:  # a bad option, also one rejected deeper down (augmentation, model)
        raise MethodError(f"method {name!r}: {e}") from None
    plain = (str, int, float, bool, type(None), tuple, list, dict)
    if all(isinstance(v, plain) for v in cfg.values()):  # enough to rebuild it from a checkpoint
        method.build_spec = {"name": name, "cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}
    return method


# Each method module registers itself when imported.
from pyssl.methods.clip import CLIP  # noqa: E402  (image-text pairs)
from pyssl.methods.moco import MoCo  # noqa: E402
from pyssl.methods.simclr import SimCLR  # noqa: E402

# isort: split
# Self-prediction pretext tasks (pyssl.pretext holds their transforms, colour space and nets).
from pyssl.methods.colorization import Colorization  # noqa: E402
from pyssl.methods.cpc import CPC  # noqa: E402
from pyssl.methods.inpainting import Inpainting  # noqa: E402
from pyssl.methods.jigsaw import Jigsaw  # noqa: E402
from pyssl.methods.relative_patch import RelativePatch  # noqa: E402
from pyssl.methods.rotnet import RotNet  # noqa: E402
from pyssl.methods.split_brain import SplitBrain  # noqa: E402
from pyssl.methods.video_colorization import VideoColorization  # noqa: E402

__all__ = [
    "Method",
    "MethodError",
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
