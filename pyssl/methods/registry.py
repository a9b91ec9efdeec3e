"""The registry of methods: ``@register("name")`` on a class, ``build_method("name", **cfg)``."""

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
