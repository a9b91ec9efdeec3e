"""pyssl: fast self-supervised learning for PyTorch.

Fused C++/CUDA kernels (registered as ``torch.ops.pyssl.*``) behind drop-in loss modules.
"""

import torch  # noqa: F401  (must be loaded before the extension)

from pyssl._loader import load_extension as _load_extension

_C = _load_extension()

# After the extension is loaded: pyssl.ops (imported by each of these) registers its autograd and
# fake kernels.
from pyssl import augment, losses, momentum, ops  # noqa: E402

__version__ = "0.1.0"

#: True when the CUDA kernels were compiled into this build.
cuda_kernels_built: bool = bool(_C.with_cuda)

__all__ = ["ops", "losses", "momentum", "augment", "cuda_kernels_built", "__version__"]

# The training stack is imported on first use (``pyssl.methods`` ...), so ``import pyssl`` stays
# as light as the kernels alone.
_LAZY_SUBMODULES = ("data", "models", "methods", "train", "eval", "cli")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"pyssl.{name}")
    raise AttributeError(f"module 'pyssl' has no attribute {name!r}")
