// CPU kernels of the fused InfoNCE family: tiled over row/column blocks, one BLAS GEMM per
// tile, online log-sum-exp merged per row; the (rows x keys) logit matrix is never allocated.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "common_cpu.h"
#include "infonce/infonce_check.h"
#include "infonce/infonce_math.h"

namespace pyssl::infonce {
namespace {

using at::Tensor;

// Rows per tile side. 512 x 512 float tiles (1 MiB) stay in L2/L3 while the GEMM of a tile
// with d = 128 is still large enough for BLAS to run near its peak.
constexpr int64_t kBlock = 512;

using cpu::accumulate_type;
using cpu::Normalized;
using cpu::normalize_rows;

// grad_z from grad_u through the normalisation (see normalize_backward in infonce_math.h).
Tensor normalize_rows_backward(const Tensor& grad_unit, const Normalized& n) {
  Tensor g_dot_u = (grad_unit * n.unit).sum(1);
  Tensor out = at::empty_like(grad_unit);
  const int64_t rows = grad_unit.size(0), dim = grad_unit.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad_unit.scalar_type(), "pyssl_normalize_backward", [&] {
    const scalar_t* g = grad_unit.const_data_ptr<scalar_t>();
    const scalar_t* u = n.unit.const_data_ptr<scalar_t>();
    const scalar_t* dot = g_dot_u.const_data_ptr<scalar_t>();
    const scalar_t* norm = n.norm.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < dim; ++c) {
          const int64_t k = r * dim + c;
          o[k] = normalize_backward<scalar_t>(g[k], u[k], dot[r], norm[r]);
        }
      }
    });
  });
  return out;
}

// Running log-sum-exp state of a set of rows (or columns).
struct LseState {
  Tensor max, sum;
  LseState(int64_t n, const at::TensorOptions& opts)
      : max(at::full({n}, -std::numeric_limits<double>::infinity(), opts)),
        sum(at::zeros({n}, opts)) {}

  // Merge the partial max/sum of rows [offset, offset + part_max.size(0)).
  void merge(int64_t offset, const Tensor& part_max, const Tensor& part_sum) {
    AT_DISPATCH_FLOATING_TYPES(max.scalar_type(), "pyssl_lse_merge", [&] {
      scalar_t* m = max.mutable_data_ptr<scalar_t>() + offset;
      scalar_t* s = sum.mutable_data_ptr<scalar_t>() + offset;
      const scalar_t* pm = part_max.const_data_ptr<scalar_t>();
      const scalar_t* ps = part_sum.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < part_max.size(0); ++i) lse_merge<scalar_t>(m[i], s[i], pm[i], ps[i]);
    });
  }

  // For statistics over the negatives only (the positives left out of the tiles): (lse, the
  // row cross-entropies lse - positive), the positive merged in last (cross_entropy_from_negatives).
  std::pair<Tensor, Tensor> finalize_with(const Tensor& positive) const {
    Tensor lse = at::empty_like(max), ce = at::empty_like(max);
    AT_DISPATCH_FLOATING_TYPES(max.scalar_type(), "pyssl_lse_finalize_with", [&] {
      const scalar_t* m = max.const_data_ptr<scalar_t>();
      const scalar_t* s = sum.const_data_ptr<scalar_t>();
      const scalar_t* p = positive.const_data_ptr<scalar_t>();
      scalar_t* lse_out = lse.mutable_data_ptr<scalar_t>();
      scalar_t* ce_out = ce.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < max.size(0); ++i) {
        ce_out[i] = cross_entropy_from_negatives<scalar_t>(m[i], s[i], p[i]);
        scalar_t row_max = m[i], row_sum = s[i];
        lse_merge<scalar_t>(row_max, row_sum, p[i], scalar_t(1));
        lse_out[i] = lse_finalize<scalar_t>(row_max, row_sum);
      }
    });
    return {lse, ce};
  }

  Tensor finalize() const {
    Tensor out = at::empty_like(max);
    AT_DISPATCH_FLOATING_TYPES(max.scalar_type(), "pyssl_lse_finalize", [&] {
      const scalar_t* m = max.const_data_ptr<scalar_t>();
      const scalar_t* s = sum.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < max.size(0); ++i) o[i] = lse_finalize<scalar_t>(m[i], s[i]);
    });
    return out;
  }
};

