"""pyssl's CUDA kernels on the CPU: their own sources, run by an emulator of the CUDA model.

The emulation build (``PYSSL_CUDA_EMULATE=ON``, which ``make`` uses) compiles ``csrc/*/cuda``
as host C++ against ``csrc/emu``: a block's threads run as fibers that meet at every barrier
and warp collective, in an order drawn from a seed, on the limits of an H200. The ops register
on CPU tensors as ``torch.ops.pyssl_emu.*`` with the schemas of ``torch.ops.pyssl.*``; what a
GPU would hang or crash on (a barrier part of a block skips, warp collectives with mismatched
masks, reads past a buffer or of unwritten shared memory, launch limits) raises an error naming
the kernel, block and source line. It is slow (a few million emulated thread switches per
second): for tests and debugging, not for training.

    import pyssl.emulation as emu
    with emu.cuda_emulated():            # pyssl's losses / augmentations take the CUDA kernels
        loss = pyssl.losses.NTXentLoss()(z0, z1)   # CPU tensors
"""
from __future__ import annotations

import contextlib
import glob
import os

import torch

from pyssl import ops as _ops_module

_loaded = False


def library_path() -> str | None:
    """The emulation library beside pyssl's extension, or None when it was not built."""
    here = os.path.dirname(os.path.abspath(_ops_module.__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C_emu*.so")))
    if not candidates:
        import pyssl._C as ext

        candidates = sorted(glob.glob(os.path.join(os.path.dirname(ext.__file__), "_C_emu*.so")))
    return candidates[0] if candidates else None


def available() -> bool:
    return library_path() is not None


def load() -> None:
    """Loads the emulated ops (``torch.ops.pyssl_emu``) once; raises if they were not built."""
    global _loaded
    if _loaded:
        return
    path = library_path()
    if path is None:
        raise ImportError(
            "pyssl's CUDA emulator was not built: rebuild with PYSSL_CUDA_EMULATE=ON "
            "(`make build` does) to run the CUDA kernels on the CPU"
        )
    torch.ops.load_library(path)
    built = torch.ops.pyssl_emulator.torch_version()
    if built.split("+")[0].split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        raise ImportError(f"{path} was built against torch {built} but torch {torch.__version__} is imported")
    _ops_module.register_library("pyssl_emu")
    # The MoCo backward needs no kernel of its own on either device (device-generic ATen code).
    torch.library.impl("pyssl_emu::moco_backward", "CPU")(
        lambda grad_loss, query, key, lse, expected_queue, temperature: torch.ops.pyssl.moco_backward(
            grad_loss, query, key, lse, expected_queue, temperature
        )
    )
    _loaded = True


def ops():
    """``torch.ops.pyssl_emu``: the CUDA kernels' ops on CPU tensors."""
    load()
    return torch.ops.pyssl_emu


def set_seed(seed: int) -> None:
    """Seed of the order in which emulated threads and blocks run."""
    load()
    torch.ops.pyssl_emulator.set_seed(int(seed) % 2**63)


def launch_count() -> int:
    load()
    return int(torch.ops.pyssl_emulator.launch_count())


@contextlib.contextmanager
def guarded_allocation():
    """While active, CPU tensors end at an inaccessible page and start as 0xFF bytes (NaN in every
    float format), so an emulated kernel that reads past a buffer, or reads what nobody wrote,
    fails with an error naming it. Tensors allocated inside stay valid after it ends."""
    load()
    previous = torch.ops.pyssl_emulator.set_guarded_allocation(True)
    try:
        yield
    finally:
        torch.ops.pyssl_emulator.set_guarded_allocation(previous)


@contextlib.contextmanager
def cuda_emulated():
    """Inside, pyssl's op wrappers (losses, MoCo queue, EMA, augmentations) call the emulated
    CUDA kernels on CPU tensors instead of the CPU kernels. Not thread-safe: it switches the
    wrappers of the whole process."""
    load()
    previous = _ops_module._ops
    _ops_module._ops = torch.ops.pyssl_emu
    try:
        yield
    finally:
        _ops_module._ops = previous
