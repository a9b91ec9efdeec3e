// CPU kernel of the momentum EMA over two tensor lists: every tensor is cut into fixed-size
// chunks and a single at::parallel_for runs over all chunks of all tensors, so a model with
// hundreds of small parameters costs one parallel region, not one per tensor (and per op).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "ema/ema_check.h"

namespace pyssl::ema {
namespace {

using at::Tensor;

// 32 Ki elements per chunk: big enough that the per-chunk overhead vanishes, small enough that
// a ResNet-50's 25 M parameters give hundreds of chunks to balance across threads.
constexpr int64_t kChunk = int64_t(1) << 15;

using EmaFn = void (*)(void* ema, const void* online, int64_t n, double momentum);

template <typename ema_t, typename online_t>
void ema_chunk(void* ema_ptr, const void* online_ptr, int64_t n, double momentum) {
  using acc_t = std::conditional_t<std::is_same_v<ema_t, double> || std::is_same_v<online_t, double>,
                                   double, float>;
  ema_t* __restrict e = static_cast<ema_t*>(ema_ptr);
  const online_t* __restrict o = static_cast<const online_t*>(online_ptr);
  const acc_t keep = static_cast<acc_t>(momentum);
  const acc_t take = static_cast<acc_t>(1.0 - momentum);
  for (int64_t i = 0; i < n; ++i) {
    e[i] = static_cast<ema_t>(keep * static_cast<acc_t>(e[i]) + take * static_cast<acc_t>(o[i]));
  }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// The float32 pair (the common case) compiled for AVX2 as well; picked at run time. No FMA:
// the two products are rounded as in the portable loop, so results do not depend on the CPU.
__attribute__((target("avx2"))) void ema_chunk_float_avx2(void* ema_ptr, const void* online_ptr, int64_t n,
                                                          double momentum) {
  float* __restrict e = static_cast<float*>(ema_ptr);
  const float* __restrict o = static_cast<const float*>(online_ptr);
  const float keep = static_cast<float>(momentum);
  const float take = static_cast<float>(1.0 - momentum);
  for (int64_t i = 0; i < n; ++i) e[i] = keep * e[i] + take * o[i];
}
#define PYSSL_EMA_AVX2 1
#endif

EmaFn select_kernel(at::ScalarType ema_type, at::ScalarType online_type) {
  EmaFn fn = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ema_type, "pyssl_ema_update", [&] {
    using ema_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, online_type, "pyssl_ema_update", [&] {
      fn = &ema_chunk<ema_t, scalar_t>;
    });
  });
#ifdef PYSSL_EMA_AVX2
  if (fn == &ema_chunk<float, float> && __builtin_cpu_supports("avx2")) fn = &ema_chunk_float_avx2;
#endif
  return fn;
}

void ema_update_cpu(at::TensorList ema, at::TensorList online, double momentum) {
  check_ema_lists(ema, online, momentum);
  struct Job {
    EmaFn fn;
    char* ema;
    const char* online;
    int64_t numel, ema_size, online_size;
  };
  struct Chunk {
    int32_t job;
    int64_t begin;
  };
  std::vector<Job> jobs;
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < ema.size(); ++i) {
    const Tensor& e = ema[i];
    const Tensor& o = online[i];
    if (update_outside_kernel(e, o, momentum)) continue;
    const int32_t job = static_cast<int32_t>(jobs.size());
    jobs.push_back({select_kernel(e.scalar_type(), o.scalar_type()), static_cast<char*>(e.data_ptr()),
                    static_cast<const char*>(o.const_data_ptr()), e.numel(),
                    static_cast<int64_t>(e.element_size()), static_cast<int64_t>(o.element_size())});
    for (int64_t b = 0; b < e.numel(); b += kChunk) chunks.push_back({job, b});
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Job& j = jobs[chunks[c].job];
      const int64_t b = chunks[c].begin;
      j.fn(j.ema + b * j.ema_size, j.online + b * j.online_size, std::min(kChunk, j.numel - b), momentum);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssl, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace pyssl::ema
