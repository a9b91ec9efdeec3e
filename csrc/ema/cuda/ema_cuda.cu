// CUDA kernel of the momentum EMA over two tensor lists: one launch whatever the number of
// tensors. The host cuts every tensor into kChunk-element chunks and uploads one table (the
// tensors' pointers, sizes, dtypes and first chunk index) in a single copy; each block walks
// chunks with a grid stride and finds its tensor by binary search over the first-chunk
// indices (torch's multi_tensor_apply passes such tables as kernel arguments, which caps the
// tensors per launch; a table in device memory has no cap).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "device.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ema/ema_check.h"

namespace pyssl::ema {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 16384;  // elements per block visit
constexpr int kThreads = 256;

enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct TensorEntry {
  void* ema;
  const void* online;
  int64_t numel;
  int64_t first_chunk;  // global index of this tensor's first chunk
  int32_t ema_type;
  int32_t online_type;
};

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
__device__ void ema_span_online(const TensorEntry& t, int64_t begin, int64_t end, double momentum) {
  switch (t.online_type) {
    case kF32: ema_span<ema_t, float>(t.ema, t.online, begin, end, momentum); break;
    case kF64: ema_span<ema_t, double>(t.ema, t.online, begin, end, momentum); break;
    case kF16: ema_span<ema_t, c10::Half>(t.ema, t.online, begin, end, momentum); break;
    default: ema_span<ema_t, c10::BFloat16>(t.ema, t.online, begin, end, momentum); break;
  }
}

__global__ void __launch_bounds__(kThreads)
    ema_update_kernel(const TensorEntry* __restrict__ table, int64_t num_tensors, int64_t num_chunks, double momentum) {
  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    // last tensor whose first chunk is <= chunk (tensors with no chunks are not in the table)
    int64_t lo = 0, hi = num_tensors - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (table[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
    }
    const TensorEntry t = table[lo];
    const int64_t begin = (chunk - t.first_chunk) * kChunk;
    const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;
    switch (t.ema_type) {  // uniform across the block: no divergence
      case kF32: ema_span_online<float>(t, begin, end, momentum); break;
      case kF64: ema_span_online<double>(t, begin, end, momentum); break;
      case kF16: ema_span_online<c10::Half>(t, begin, end, momentum); break;
      default: ema_span_online<c10::BFloat16>(t, begin, end, momentum); break;
    }
  }
}

void ema_update_cuda(at::TensorList ema, at::TensorList online, double momentum) {
  check_ema_lists(ema, online, momentum);
  if (ema.empty()) return;
  device::Guard guard(ema[0].device());
  std::vector<TensorEntry> table;
  int64_t num_chunks = 0;
  for (size_t i = 0; i < ema.size(); ++i) {
    const Tensor& e = ema[i];
    const Tensor& o = online[i];
    if (update_outside_kernel(e, o, momentum)) continue;
    table.push_back({e.data_ptr(), o.const_data_ptr(), e.numel(), num_chunks, dtype_code(e.scalar_type()),
                     dtype_code(o.scalar_type())});
    num_chunks += (e.numel() + kChunk - 1) / kChunk;
  }
  if (table.empty()) return;

  const auto stream = device::current_stream();
  const int64_t table_bytes = static_cast<int64_t>(table.size() * sizeof(TensorEntry));
  Tensor table_dev = at::empty({table_bytes}, ema[0].options().dtype(at::kByte));
  // From pageable host memory the copy is staged before cudaMemcpyAsync returns, so `table`
  // may be freed right after; the kernel is ordered after the copy on the same stream.
  PYSSL_CUDA_CHECK(cudaMemcpyAsync(table_dev.data_ptr(), table.data(), table_bytes, cudaMemcpyHostToDevice, stream));

  int device_sms = 0;
  PYSSL_CUDA_CHECK(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, ema[0].get_device()));
  const int64_t blocks = std::min<int64_t>(num_chunks, static_cast<int64_t>(device_sms) * 8);
  device::launch<ema_update_kernel>(static_cast<unsigned>(blocks), kThreads, 0, stream,
      static_cast<const TensorEntry*>(table_dev.const_data_ptr()), static_cast<int64_t>(table.size()), num_chunks,
      momentum);
}

}  // namespace

PYSSL_DEVICE_LIBRARY_IMPL(m) { m.impl("ema_update_", &ema_update_cuda); }

}  // namespace pyssl::ema
