// Small CUDA kernels, each correct or broken in one deliberate way, on which the emulator proves
// that it catches what a GPU would hide (tests/test_cuda_emulator.py): every broken variant must
// fail, by an error or by a wrong result, and every correct one must pass. Compiled into the
// emulation library only (torch.ops.pyssl_emu_selftest.*).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

#include "device.h"
#include "device_smem.h"
#include "ptx.h"

namespace pyssl::emu_selftest {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

enum class Flaw { kNone, kMissingSyncthreads, kDivergentBarrier, kBarrierSitesDiffer, kMissingSyncwarp,
                  kMaskWithoutSelf, kGlobalOffByOne, kSharedOffByOne, kUninitializedShared, kWrongFragmentIndex,
                  kMissingCpAsyncWait };

// Block sums through a shared-memory tree.
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ out, Flaw flaw) {
  __shared__ float s[kThreads];
  const int tid = threadIdx.x;
  s[tid] = x[blockIdx.x * kThreads + tid];
  __syncthreads();
  if (flaw == Flaw::kDivergentBarrier && tid >= kThreads / 2) return;  // half the block skips the next barrier
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) s[tid] += s[tid + stride];
    if (flaw == Flaw::kBarrierSitesDiffer && tid % 2 == 1) {
      __syncthreads();
    } else if (flaw != Flaw::kMissingSyncthreads) {
      __syncthreads();
    }
  }
  if (tid == 0) out[blockIdx.x] = s[0];
}

// Warp sums through shared memory (lane-private slots, so only __syncwarp orders them).
__global__ void warp_sum_kernel(const float* __restrict__ x, float* __restrict__ out, Flaw flaw) {
  __shared__ float s[kThreads];
  const int tid = threadIdx.x, lane = tid % 32, base = tid - lane;
  s[tid] = x[blockIdx.x * kThreads + tid];
  __syncwarp();
  for (int offset = 16; offset > 0; offset /= 2) {
    if (lane < offset) s[base + lane] += s[base + lane + offset];
    if (flaw != Flaw::kMissingSyncwarp) __syncwarp();
  }
  if (lane == 0) out[(blockIdx.x * kThreads + tid) / 32] = s[base];
}

// Warp sums by xor shuffles.
__global__ void shuffle_sum_kernel(const float* __restrict__ x, float* __restrict__ out, Flaw flaw) {
  const int tid = threadIdx.x, lane = tid % 32;
  float v = x[blockIdx.x * kThreads + tid];
  const unsigned mask = flaw == Flaw::kMaskWithoutSelf ? 0xfffffffeu : 0xffffffffu;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset);
  if (lane == 0) out[(blockIdx.x * kThreads + tid) / 32] = v;
}

// out[i] = x[i + 1] for i < n - 1 and out[n - 1] = x[0], staged through a shared tile.
__global__ void rotate_kernel(const float* __restrict__ x, float* __restrict__ out, int64_t n, Flaw flaw) {
  __shared__ float tile[kThreads];
  const int tid = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + tid;
  const int64_t src = flaw == Flaw::kGlobalOffByOne ? i + 1 : (i + 1) % n;  // the broken one reads x[n]
  if (flaw == Flaw::kSharedOffByOne) {
    tile[tid + 1] = x[src];  // tile[256] for the last thread
  } else if (flaw != Flaw::kUninitializedShared || tid != kThreads - 1) {
    tile[tid] = x[src];
  }
  __syncthreads();
  out[i] = tile[tid];
}