// Accumulates one logit tile into the row statistics (and, if `cols` is given, the column
// statistics). With a fixed shift every exp serves both sides; otherwise each side keeps a
// running max. `tile` is overwritten.
struct TileLse {
  bool fixed_shift;
  double shift;

  void accumulate(Tensor& tile, LseState& rows, int64_t row0, LseState* cols, int64_t col0,
                  Tensor& scratch) const {
    if (fixed_shift) {
      tile.sub_(shift).exp_();
      Tensor shift_vec = at::full({1}, shift, tile.options());
      rows.merge(row0, shift_vec.expand({tile.size(0)}).contiguous(), tile.sum(1));
      if (cols != nullptr) cols->merge(col0, shift_vec.expand({tile.size(1)}).contiguous(), tile.sum(0));
      return;
    }
    const double inf = std::numeric_limits<double>::infinity();
    if (cols != nullptr) {
      Tensor col_max = std::get<0>(tile.max(0));
      Tensor safe = col_max.masked_fill(col_max == -inf, 0.0);
      at::sub_out(scratch, tile, safe.unsqueeze(0)).exp_();
      cols->merge(col0, col_max.contiguous(), scratch.sum(0));
    }
    Tensor row_max = std::get<0>(tile.max(1));
    Tensor safe = row_max.masked_fill(row_max == -inf, 0.0);
    tile.sub_(safe.unsqueeze(1)).exp_();
    rows.merge(row0, row_max.contiguous(), tile.sum(1));
  }
};

// positive[r] = tile[r - row0][col_of(r) - col0] for the rows r in [row0, row0 + tile rows)
// whose positive column col_of(r) lies in the tile (col_of(r) < 0: none); with `by_column`,
// the tile is read transposed (rows are its columns). With `exclude`, those entries become
// -inf: the sums then hold the negatives only, and the loss adds the positive exactly
// (cross_entropy_from_negatives). The positive is the very logit of the tile, not a second dot
// product rounded another way.
template <typename ColumnOf>
void take_positives(const Tensor& tile, int64_t row0, int64_t col0, bool by_column, bool exclude, ColumnOf col_of,
                    Tensor& positive) {
  const int64_t n_rows = tile.size(by_column ? 1 : 0), n_cols = tile.size(by_column ? 0 : 1);
  const int64_t row_stride = tile.stride(by_column ? 1 : 0), col_stride = tile.stride(by_column ? 0 : 1);
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "pyssl_gather_positives", [&] {
    scalar_t* t = tile.mutable_data_ptr<scalar_t>();
    scalar_t* out = positive.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t c = col_of(row0 + r) - col0;
      if (c < 0 || c >= n_cols) continue;
      scalar_t& entry = t[r * row_stride + c * col_stride];
      out[row0 + r] = entry;
      if (exclude) entry = -std::numeric_limits<scalar_t>::infinity();
    }
  });
}

TileLse make_tile_lse(double scale, at::ScalarType acc) {
  const bool fixed = acc == at::kDouble ? can_use_fixed_shift<double>(scale)
                                        : can_use_fixed_shift<float>(static_cast<float>(scale));
  return TileLse{fixed, scale};
}

