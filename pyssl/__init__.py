"""pyssl: fast self-supervised learning for PyTorch.

Fused C++/CUDA kernels (registered as ``torch.ops.pyssl.*``) behind drop-in loss modules.
"""

# Loading the extension makes it pyssl._C, as any submodule; without it, eager kernels stand in
# (pyssl._fallback, with an ExtensionMissingWarning).
from pyssl._extension import cuda_kernels_built, extension_loaded
from pyssl._lazy import __getattr__ as __getattr__  # the training stack, on first use
from pyssl._loader import ExtensionMissingWarning
from pyssl._version import __version__

# isort: split
# After the extension is loaded: pyssl.ops (imported by each of these) registers its autograd and
# fake kernels on its operators.
from pyssl import augment, losses, momentum, ops

__all__ = [
    "ops",
    "losses",
    "momentum",
    "augment",
    "cuda_kernels_built",
    "extension_loaded",
    "ExtensionMissingWarning",
    "__version__",
]