// D (16 x 8, row-major) from this lane's accumulator fragment (c[0..1]: row g, c[2..3]: row g + 8).
__device__ void store_accumulators(float* __restrict__ d, const float (&acc)[4]) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// One m16n8k16 product D = A B (A 16 x 16 row-major, B given as B^T: 8 x 16 row-major), fragments
// built by hand from shared memory, as the FlashAttention-style kernels will.
__global__ void mma_kernel(const __half* __restrict__ a, const __half* __restrict__ b_t, float* __restrict__ d, Flaw flaw) {
  __shared__ __align__(16) __half sa[16 * 16];
  __shared__ __align__(16) __half sb[8 * 16];
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 16 * 16; i += 32) sa[i] = a[i];
  for (int i = lane; i < 8 * 16; i += 32) sb[i] = b_t[i];
  __syncwarp();
  const int row_lo = flaw == Flaw::kWrongFragmentIndex ? g + 8 : g;  // the broken one swaps the row halves
  const int row_hi = flaw == Flaw::kWrongFragmentIndex ? g : g + 8;
  uint32_t ra[4], rb[2];
  ra[0] = ptx::pack2(sa[row_lo * 16 + 2 * t], sa[row_lo * 16 + 2 * t + 1]);
  ra[1] = ptx::pack2(sa[row_hi * 16 + 2 * t], sa[row_hi * 16 + 2 * t + 1]);
  ra[2] = ptx::pack2(sa[row_lo * 16 + 2 * t + 8], sa[row_lo * 16 + 2 * t + 9]);
  ra[3] = ptx::pack2(sa[row_hi * 16 + 2 * t + 8], sa[row_hi * 16 + 2 * t + 9]);
  rb[0] = ptx::pack2(sb[g * 16 + 2 * t], sb[g * 16 + 2 * t + 1]);
  rb[1] = ptx::pack2(sb[g * 16 + 2 * t + 8], sb[g * 16 + 2 * t + 9]);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  ptx::mma_m16n8k16<__half>(acc, ra, rb, acc);
  store_accumulators(d, acc);
}

// The same product with the operands staged by cp.async and the fragments loaded by ldmatrix
// (A: x4, four 8 x 8 quadrants; B^T rows are B's columns: x2, no transpose needed).
__global__ void mma_ldmatrix_kernel(const __half* __restrict__ a, const __half* __restrict__ b_t, float* __restrict__ d,
                                    Flaw flaw) {
  __shared__ __align__(16) __half sa[16 * 16];
  __shared__ __align__(16) __half sb[8 * 16];
  const int lane = threadIdx.x;
  // 16 x 16 halves = 32 chunks of 16 bytes (one per lane), 8 x 16 = 16 chunks.
  ptx::cp_async_16(sa + lane * 8, a + lane * 8);
  if (lane < 16) ptx::cp_async_16(sb + lane * 8, b_t + lane * 8);
  ptx::cp_async_commit();
  if (flaw != Flaw::kMissingCpAsyncWait) ptx::cp_async_wait(0);
  __syncwarp();
  // Matrix i of the x4 load: quadrant (i % 2 rows, i / 2 columns) in the a[0..3] order.
  const int quadrant = lane / 8, r = lane % 8;
  uint32_t ra[4], rb[2];
  ptx::ldmatrix<4>(ra, sa + ((quadrant % 2) * 8 + r) * 16 + (quadrant / 2) * 8);
  ptx::ldmatrix<2>(rb, sb + (lane % 8) * 16 + ((lane / 8) % 2) * 8);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  ptx::mma_m16n8k16<__half>(acc, ra, rb, acc);
  store_accumulators(d, acc);
}

Flaw parse_flaw(const std::string& name) {
  if (name == "none") return Flaw::kNone;
  if (name == "missing_syncthreads") return Flaw::kMissingSyncthreads;
  if (name == "divergent_barrier") return Flaw::kDivergentBarrier;
  if (name == "barrier_sites_differ") return Flaw::kBarrierSitesDiffer;
  if (name == "missing_syncwarp") return Flaw::kMissingSyncwarp;
  if (name == "mask_without_self") return Flaw::kMaskWithoutSelf;
  if (name == "global_off_by_one") return Flaw::kGlobalOffByOne;
  if (name == "shared_off_by_one") return Flaw::kSharedOffByOne;
  if (name == "uninitialized_shared") return Flaw::kUninitializedShared;
  if (name == "wrong_fragment_index") return Flaw::kWrongFragmentIndex;
  if (name == "missing_cp_async_wait") return Flaw::kMissingCpAsyncWait;
  TORCH_CHECK(false, "pyssl_emu_selftest: unknown flaw '", name, "'");
}