// ---- NT-Xent ----------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> ntxent_forward_cpu(const Tensor& z, double temperature, std::optional<bool>) {
  check_ntxent(z, temperature);
  const at::ScalarType acc = accumulate_type(z);
  const int64_t rows = z.size(0), pairs = rows / 2;
  const double scale = 1.0 / temperature;
  Normalized n = normalize_rows(z, acc);
  const Tensor& u = n.unit;

  // S is symmetric: visit each unordered block pair once; the tile feeds the row statistics of
  // block I and, read by columns, those of block J.
  LseState stats(rows, u.options());
  Tensor positive = at::empty({rows}, u.options());
  const auto partner = [pairs](int64_t r) { return ntxent_positive(r, pairs); };
  TileLse tile_lse = make_tile_lse(scale, acc);
  Tensor tile_buf = at::empty({kBlock, kBlock}, u.options());
  Tensor scratch_buf = at::empty({kBlock, kBlock}, u.options());
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t bi = std::min(kBlock, rows - i0);
    Tensor u_i = u.narrow(0, i0, bi);
    for (int64_t j0 = i0; j0 < rows; j0 += kBlock) {
      const int64_t bj = std::min(kBlock, rows - j0);
      Tensor tile = tile_buf.narrow(0, 0, bi).narrow(1, 0, bj);
      Tensor scratch = scratch_buf.narrow(0, 0, bi).narrow(1, 0, bj);
      at::mm_out(tile, u_i, u.narrow(0, j0, bj).t());
      tile.mul_(scale);
      // Off the diagonal, row r's positive (r, p(r)) is also column p(r)'s: read by both sides,
      // excluded after the second read.
      take_positives(tile, i0, j0, /*by_column=*/false, /*exclude=*/i0 == j0, partner, positive);
      if (i0 != j0) take_positives(tile, j0, i0, /*by_column=*/true, /*exclude=*/true, partner, positive);
      if (i0 == j0) {
        tile.diagonal().fill_(-std::numeric_limits<double>::infinity());
        tile_lse.accumulate(tile, stats, i0, nullptr, 0, scratch);
      } else {
        tile_lse.accumulate(tile, stats, i0, &stats, j0, scratch);
      }
    }
  }
  auto [lse, ce] = stats.finalize_with(positive);
  Tensor loss = ce.mean().to(z.scalar_type());
  return {loss, lse};
}

Tensor ntxent_backward_cpu(const Tensor& grad_loss, const Tensor& z, const Tensor& lse,
                           double temperature, std::optional<bool>) {
  check_ntxent(z, temperature);
  const at::ScalarType acc = accumulate_type(z);
  const int64_t rows = z.size(0), pairs = rows / 2;
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == rows, "pyssl.ntxent_backward: lse must have shape (",
              rows, "), got ", lse.sizes());
  const double scale = 1.0 / temperature;
  Normalized n = normalize_rows(z, acc);
  const Tensor& u = n.unit;
  Tensor lse_acc = lse.to(acc).contiguous();

  // dU = sum over tiles of (P_IJ + P_JI^T) U_J (and its transpose for block J); G's
  // -delta part and the common factor scale * grad / rows are applied once at the end.
  Tensor grad_u = at::zeros_like(u);
  Tensor tile_buf = at::empty({kBlock, kBlock}, u.options());
  Tensor prob_buf = at::empty({kBlock, kBlock}, u.options());
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t bi = std::min(kBlock, rows - i0);
    Tensor u_i = u.narrow(0, i0, bi);
    Tensor lse_i = lse_acc.narrow(0, i0, bi);
    for (int64_t j0 = i0; j0 < rows; j0 += kBlock) {
      const int64_t bj = std::min(kBlock, rows - j0);
      Tensor u_j = u.narrow(0, j0, bj);
      Tensor tile = tile_buf.narrow(0, 0, bi).narrow(1, 0, bj);
      Tensor prob = prob_buf.narrow(0, 0, bi).narrow(1, 0, bj);
      at::mm_out(tile, u_i, u_j.t());
      tile.mul_(scale);
      // prob = P_IJ (row-normalised by lse_I); tile becomes P_JI^T (normalised by lse_J).
      at::sub_out(prob, tile, lse_i.unsqueeze(1)).exp_();
      tile.sub_(lse_acc.narrow(0, j0, bj).unsqueeze(0)).exp_();
      prob.add_(tile);
      if (i0 == j0) {
        prob.diagonal().zero_();
        grad_u.narrow(0, i0, bi).addmm_(prob, u_i);
      } else {
        grad_u.narrow(0, i0, bi).addmm_(prob, u_j);
        grad_u.narrow(0, j0, bj).addmm_(prob.t(), u_i);
      }
    }
  }
  // The positive logit S_{k,p(k)} appears in row k and (as S_{p(k),k}) in row p(k).
  Tensor partner = at::cat({u.narrow(0, pairs, pairs), u.narrow(0, 0, pairs)});
  grad_u.sub_(partner, 2.0);
  const double factor = grad_loss.item<double>() * scale / static_cast<double>(rows);
  grad_u.mul_(factor);
  return normalize_rows_backward(grad_u, n).to(z.scalar_type());
}

