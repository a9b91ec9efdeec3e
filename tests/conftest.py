import contextlib
import os
import random
import zlib

import pytest
import torch

# Fixed per-test seeds would make every run see the same inputs; draw fresh ones but print
# the seed so a failure can be replayed with PYSSL_TEST_SEED.

_SEED = int(os.environ.get("PYSSL_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_configure(config):
    # The tests compare the kernels with the references: on the eager fallback (pyssl._fallback)
    # they would compare the references with themselves.
    import pyssl

    if not pyssl.extension_loaded:
        raise pytest.UsageError(
            f"pyssl's tests need its compiled extension, which is not loaded "
            f"({pyssl._extension.missing_reason}); build it with `make build`"
        )


def pytest_report_header(config):
    return f"pyssl test seed: {_SEED} (replay with PYSSL_TEST_SEED={_SEED})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # -q drops the header: a failing run repeats its seed at the end.
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"pyssl test seed: {_SEED} (replay with PYSSL_TEST_SEED={_SEED})")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    seed = (_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def cuda_ready() -> bool:
    import pyssl

    return torch.cuda.is_available() and pyssl.cuda_kernels_built


# ---- the device the CUDA kernels run on: a GPU, or the CPU emulator of the CUDA model -----------
# A test that takes the `backend` fixture runs twice: on "cuda" (marked `cuda`, skipped without a
# GPU) and on "emu" (marked `emulated`): the same CUDA kernel sources, run by pyssl.emulation on
# CPU tensors with guarded allocation. `make test` sets PYSSL_REQUIRE_EMULATION=1, so a build
# without the emulator fails there instead of skipping.


class Backend:
    """Where a CUDA test's "device" tensors live and which ops run the CUDA kernels there."""

    def __init__(self, name: str):
        self.name = name
        self.emulated = name == "emu"
        self.device = torch.device("cpu" if self.emulated else "cuda")
        self._routes = []

    @property
    def ops(self):
        """The op namespace of the CUDA kernels on this backend (torch.ops.pyssl or pyssl_emu)."""
        if self.emulated:
            import pyssl.emulation

            return pyssl.emulation.ops()
        return torch.ops.pyssl

    def to(self, t):
        return t.to(self.device)

    def generator(self, seed: int):
        return torch.Generator(device=self.device).manual_seed(seed)

    def __enter__(self):
        # Routes pyssl's wrappers (losses, MoCoLoss, augmentations, EMA) to the CUDA kernels.
        route = contextlib.ExitStack()
        if self.emulated:
            import pyssl.emulation

            route.enter_context(pyssl.emulation.cuda_emulated())
        self._routes.append(route)
        return self

    def __exit__(self, *exc):
        self._routes.pop().close()
        return False

    def __repr__(self):
        return f"Backend({self.name})"


def emulation_ready() -> bool:
    import pyssl.emulation

    return pyssl.emulation.available()


@pytest.fixture(
    params=[
        pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
        pytest.param("emu", marks=pytest.mark.emulated, id="emu"),
    ]
)
def backend(request):
    if request.param == "cuda":
        if not cuda_ready():
            pytest.skip("needs a CUDA device and pyssl built with CUDA kernels")
        yield Backend("cuda")
        return
    if not emulation_ready():
        if os.environ.get("PYSSL_REQUIRE_EMULATION") == "1":
            pytest.fail(
                "PYSSL_REQUIRE_EMULATION=1 but pyssl was built without its CUDA emulator (PYSSL_CUDA_EMULATE=ON)"
            )
        pytest.skip("pyssl was built without its CUDA emulator (PYSSL_CUDA_EMULATE=ON)")
    import pyssl.emulation

    pyssl.emulation.set_seed((_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))
    with pyssl.emulation.guarded_allocation():
        yield Backend("emu")
