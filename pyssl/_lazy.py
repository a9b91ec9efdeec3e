"""The training stack is imported on first use (``pyssl.methods`` ...), so ``import pyssl`` stays
as light as the kernels alone: the package's module ``__getattr__`` (PEP 562)."""

import importlib

_LAZY_SUBMODULES = ("data", "models", "methods", "train", "eval", "cli")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"pyssl.{name}")
    raise AttributeError(f"module 'pyssl' has no attribute {name!r}")