// ---- InfoNCE / CLIP ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> infonce_forward_cpu(const Tensor& query, const Tensor& key,
                                                       const Tensor& logit_scale, bool symmetric,
                                                       std::optional<bool>) {
  check_infonce(query, key, logit_scale, symmetric);
  const double scale = checked_logit_scale(logit_scale);
  const at::ScalarType acc = accumulate_type(query);
  const int64_t rows = query.size(0), keys = key.size(0);
  Normalized nq = normalize_rows(query, acc), nk = normalize_rows(key, acc);
  const Tensor &u = nq.unit, &v = nk.unit;

  LseState row_stats(rows, u.options());
  LseState col_stats(symmetric ? keys : 0, u.options());
  Tensor positive = at::empty({rows}, u.options());  // S_ii: row i's positive, and column i's
  const auto diagonal = [rows](int64_t r) { return r < rows ? r : int64_t{-1}; };
  TileLse tile_lse = make_tile_lse(scale, acc);
  Tensor tile_buf = at::empty({kBlock, kBlock}, u.options());
  Tensor scratch_buf = at::empty({kBlock, kBlock}, u.options());
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t bi = std::min(kBlock, rows - i0);
    Tensor u_i = u.narrow(0, i0, bi);
    for (int64_t j0 = 0; j0 < keys; j0 += kBlock) {
      const int64_t bj = std::min(kBlock, keys - j0);
      Tensor tile = tile_buf.narrow(0, 0, bi).narrow(1, 0, bj);
      Tensor scratch = scratch_buf.narrow(0, 0, bi).narrow(1, 0, bj);
      at::mm_out(tile, u_i, v.narrow(0, j0, bj).t());
      tile.mul_(scale);
      // S_ii is row i's positive and, for CLIP, column i's: excluded from both sums.
      take_positives(tile, i0, j0, /*by_column=*/false, /*exclude=*/true, diagonal, positive);
      tile_lse.accumulate(tile, row_stats, i0, symmetric ? &col_stats : nullptr, j0, scratch);
    }
  }
  auto [lse_row, ce_row] = row_stats.finalize_with(positive);
  Tensor loss = ce_row.mean();
  Tensor lse_col = at::empty({0}, u.options());
  if (symmetric) {
    auto [lse_c, ce_col] = col_stats.finalize_with(positive);
    lse_col = lse_c;
    loss = 0.5 * (loss + ce_col.mean());
  }
  return {loss.to(query.scalar_type()), lse_row, lse_col};
}

