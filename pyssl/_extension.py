"""The compiled extension pyssl._C, loaded once: pyssl.ops registers its autograd and fake
kernels on the operators it defines, so it is imported first."""

import torch  # noqa: F401  (must be loaded before the extension)

from pyssl._loader import load_extension

_C = load_extension()

#: True when the CUDA kernels were compiled into this build.
cuda_kernels_built: bool = bool(_C.with_cuda)
