#pragma once
// Per-tile math of the fused InfoNCE family, shared by the CPU kernel and the CUDA kernels.
// The derivation (forward, backward, tiling) is in shared/design/fused-infonce.md.
#include <cmath>

#include "common.h"

namespace pyssl::infonce {

PYSSL_HOST_DEVICE float exp_acc(float x) { return expf(x); }
PYSSL_HOST_DEVICE double exp_acc(double x) { return exp(x); }
PYSSL_HOST_DEVICE float log_acc(float x) { return logf(x); }
PYSSL_HOST_DEVICE double log_acc(double x) { return log(x); }
PYSSL_HOST_DEVICE float sqrt_acc(float x) { return sqrtf(x); }
PYSSL_HOST_DEVICE double sqrt_acc(double x) { return sqrt(x); }

// Largest logit spread for which a fixed shift (the logit bound |S| <= scale) can replace the
// running max: exp(S - scale) >= exp(-2 scale) must stay a normal number of the type.
template <typename acc_t>
PYSSL_HOST_DEVICE acc_t fixed_shift_limit();
template <>
PYSSL_HOST_DEVICE float fixed_shift_limit<float>() { return 80.0f; }
template <>
PYSSL_HOST_DEVICE double fixed_shift_limit<double>() { return 700.0; }

// Logits are scale * cosine, so |S| <= scale; with a small enough spread one exp per logit
// serves every row and column sum (no running max, no rescaling).
template <typename acc_t>
PYSSL_HOST_DEVICE bool can_use_fixed_shift(acc_t scale) {
  return scale > acc_t(0) && acc_t(2) * scale < fixed_shift_limit<acc_t>();
}

// Online log-sum-exp: merge a partial (other_max, other_sum = sum exp(x - other_max)) into the
// running (max, sum). A partial with max = -inf (all entries masked) changes nothing, and
// exp(-inf - -inf) is never evaluated.
template <typename acc_t>
PYSSL_HOST_DEVICE void lse_merge(acc_t& max, acc_t& sum, acc_t other_max, acc_t other_sum) {
  if (other_max == -INFINITY) return;
  if (max >= other_max) {
    sum += other_sum * exp_acc(other_max - max);
  } else {
    sum = sum * exp_acc(max - other_max) + other_sum;
    max = other_max;
  }
}

// log-sum-exp from the running pair; -inf for an empty (fully masked) row.
template <typename acc_t>
PYSSL_HOST_DEVICE acc_t lse_finalize(acc_t max, acc_t sum) {
  return max == -INFINITY ? max : max + log_acc(sum);
}

// 1 / max(||z||, eps), as F.normalize divides.
template <typename acc_t>
PYSSL_HOST_DEVICE acc_t inverse_norm(acc_t norm) {
  return acc_t(1) / (norm > acc_t(kNormEps) ? norm : acc_t(kNormEps));
}

// Gradient through u = z / max(||z||, eps) for one element: (g - (g.u) u) / ||z||, or g / eps
// for a row whose norm was clamped (the clamp passes no gradient to the norm).
template <typename acc_t>
PYSSL_HOST_DEVICE acc_t normalize_backward(acc_t g, acc_t u, acc_t g_dot_u, acc_t norm) {
  return norm > acc_t(kNormEps) ? (g - g_dot_u * u) / norm : g / acc_t(kNormEps);
}

// Positive column of NT-Xent row i among 2N rows: i + N for the first view, i - N for the second.
PYSSL_HOST_DEVICE long ntxent_positive(long i, long n_pairs) {
  return i < n_pairs ? i + n_pairs : i - n_pairs;
}

}  // namespace pyssl::infonce
