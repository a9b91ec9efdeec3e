"""The CPU emulator of the CUDA model proves itself: small kernels, each correct or broken in one
deliberate way (csrc/emu/selftest), must pass or fail as a GPU would make them pass or fail."""

import os
import shutil
import subprocess

import pytest
import torch

import pyssl

emulation = pytest.importorskip("pyssl.emulation")

if not emulation.available():
    if os.environ.get("PYSSL_REQUIRE_EMULATION") == "1":
        raise RuntimeError("PYSSL_REQUIRE_EMULATION=1 but pyssl was built without its CUDA emulator")
    pytest.skip("pyssl was built without its CUDA emulator (PYSSL_CUDA_EMULATE=ON)", allow_module_level=True)

emulation.load()
selftest = torch.ops.pyssl_emu_selftest

SEEDS = [1, 2, 3]


@pytest.fixture(autouse=True)
def _guarded():
    with emulation.guarded_allocation():
        yield


def _values(blocks=4):
    # Integers: every summation order gives the same float, so only a race changes the result.
    return torch.randint(-50, 50, (blocks * 256,)).float()


# ---- races: a missing barrier changes the result, with every seed --------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_block_sum_needs_its_barriers(seed):
    emulation.set_seed(seed)
    x = _values()
    expected = x.view(4, 256).sum(1)
    torch.testing.assert_close(selftest.reduce("block_sum", "none", x), expected, rtol=0, atol=0)
    broken = selftest.reduce("block_sum", "missing_syncthreads", x)
    assert not torch.equal(broken, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_warp_sum_through_shared_memory_needs_syncwarp(seed):
    emulation.set_seed(seed)
    x = _values()
    expected = x.view(-1, 32).sum(1)
    torch.testing.assert_close(selftest.reduce("warp_sum", "none", x), expected, rtol=0, atol=0)
    broken = selftest.reduce("warp_sum", "missing_syncwarp", x)
    assert not torch.equal(broken, expected)


def test_shuffle_sum_is_exact():
    x = _values()
    torch.testing.assert_close(selftest.reduce("shuffle_sum", "none", x), x.view(-1, 32).sum(1), rtol=0, atol=0)


# ---- what a GPU would hang or crash on: clear errors naming kernel and line ---------------------


def test_a_barrier_half_the_block_skips_is_an_error():
    with pytest.raises(
        RuntimeError,
        match=r"block_sum_kernel.*__syncthreads at csrc/emu/selftest/selftest_kernels.cu:\d+ reached by 128 of 256",
    ):
        selftest.reduce("block_sum", "divergent_barrier", _values())


def test_barriers_at_different_lines_are_an_error():
    with pytest.raises(RuntimeError, match=r"divergent __syncthreads: thread \d+ waits at .*selftest_kernels.cu:\d+"):
        selftest.reduce("block_sum", "barrier_sites_differ", _values())


def test_a_shuffle_mask_without_the_calling_lane_is_an_error():
    with pytest.raises(
        RuntimeError, match=r"shuffle_sum_kernel.*__shfl_xor_sync at .*: lane 0 calls it with a mask \(0xfffffffe\)"
    ):
        selftest.reduce("shuffle_sum", "mask_without_self", _values())


def test_reading_past_a_global_buffer_is_an_error():
    x = _values()
    expected = torch.roll(x, -1)
    torch.testing.assert_close(selftest.reduce("rotate", "none", x), expected, rtol=0, atol=0)
    with pytest.raises(
        RuntimeError, match=r"rotate_kernel.*out-of-bounds access 0 bytes past the end of a global buffer of 4096 bytes"
    ):
        selftest.reduce("rotate", "global_off_by_one", x)


def test_indexing_past_a_shared_array_is_an_error():
    with pytest.raises(
        RuntimeError, match=r"rotate_kernel.*index 256 out of bounds for type 'float \[256\]' at .*selftest_kernels.cu"
    ):
        selftest.reduce("rotate", "shared_off_by_one", _values())


def test_unwritten_shared_memory_reads_as_nan():
    out = selftest.reduce("rotate", "uninitialized_shared", _values(1))
    assert torch.isnan(out[255]) and torch.isfinite(out[:255]).all()


# ---- tensor-core fragments follow the PTX ISA's layouts -------------------------------------------


def _operands():
    a = torch.randn(16, 16).half()
    b_t = torch.randn(8, 16).half()
    return a, b_t, a.double() @ b_t.double().T


@pytest.mark.parametrize("kernel", ["mma", "mma_ldmatrix"])
def test_mma_fragments_match_a_float64_matmul(kernel):
    a, b_t, expected = _operands()
    torch.testing.assert_close(selftest.mma(kernel, "none", a, b_t).double(), expected, rtol=1e-5, atol=1e-5)


def test_a_wrong_fragment_index_gives_a_wrong_product():
    a, b_t, expected = _operands()
    broken = selftest.mma("mma", "wrong_fragment_index", a, b_t).double()
    assert (broken - expected).abs().max() > 0.1


def test_reading_before_cp_async_wait_gives_poison():
    a, b_t, _ = _operands()
    broken = selftest.mma("mma_ldmatrix", "missing_cp_async_wait", a, b_t)
    assert torch.isnan(broken).all()


# ---- the emulator's plumbing ------------------------------------------------------------------------


def test_emulated_ops_run_the_cuda_kernels():
    before = emulation.launch_count()
    z = torch.randn(10, 8)
    loss, lse = emulation.ops().ntxent_forward(z, 0.5)
    assert emulation.launch_count() > before
    torch.testing.assert_close(loss, torch.ops.pyssl.ntxent_forward(z, 0.5)[0], rtol=1e-5, atol=1e-6)
    with emulation.cuda_emulated():
        before = emulation.launch_count()
        pyssl.losses.NTXentLoss(0.5)(z[:5], z[5:])
        assert emulation.launch_count() > before
    before = emulation.launch_count()
    pyssl.losses.NTXentLoss(0.5)(z[:5], z[5:])
    assert emulation.launch_count() == before


def test_shared_memory_limit_of_the_h200_is_enforced():
    # 48 KiB of dynamic shared memory without the opt-in, 227 KiB with it (cudaDeviceGetAttribute
    # gives the same limits on the GPU).
    assert selftest.launch_with_smem(48 * 1024, False).item() == 31.0
    with pytest.raises(RuntimeError, match="without cudaFuncAttributeMaxDynamicSharedMemorySize"):
        selftest.launch_with_smem(48 * 1024 + 4, False)
    assert selftest.launch_with_smem(227 * 1024, True).item() == 31.0
    with pytest.raises(RuntimeError, match="opt-in limit"):
        selftest.launch_with_smem(227 * 1024 + 4, True)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils' readelf")
def test_the_library_has_no_thread_local_state_but_shared_memory():
    # Static __shared__ arrays are the library's thread-local objects and the emulator poisons the
    # whole thread-local block before each block runs: anything else there would be destroyed.
    symbols = subprocess.run(["readelf", "-sW", emulation.library_path()], capture_output=True, text=True, check=True)
    tls = [line.split()[-1] for line in symbols.stdout.splitlines() if " TLS " in line]
    names = subprocess.run(["c++filt"], input="\n".join(tls), capture_output=True, text=True).stdout.split("\n")
    assert tls, "expected the kernels' shared arrays"
    strays = [n for n in names if n and "_kernel" not in n and "g_tls_anchor" not in n]
    assert not strays, strays
