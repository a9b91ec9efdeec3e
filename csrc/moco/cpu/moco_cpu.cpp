// CPU kernels of the MoCo queue loss: one sweep over the queue in column tiles (one BLAS GEMM
// per tile for the logits, one for the probability-weighted queue sum), the (N x K) logit
// matrix is never allocated. The forward also returns A_i = sum_j P_ij q_j, so the backward
// needs neither the queue nor a second sweep (and the queue may be overwritten right after).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <tuple>

#include "common_cpu.h"
#include "moco/moco_check.h"
#include "moco/moco_math.h"

namespace pyssl::moco {
namespace {

using at::Tensor;

// Aim for tiles of about 2^18 logits (1 MiB in float32): they stay in a core's L2 cache
// between the logit GEMM, the exp and the accumulating GEMM.
constexpr int64_t kTileElems = int64_t(1) << 18;
constexpr int64_t kMaxRowBlock = 256;

using cpu::accumulate_type;
using cpu::Normalized;
using cpu::normalize_rows;

// grad_z from grad_u through u = z / max(||z||, eps): (g - (g.u) u) / ||z||, or g / eps for a
// row whose norm was clamped (the clamp passes no gradient to the norm).
Tensor normalize_rows_backward(const Tensor& grad_unit, const Normalized& n) {
  Tensor g_dot_u = (grad_unit * n.unit).sum(1, /*keepdim=*/true);
  Tensor norm = n.norm.unsqueeze(1);
  Tensor projected = (grad_unit - g_dot_u * n.unit) / norm.clamp_min(kNormEps);
  return at::where(norm > kNormEps, projected, grad_unit / kNormEps);
}

// Partial softmax state of every row over a set of queue columns: running max (0 for the
// unshifted sweep), sum of exp(logit - max) and A = sum of exp(logit - max) q_j.
struct Partials {
  Tensor max, sum, acc;  // (segments, rows), (segments, rows), (segments, rows, dim)
};

// One sweep over the queue. The columns of every row block are cut into segments (a few per
// thread); threads claim (row block, segment) items from a shared counter, so a thread that
// the OS delays simply does fewer items. Each item owns its partial state and items are
// merged in a fixed order afterwards (flash-decoding), so results do not depend on which
// thread ran what. Returns false if `unshifted` was asked for but a queue tile's logit bound
// 1/T * max ||q_j|| exceeds the unshifted limit (the caller then sweeps again with a max).
bool sweep_queue(const Tensor& scaled_u, const Tensor& queue, double scale, bool unshifted, Partials& out) {
  const int64_t rows = scaled_u.size(0), dim = scaled_u.size(1), keys = queue.size(0);
  const at::TensorOptions opts = scaled_u.options();
  const at::ScalarType acc = opts.dtype().toScalarType();
  const double limit = acc == at::kDouble ? unshifted_logit_limit<double>() : unshifted_logit_limit<float>();

  const int64_t row_block = std::min(rows, kMaxRowBlock);
  const int64_t tile_cols = std::max<int64_t>(256, kTileElems / row_block);
  const int64_t row_blocks = (rows + row_block - 1) / row_block;
  const int64_t col_tiles = (keys + tile_cols - 1) / tile_cols;
  const int64_t threads = at::get_num_threads();
  // ~4 items per thread balance the load without making the partial state large.
  const int64_t wanted = (4 * threads + row_blocks - 1) / row_blocks;
  const int64_t segments = std::max<int64_t>(1, std::min(col_tiles, wanted));
  const int64_t tiles_per_segment = col_tiles == 0 ? 0 : (col_tiles + segments - 1) / segments;
  const int64_t items = row_blocks * segments;

  const double init_max = unshifted ? 0.0 : -std::numeric_limits<double>::infinity();
  out.max = at::full({segments, rows}, init_max, opts);
  out.sum = at::zeros({segments, rows}, opts);
  out.acc = at::zeros({segments, rows, dim}, opts);
  const bool convert_queue = queue.scalar_type() != acc;
  std::atomic<int64_t> next_item{0};
  std::atomic<bool> bound_exceeded{false};

  at::parallel_for(0, std::min(threads, items), 1, [&](int64_t, int64_t) {
    Tensor tile_buf = at::empty({row_block, tile_cols}, opts);
    Tensor queue_buf = convert_queue ? at::empty({tile_cols, dim}, opts) : Tensor();
    for (int64_t item = next_item++; item < items && !bound_exceeded; item = next_item++) {
      const int64_t rb = item / segments, seg = item % segments;
      const int64_t r0 = rb * row_block, br = std::min(row_block, rows - r0);
      Tensor u_r = scaled_u.narrow(0, r0, br);
      Tensor m_r = out.max[seg].narrow(0, r0, br);
      Tensor l_r = out.sum[seg].narrow(0, r0, br);
      Tensor a_r = out.acc[seg].narrow(0, r0, br);
      const int64_t t_end = std::min(col_tiles, (seg + 1) * tiles_per_segment);
      for (int64_t t = seg * tiles_per_segment; t < t_end; ++t) {
        const int64_t c0 = t * tile_cols, bc = std::min(tile_cols, keys - c0);
        Tensor q_t = queue.narrow(0, c0, bc);
        if (convert_queue) q_t = queue_buf.narrow(0, 0, bc).copy_(q_t);
        Tensor logits = tile_buf.narrow(0, 0, br).narrow(1, 0, bc);
        at::mm_out(logits, u_r, q_t.t());
        if (unshifted) {
          // The tile is in cache: checking its rows' norms costs little next to the GEMMs.
          // (A NaN norm also fails the test and is left to the running-max sweep.)
          const double tile_bound = scale * at::linalg_vector_norm(q_t, 2, {1}).max().item<double>();
          if (!(tile_bound <= limit)) {
            bound_exceeded = true;
            return;
          }
          logits.exp_();
        } else {
          // New running max M = max(m, tile max); rescale the old sum and A by exp(m - M)
          // (m = -inf on the first tile gives 0; M is finite for finite inputs).
          Tensor new_max = at::maximum(m_r, std::get<0>(logits.max(1)));
          Tensor rescale = (m_r - new_max).exp_();
          logits.sub_(new_max.unsqueeze(1)).exp_();
          l_r.mul_(rescale);
          a_r.mul_(rescale.unsqueeze(1));
          m_r.copy_(new_max);
        }
        l_r.add_(logits.sum(1));
        a_r.addmm_(logits, q_t);
      }
    }
  });
  return !bound_exceeded;
}

// (loss, lse, A): loss = mean_i (lse_i - S_i0), lse_i over the positive and the queue,
// A_i = sum_j P_ij q_j over the queue only.
std::tuple<Tensor, Tensor, Tensor> moco_forward_cpu(const Tensor& query, const Tensor& key,
                                                    const Tensor& queue, double temperature) {
  check_moco(query, key, queue, temperature);
  const at::ScalarType acc = accumulate_type(query);
  const double scale = 1.0 / temperature;
  Normalized nq = normalize_rows(query, acc), nk = normalize_rows(key, acc);
  Tensor positive = (nq.unit * nk.unit).sum(1) * scale;
  Tensor scaled_u = nq.unit * scale;  // folds 1/T into the logit GEMM

  // Unshifted sweep first (plain sums of exp(logit), no max pass, no rescaling); logits
  // that could overflow it (small T, large queue rows) take the running-max sweep.
  Partials part;
  if (!sweep_queue(scaled_u, queue, scale, /*unshifted=*/true, part)) {
    sweep_queue(scaled_u, queue, scale, /*unshifted=*/false, part);
  }

  // Merge the segments and the positive logit (max S_i0, sum 1, no contribution to A). A
  // segment without columns (an empty queue) keeps the unshifted sweep's shift 0 as its max:
  // it must not count, or max_all = 0 would underflow exp(S_i0) for a negative positive logit.
  Tensor seg_max = part.max.masked_fill(part.sum == 0, -std::numeric_limits<double>::infinity());
  Tensor max_all = at::maximum(std::get<0>(seg_max.max(0)), positive);
  Tensor weight = (seg_max - max_all.unsqueeze(0)).exp_();  // (segments, rows); -inf -> 0
  Tensor queue_sum = (part.sum * weight).sum(0);
  Tensor sum = queue_sum + (positive - max_all).exp();
  Tensor expected_queue = (part.acc * weight.unsqueeze(2)).sum(0) / sum.unsqueeze(1);
  Tensor lse = max_all + sum.log();
  // Row cross-entropies lse - S_i0 = log1p(sum_j exp(S_ij - S_i0)) from the queue's sum alone
  // (cross_entropy_from_negatives in common.h, as the CUDA kernel): a row whose positive
  // dominates costs no rounding of lse to the precision of the max; exactly 0 without a queue,
  // never negative, NaN stays.
  Tensor x = queue_sum * (max_all - positive).exp();
  Tensor ce = at::where(x == std::numeric_limits<double>::infinity(), (max_all - positive) + queue_sum.log(), x.log1p());
  Tensor loss = ce.clamp_min(0).mean().to(query.scalar_type());
  return {loss, lse, expected_queue};
}

// grad_u_i = (g / (T N)) [ (P_i0 - 1) v_i + A_i ],  grad_v_i = (g / (T N)) (P_i0 - 1) u_i.
// Only O(N d) work in at:: ops, so the same function serves CPU and CUDA tensors.
std::tuple<Tensor, Tensor> moco_backward(const Tensor& grad_loss, const Tensor& query, const Tensor& key,
                                         const Tensor& lse, const Tensor& expected_queue,
                                         double temperature, std::array<bool, 2> output_mask) {
  TORCH_CHECK(temperature > 0, "pyssl.moco_backward: temperature must be > 0, got ", temperature);
  TORCH_CHECK(query.dim() == 2 && query.sizes() == key.sizes(),
              "pyssl.moco_backward: query and key must be 2-D of one shape, got ", query.sizes(), " and ",
              key.sizes());
  const int64_t rows = query.size(0);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == rows, "pyssl.moco_backward: lse must have shape (", rows,
              "), got ", lse.sizes());
  TORCH_CHECK(expected_queue.sizes() == query.sizes(),
              "pyssl.moco_backward: expected_queue must have the shape of query, got ", expected_queue.sizes());
  const at::ScalarType acc = accumulate_type(query);
  const double scale = 1.0 / temperature;
  Normalized nq = normalize_rows(query, acc), nk = normalize_rows(key, acc);
  Tensor positive = (nq.unit * nk.unit).sum(1) * scale;
  Tensor coef = grad_loss.to(acc) * (scale / static_cast<double>(rows));
  Tensor p0_minus_1 = ((positive - lse.to(acc)).exp() - 1.0).unsqueeze(1);
  Tensor grad_query, grad_key;
  if (output_mask[0]) {
    Tensor grad_u = (p0_minus_1 * nk.unit + expected_queue.to(acc)) * coef;
    grad_query = normalize_rows_backward(grad_u, nq).to(query.scalar_type());
  }
  if (output_mask[1]) grad_key = normalize_rows_backward(p0_minus_1 * nq.unit * coef, nk).to(key.scalar_type());
  return {grad_query, grad_key};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssl, CPU, m) {
  m.impl("moco_forward", &moco_forward_cpu);
  m.impl("moco_backward", &moco_backward);
}

// The backward is a handful of O(N d) elementwise ops (the forward did the sweep), so the
// device-generic at:: version above is registered for CUDA tensors too.
TORCH_LIBRARY_IMPL(pyssl, CUDA, m) { m.impl("moco_backward", &moco_backward); }

}  // namespace pyssl::moco
