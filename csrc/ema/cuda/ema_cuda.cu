// CUDA kernel of the momentum EMA over two tensor lists. The host cuts every tensor into
// kChunk-element chunks; each block walks chunks with a grid stride and finds its tensor by
// binary search over the first-chunk indices. The table of tensors travels by value as a kernel
// argument (as torch's multi_tensor_apply does), not through a host-to-device copy: a copy from
// pageable memory may block the host and cannot be captured in a CUDA graph, a kernel argument
// is part of the launch. Kernel arguments are capped (4 KiB before CUDA 12.1), so a table holds
// kTableCapacity = 168 tensors: up to 168 tensors are one launch (ResNet-50 has 161 parameter
// tensors, ViT-B/16 152), longer lists one launch per group of 168.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "device.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "ema/ema_check.h"

namespace pyssl::ema {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 16384;  // elements per block visit
constexpr int kThreads = 256;
// Tensors per launch: the table below stays under 4 KiB, the kernel-argument limit every
// CUDA release and architecture accepts.
constexpr int kTableCapacity = 168;

enum DType : uint8_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// One launch's tensors, as a kernel argument. Arrays, not an array of structs, so nothing is
// padding: 23 bytes a tensor. A tensor's last chunk may be partial; its length is kept as
// tail[i] + 1 (at most kChunk, 16 bits) and the other chunks are full.
struct EmaTable {
  void* ema[kTableCapacity];
  const void* online[kTableCapacity];
  int32_t first_chunk[kTableCapacity + 1];  // [num_tensors]: the launch's chunk count
  uint16_t tail[kTableCapacity];
  uint8_t types[kTableCapacity];            // ema dtype | online dtype << 4
  int32_t num_tensors;
};
static_assert(sizeof(EmaTable) + sizeof(double) <= 4096, "the kernel arguments must stay under 4 KiB");
static_assert(kChunk - 1 <= UINT16_MAX, "a chunk's length must fit tail's 16 bits");

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "pyssl.ema_update_: unsupported dtype ", t);
  }
  return kF32;
}

template <typename ema_t, typename online_t>
__device__ void ema_span(void* ema_ptr, const void* online_ptr, int64_t begin, int64_t end, double momentum) {
  // float accumulation unless a side is double (as the CPU kernel).
  constexpr bool wide = std::is_same_v<ema_t, double> || std::is_same_v<online_t, double>;
  using acc_t = std::conditional_t<wide, double, float>;
  ema_t* e = static_cast<ema_t*>(ema_ptr);
  const online_t* o = static_cast<const online_t*>(online_ptr);
  const acc_t keep = static_cast<acc_t>(momentum);
  const acc_t take = static_cast<acc_t>(1.0 - momentum);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    e[i] = static_cast<ema_t>(keep * static_cast<acc_t>(e[i]) + take * static_cast<acc_t>(o[i]));
  }
}

template <typename ema_t>
__device__ void ema_span_online(int online_type, void* ema, const void* online, int64_t begin, int64_t end,
                                double momentum) {
  switch (online_type) {
    case kF32: ema_span<ema_t, float>(ema, online, begin, end, momentum); break;
    case kF64: ema_span<ema_t, double>(ema, online, begin, end, momentum); break;
    case kF16: ema_span<ema_t, c10::Half>(ema, online, begin, end, momentum); break;
    default: ema_span<ema_t, c10::BFloat16>(ema, online, begin, end, momentum); break;
  }
}

// __grid_constant__: the table is read where the launch put it (the constant bank), never
// copied to a thread's local memory.
__global__ void __launch_bounds__(kThreads)
    ema_update_kernel(const __grid_constant__ EmaTable table, double momentum) {
  const int32_t num_tensors = table.num_tensors;
  const int32_t num_chunks = table.first_chunk[num_tensors];
  for (int32_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    // last tensor whose first chunk is <= chunk (tensors with no chunks are not in the table)
    int32_t lo = 0, hi = num_tensors - 1;
    while (lo < hi) {
      const int32_t mid = (lo + hi + 1) / 2;
      if (table.first_chunk[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    const int32_t local = chunk - table.first_chunk[lo];
    const bool last = chunk + 1 == table.first_chunk[lo + 1];
    const int64_t begin = static_cast<int64_t>(local) * kChunk;
    const int64_t end = begin + (last ? static_cast<int64_t>(table.tail[lo]) + 1 : kChunk);
    void* ema = table.ema[lo];
    const void* online = table.online[lo];
    const int types = table.types[lo];
    switch (types & 15) {  // uniform across the block: no divergence
      case kF32: ema_span_online<float>(types >> 4, ema, online, begin, end, momentum); break;
      case kF64: ema_span_online<double>(types >> 4, ema, online, begin, end, momentum); break;
      case kF16: ema_span_online<c10::Half>(types >> 4, ema, online, begin, end, momentum); break;
      default: ema_span_online<c10::BFloat16>(types >> 4, ema, online, begin, end, momentum); break;
    }
  }
}

void ema_update_cuda(at::TensorList ema, at::TensorList online, double momentum) {
  check_ema_lists(ema, online, momentum);
  if (ema.empty()) return;
  device::Guard guard(ema[0].device());
  const auto stream = device::current_stream();
  int device_sms = 0;
  PYSSL_CUDA_CHECK(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, ema[0].get_device()));

  EmaTable table{};
  int64_t num_chunks = 0;
  const auto flush = [&] {
    if (table.num_tensors == 0) return;
    table.first_chunk[table.num_tensors] = static_cast<int32_t>(num_chunks);
    const int64_t blocks = std::min<int64_t>(num_chunks, static_cast<int64_t>(device_sms) * 8);
    device::launch<ema_update_kernel>(static_cast<unsigned>(blocks), kThreads, 0, stream, table, momentum);
    table.num_tensors = 0;
    num_chunks = 0;
  };
  for (size_t i = 0; i < ema.size(); ++i) {
    const Tensor& e = ema[i];
    const Tensor& o = online[i];
    if (update_outside_kernel(e, o, momentum)) continue;
    const int64_t chunks = (e.numel() + kChunk - 1) / kChunk;
    // A launch counts its chunks in 32 bits: 2^31 chunks are 3.5e13 elements, far past any
    // device's memory, so only many large tensors together start a new launch here.
    if (table.num_tensors == kTableCapacity || num_chunks + chunks > INT32_MAX) flush();
    const int32_t slot = table.num_tensors++;
    table.ema[slot] = e.data_ptr();
    table.online[slot] = o.const_data_ptr();
    table.first_chunk[slot] = static_cast<int32_t>(num_chunks);
    table.tail[slot] = static_cast<uint16_t>(e.numel() - (chunks - 1) * kChunk - 1);
    table.types[slot] = static_cast<uint8_t>(dtype_code(e.scalar_type()) | dtype_code(o.scalar_type()) << 4);
    num_chunks += chunks;
  }
  flush();
}

}  // namespace

PYSSL_DEVICE_LIBRARY_IMPL(m) { m.impl("ema_update_", &ema_update_cuda); }

}  // namespace pyssl::ema