// x: float32 (blocks * 256,); returns the per-block / per-warp sums or the rotated copy.
Tensor reduce(const std::string& kernel, const std::string& flaw_name, const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.numel() % kThreads == 0 && x.is_contiguous(),
              "pyssl_emu_selftest: x must be a contiguous float32 vector of a multiple of 256 values");
  const Flaw flaw = parse_flaw(flaw_name);
  const unsigned blocks = static_cast<unsigned>(x.numel() / kThreads);
  if (kernel == "block_sum") {
    Tensor out = at::empty({blocks}, x.options());
    device::launch<block_sum_kernel>(blocks, kThreads, 0, nullptr, x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), flaw);
    return out;
  }
  if (kernel == "warp_sum" || kernel == "shuffle_sum") {
    Tensor out = at::empty({x.numel() / 32}, x.options());
    if (kernel == "warp_sum") {
      device::launch<warp_sum_kernel>(blocks, kThreads, 0, nullptr, x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), flaw);
    } else {
      device::launch<shuffle_sum_kernel>(blocks, kThreads, 0, nullptr, x.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                                         flaw);
    }
    return out;
  }
  TORCH_CHECK(kernel == "rotate", "pyssl_emu_selftest: unknown kernel '", kernel, "'");
  Tensor out = at::empty_like(x);
  device::launch<rotate_kernel>(blocks, kThreads, 0, nullptr, x.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                                x.numel(), flaw);
  return out;
}

// a: (16, 16) fp16, b_t: (8, 16) fp16 (B transposed); returns D = A B, (16, 8) float32.
Tensor mma(const std::string& kernel, const std::string& flaw_name, const Tensor& a, const Tensor& b_t) {
  TORCH_CHECK(a.scalar_type() == at::kHalf && b_t.scalar_type() == at::kHalf && a.sizes() == at::IntArrayRef({16, 16}) &&
                  b_t.sizes() == at::IntArrayRef({8, 16}) && a.is_contiguous() && b_t.is_contiguous(),
              "pyssl_emu_selftest: a must be (16, 16) and b_t (8, 16), contiguous float16");
  const Flaw flaw = parse_flaw(flaw_name);
  Tensor d = at::empty({16, 8}, a.options().dtype(at::kFloat));
  const auto* pa = reinterpret_cast<const __half*>(a.const_data_ptr<at::Half>());
  const auto* pb = reinterpret_cast<const __half*>(b_t.const_data_ptr<at::Half>());
  if (kernel == "mma") {
    device::launch<mma_kernel>(1, 32, 0, nullptr, pa, pb, d.mutable_data_ptr<float>(), flaw);
  } else {
    TORCH_CHECK(kernel == "mma_ldmatrix", "pyssl_emu_selftest: unknown kernel '", kernel, "'");
    device::launch<mma_ldmatrix_kernel>(1, 32, 0, nullptr, pa, pb, d.mutable_data_ptr<float>(), flaw);
  }
  return d;
}

__global__ void touch_shared_kernel(float* __restrict__ out) {
  float* smem = dynamic_shared_memory<float>();
  smem[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = smem[31];
}

// One block of 32 threads with `bytes` of dynamic shared memory, after the opt-in to `bytes`
// when `opt_in`: what the H200 accepts must run, what it rejects must fail.
Tensor launch_with_smem(int64_t bytes, bool opt_in) {
  Tensor out = at::empty({1}, at::TensorOptions().dtype(at::kFloat));
  if (opt_in) device::set_max_dynamic_shared_memory<touch_shared_kernel>(static_cast<int>(bytes));
  device::launch<touch_shared_kernel>(1, 32, static_cast<size_t>(bytes), nullptr, out.mutable_data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(pyssl_emu_selftest, m) {
  m.def("reduce(str kernel, str flaw, Tensor x) -> Tensor");
  m.def("mma(str kernel, str flaw, Tensor a, Tensor b_t) -> Tensor");
  m.def("launch_with_smem(int bytes, bool opt_in) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyssl_emu_selftest, CPU, m) {
  m.impl("reduce", &reduce);
  m.impl("mma", &mma);
}

TORCH_LIBRARY_IMPL(pyssl_emu_selftest, CompositeExplicitAutograd, m) { m.impl("launch_with_smem", &launch_with_smem); }

}  // namespace pyssl::emu_selftest