std::tuple<Tensor, Tensor, Tensor> infonce_backward_cpu(const Tensor& grad_loss, const Tensor& query,
                                                        const Tensor& key, const Tensor& logit_scale,
                                                        const Tensor& lse_row, const Tensor& lse_col,
                                                        bool symmetric, std::optional<bool>,
                                                        std::array<bool, 3> output_mask) {
  check_infonce(query, key, logit_scale, symmetric);
  const double scale = checked_logit_scale(logit_scale);
  const bool want_query = output_mask[0], want_key = output_mask[1], want_scale = output_mask[2];
  const at::ScalarType acc = accumulate_type(query);
  const int64_t rows = query.size(0), keys = key.size(0);
  TORCH_CHECK(lse_row.dim() == 1 && lse_row.size(0) == rows,
              "pyssl.infonce_backward: lse_row must have shape (", rows, "), got ", lse_row.sizes());
  TORCH_CHECK(!symmetric || (lse_col.dim() == 1 && lse_col.size(0) == keys),
              "pyssl.infonce_backward: lse_col must have shape (", keys, "), got ", lse_col.sizes());
  Normalized nq = normalize_rows(query, acc), nk = normalize_rows(key, acc);
  const Tensor &u = nq.unit, &v = nk.unit;
  Tensor lse_r = lse_row.to(acc).contiguous();
  Tensor lse_c = symmetric ? lse_col.to(acc).contiguous() : Tensor();

  // Sums of P over the tiles; the -delta part and 1/rows (1/(2 rows) for CLIP) come after.
  Tensor grad_u = at::zeros_like(u), grad_v = at::zeros_like(v);
  Tensor prob_dot_cos = at::zeros({}, u.options());  // sum_ij P_ij cos_ij, for d loss / d scale
  Tensor cos_buf = at::empty({kBlock, kBlock}, u.options());
  Tensor prob_buf = at::empty({kBlock, kBlock}, u.options());
  Tensor col_buf = at::empty({kBlock, kBlock}, u.options());
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t bi = std::min(kBlock, rows - i0);
    Tensor u_i = u.narrow(0, i0, bi);
    Tensor lse_i = lse_r.narrow(0, i0, bi);
    for (int64_t j0 = 0; j0 < keys; j0 += kBlock) {
      const int64_t bj = std::min(kBlock, keys - j0);
      Tensor v_j = v.narrow(0, j0, bj);
      Tensor cos = cos_buf.narrow(0, 0, bi).narrow(1, 0, bj);
      Tensor prob = prob_buf.narrow(0, 0, bi).narrow(1, 0, bj);
      at::mm_out(cos, u_i, v_j.t());
      at::mul_out(prob, cos, scale).sub_(lse_i.unsqueeze(1)).exp_();
      if (symmetric) {
        Tensor col = col_buf.narrow(0, 0, bi).narrow(1, 0, bj);
        at::mul_out(col, cos, scale).sub_(lse_c.narrow(0, j0, bj).unsqueeze(0)).exp_();
        prob.add_(col);
      }
      if (want_query) grad_u.narrow(0, i0, bi).addmm_(prob, v_j);
      if (want_key) grad_v.narrow(0, j0, bj).addmm_(prob.t(), u_i);
      if (want_scale) prob_dot_cos.add_((prob * cos).sum());
    }
  }
  const double positives_per_row = symmetric ? 2.0 : 1.0;
  Tensor v_pos = v.narrow(0, 0, rows);
  grad_u.sub_(v_pos, positives_per_row);
  grad_v.narrow(0, 0, rows).sub_(u, positives_per_row);
  prob_dot_cos.sub_((u * v_pos).sum(), positives_per_row);

  const double mean_factor = 1.0 / (positives_per_row * static_cast<double>(rows));
  const double grad = grad_loss.item<double>();
  grad_u.mul_(grad * scale * mean_factor);
  grad_v.mul_(grad * scale * mean_factor);
  Tensor grad_scale = want_scale ? (prob_dot_cos * (grad * mean_factor))
                                       .to(logit_scale.scalar_type())
                                       .reshape(logit_scale.sizes())
                                 : Tensor();
  return {want_query ? normalize_rows_backward(grad_u, nq).to(query.scalar_type()) : Tensor(),
          want_key ? normalize_rows_backward(grad_v, nk).to(key.scalar_type()) : Tensor(), grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssl, CPU, m) {
  m.impl("ntxent_forward", &ntxent_forward_cpu);
  m.impl("ntxent_backward", &ntxent_backward_cpu);
  m.impl("infonce_forward", &infonce_forward_cpu);
  m.impl("infonce_backward", &infonce_backward_cpu);
}

}  // namespace pyssl::infonce
