"""The compiled extension pyssl._C, loaded once: pyssl.ops registers its autograd and fake
kernels on the operators it defines, so it is imported first.

Where the extension cannot be loaded (not built, or built against another torch), pyssl warns
once (:class:`ExtensionMissingWarning`, with the reason and how to build it) and defines the
same operators with eager PyTorch kernels (:mod:`pyssl._fallback`): everything runs, at eager
speed and memory. ``PYSSL_REQUIRE_EXTENSION=1`` makes a missing extension an ImportError
instead (the test suite sets it); ``PYSSL_NO_EXTENSION=1`` takes the fallback on purpose.
"""

import os
import warnings

import torch  # noqa: F401  (must be loaded before the extension)

from pyssl._loader import ExtensionMissingWarning, load_extension


def _load():
    """(the extension or None, why it is missing)."""
    if os.environ.get("PYSSL_NO_EXTENSION") == "1":
        return None, "PYSSL_NO_EXTENSION=1 is set"
    try:
        return load_extension(), ""
    except ImportError as err:
        if os.environ.get("PYSSL_REQUIRE_EXTENSION") == "1":
            raise
        return None, str(err)


_C, missing_reason = _load()

#: False when pyssl runs on its eager PyTorch kernels (see the module's docstring).
extension_loaded: bool = _C is not None
#: True when the CUDA kernels were compiled into this build.
cuda_kernels_built: bool = bool(_C.with_cuda) if extension_loaded else False

if not extension_loaded:
    warnings.warn(
        f"pyssl runs without its compiled kernels ({missing_reason}): every op falls back to eager "
        "PyTorch, correct but with the speed and memory of the unfused formulas (the N x N "
        "similarity matrix is materialised). Set PYSSL_REQUIRE_EXTENSION=1 to make this an error.",
        ExtensionMissingWarning,
        stacklevel=2,
    )
    from pyssl import _fallback

    _fallback.define_ops()
