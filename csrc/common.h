#pragma once
// Helpers shared by the CPU (.cpp) and CUDA (.cu) kernels. Keep this header light: .cu files
// include it, and heavy torch headers multiply nvcc compile time.

#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYSSL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYSSL_HOST_DEVICE inline
#endif

namespace pyssl {

// F.normalize's eps: rows with a smaller norm are divided by eps instead.
constexpr double kNormEps = 1e-12;

namespace detail {
PYSSL_HOST_DEVICE float ce_exp(float x) { return expf(x); }
PYSSL_HOST_DEVICE double ce_exp(double x) { return exp(x); }
PYSSL_HOST_DEVICE float ce_log(float x) { return logf(x); }
PYSSL_HOST_DEVICE double ce_log(double x) { return log(x); }
PYSSL_HOST_DEVICE float ce_log1p(float x) { return log1pf(x); }
PYSSL_HOST_DEVICE double ce_log1p(double x) { return log1p(x); }
}  // namespace detail

// A row's cross-entropy lse - pos from its positive logit `pos` and its negatives' running
// (neg_max, neg_sum = sum_j exp(S_j - neg_max)), the positive left out of that sum:
// log1p(sum_j exp(S_j - pos)). Computed so, a row whose positive dominates costs no rounding of
// lse to the precision of the shift and of exp(pos - shift) to 1: no negatives give exactly 0
// (lightly's value), and a loss is never negative. Where the negatives dominate so much that
// exp(neg_max - pos) overflows, the positive's share is below rounding: (neg_max - pos) +
// log(neg_sum). NaN stays NaN. Shared by the CPU and CUDA kernels of every contrastive loss.
template <typename acc_t>
PYSSL_HOST_DEVICE acc_t cross_entropy_from_negatives(acc_t neg_max, acc_t neg_sum, acc_t pos) {
  if (neg_max == acc_t(-INFINITY)) return pos == pos ? acc_t(0) : pos;  // no negatives
  const acc_t x = neg_sum * detail::ce_exp(neg_max - pos);
  const acc_t ce = x == acc_t(INFINITY) ? (neg_max - pos) + detail::ce_log(neg_sum) : detail::ce_log1p(x);
  return ce < acc_t(0) ? acc_t(0) : ce;
}

}  // namespace pyssl
