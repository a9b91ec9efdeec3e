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
from torch.utils._python_dispatch import TorchDispatchMode

from pyssl import ops as _ops_module

_loaded = False


def library_path() -> str | None:
    """The emulation library beside pyssl's extension, or None when it was not built."""
    here = os.path.dirname(os.path.abspath(_ops_module.__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C_emu*.so")))
    if not candidates:
        try:
            import pyssl._C as ext
        except ImportError:  # pyssl runs on its eager fallback kernels: nothing was built
            return None
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
    # Every argument is passed on: the dispatcher leaves out those equal to their defaults.
    torch.library.impl("pyssl_emu::moco_backward", "CPU")(lambda *args: torch.ops.pyssl.moco_backward(*args))
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


# ATen ops that make the host wait for a CUDA device (torch.cuda.set_sync_debug_mode flags them):
# a value read back (item(), bool(), float() of a tensor) or an output size that depends on data.
_SYNCING_ATEN_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::masked_select",
        "aten::unique_dim",
        "aten::_unique2",
        "aten::unique_consecutive",
        "aten::repeat_interleave",
        "aten::equal",
    }
)


_EMULATED_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class _SyncingOpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNCING_ATEN_OPS:
            self.calls.append(name)
        if name.startswith("pyssl_emu::"):
            # The emulated kernel itself (its CPU kernel, past this mode) with the mode still on,
            # so that the ATen calls its launcher makes (an .item() there) are seen too.
            with self:
                return func.redispatch(_EMULATED_KEYS, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class HostCalls:
    """What ran inside ``count_host_calls()`` that a CUDA graph cannot capture or that makes the
    host wait for the device: the launchers' host-to-device copies, device-to-host copies and
    synchronisations (counted by the emulator's runtime), and ATen ops that read device values
    back (``item()``, ``bool()``, data-dependent sizes), by name, from Python or from the
    emulated launchers."""

    host_to_device: int = 0
    device_to_host: int = 0
    synchronize: int = 0
    aten: tuple = ()

    @property
    def syncs(self) -> int:
        """Everything that makes a GPU's host wait (``set_sync_debug_mode("error")`` raises on it)."""
        return self.device_to_host + self.synchronize + len(self.aten)

    def __repr__(self):
        return (
            f"HostCalls(host_to_device={self.host_to_device}, device_to_host={self.device_to_host}, "
            f"synchronize={self.synchronize}, aten={list(self.aten)})"
        )


def host_call_counts() -> tuple[int, int, int]:
    """The emulator's running counts of host-to-device copies, device-to-host copies and
    synchronisations made through its runtime."""
    load()
    return tuple(int(c) for c in torch.ops.pyssl_emulator.host_call_counts())


@contextlib.contextmanager
def count_host_calls():
    """``with count_host_calls() as calls: ...``: fills ``calls`` (a ``HostCalls``) when it ends;
    the emulated counterpart of ``torch.cuda.set_sync_debug_mode("error")``."""
    before = host_call_counts()
    calls = HostCalls()
    counter = _SyncingOpCounter()
    try:
        with counter:
            yield calls
    finally:
        after = host_call_counts()
        calls.host_to_device, calls.device_to_host, calls.synchronize = (a - b for a, b in zip(after, before))
        calls.aten = tuple(counter.calls)


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
