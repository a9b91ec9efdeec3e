#pragma once
// Device kernels of the fused InfoNCE family (included by infonce_cuda.cu only).
//
// Every kernel works on "padded unit rows": u = z / max(||z||, eps) in the accumulation type
// (float32, or float64 for float64 input), stored row-major with rows padded to a multiple of
// kTile and features padded to a multiple of kDepth, the padding zero-filled. The padding lets
// the tile loads run without bounds checks; padded rows and columns are excluded from every
// sum by predicate, never by a sentinel value.
//
// Thread layout of a 256-thread block on a kTile x kTile logit tile: thread (ty, tx), both in
// 0..15, owns rows ty + 16 r and columns tx + 16 c (r, c in 0..3). The 16 threads owning a
// row are the 16 lanes of one half-warp, so per-row reductions are 4 xor-shuffles.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "device_smem.h"
#include "infonce/infonce_math.h"

namespace pyssl::infonce::cuda {

constexpr int kTile = 64;                  // rows (and columns) of one logit tile
constexpr int kDepth = 16;                 // features per shared-memory slice; d is padded to it
constexpr int kPad = kTile + 1;            // shared row length: +1 spreads the transposed stores
constexpr int kThreads = 256;              // 16 x 16 threads
constexpr int kMicro = 4;                  // 4 x 4 logits per thread
constexpr int kGradCols = 128;             // features of dX owned by one backward block
constexpr int kGradMicro = kGradCols / 16; // 8 dX columns per thread
constexpr int kWarps = kThreads / 32;
constexpr int kSPad = kTile + 4;  // float S tile row of the tensor-core kernels (wmma: 4k floats)
constexpr int kGPad = kTile + 8;  // half G tile row of the tensor-core kernels (wmma: 8k halves)

// Dynamic shared memory of grad_partial_kernel, in elements of acc_t: two input slices, the
// G tile and one slice of Y's feature chunk.
constexpr int kGradSmemElems = 2 * kDepth * kPad + kTile * kPad + kDepth * kGradCols;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32;
// `scratch` holds >= 32 values. The leading barrier lets consecutive calls share scratch.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

template <typename out_t, typename acc_t>
__device__ __forceinline__ out_t to_out(acc_t v) {
  if constexpr (std::is_same_v<out_t, float> || std::is_same_v<out_t, double>) {
    return static_cast<out_t>(v);
  } else {
    return out_t(static_cast<float>(v));  // c10::Half / c10::BFloat16 convert from float
  }
}

// One warp per padded row: writes u (zeros past `dim` and for rows >= `rows`) and ||z||, and
// when unit_half is non-null the same u rounded to half for the tensor-core kernels.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    normalize_rows_kernel(const in_t* __restrict__ z, int64_t stride_row, int64_t stride_col,
                          int64_t rows, int64_t rows_pad, int64_t dim, int64_t dim_pad,
                          acc_t* __restrict__ unit, acc_t* __restrict__ norm,
                          __half* __restrict__ unit_half) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows_pad) return;  // the whole warp leaves together
  acc_t* out = unit + row * dim_pad;
  __half* out_half = unit_half != nullptr ? unit_half + row * dim_pad : nullptr;
  if (row >= rows) {
    for (int64_t c = lane; c < dim_pad; c += 32) {
      out[c] = acc_t(0);
      if (out_half != nullptr) out_half[c] = __float2half_rn(0.0f);
    }
    return;
  }
  const in_t* src = z + row * stride_row;
  acc_t sq = 0;
  for (int64_t c = lane; c < dim; c += 32) {
    const acc_t v = static_cast<acc_t>(src[c * stride_col]);
    sq += v * v;
  }
  const acc_t nrm = sqrt_acc(warp_sum(sq));
  const acc_t denom = nrm > acc_t(kNormEps) ? nrm : acc_t(kNormEps);
  for (int64_t c = lane; c < dim_pad; c += 32) {
    const acc_t v = c < dim ? static_cast<acc_t>(src[c * stride_col]) / denom : acc_t(0);
    out[c] = v;
    if (out_half != nullptr) out_half[c] = __float2half_rn(static_cast<float>(v));
  }
  if (lane == 0) norm[row] = nrm;
}

// dot[r][c] = x[row0 + ty + 16 r] . y[col0 + tx + 16 c] over all dim_pad features. Both
// matrices are padded, so no load needs a bounds check. Ends with a barrier: xs/ys are free.
template <typename acc_t>
__device__ __forceinline__ void tile_dot(const acc_t* __restrict__ x, const acc_t* __restrict__ y,
                                         int64_t row0, int64_t col0, int64_t dim_pad,
                                         acc_t (*xs)[kPad], acc_t (*ys)[kPad],
                                         acc_t (&dot)[kMicro][kMicro]) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
#pragma unroll
  for (int r = 0; r < kMicro; ++r)
#pragma unroll
    for (int c = 0; c < kMicro; ++c) dot[r][c] = acc_t(0);
  const acc_t* x_tile = x + row0 * dim_pad;
  const acc_t* y_tile = y + col0 * dim_pad;
  for (int64_t k0 = 0; k0 < dim_pad; k0 += kDepth) {
    // kTile x kDepth values per matrix, 4 per thread; 16 consecutive threads read one row's
    // slice (coalesced) and store it transposed.
#pragma unroll
    for (int l = 0; l < kTile * kDepth / kThreads; ++l) {
      const int idx = tid + l * kThreads;
      const int m = idx / kDepth, k = idx % kDepth;
      xs[k][m] = x_tile[m * dim_pad + k0 + k];
      ys[k][m] = y_tile[m * dim_pad + k0 + k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      acc_t a[kMicro], b[kMicro];
#pragma unroll
      for (int r = 0; r < kMicro; ++r) a[r] = xs[k][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < kMicro; ++c) b[c] = ys[k][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < kMicro; ++r)
#pragma unroll
        for (int c = 0; c < kMicro; ++c) dot[r][c] += a[r] * b[c];
    }
    __syncthreads();
  }
}

// ---- per-tile elementwise phases, shared by the SIMT and the tensor-core kernels ----------------

// Where a row sweep leaves each row's positive logit: pos[row] for the rows < n_x; the positive
// of row i is column ntxent_positive(i, pairs) when pairs > 0, else column i; pos null: none.
template <typename acc_t>
struct PositiveLogits {
  acc_t* pos;
  int64_t n_x, pairs;

  __device__ __forceinline__ int64_t column(int64_t row) const {
    return pos == nullptr || row >= n_x ? -1 : (pairs > 0 ? ntxent_positive(row, pairs) : row);
  }
};

// Online row statistics of the 4 rows a thread owns, over the columns it owns.
template <typename acc_t>
struct RowStats {
  acc_t max[kMicro], sum[kMicro];

  __device__ __forceinline__ void init(bool fixed, acc_t scale) {
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
      max[r] = fixed ? scale : acc_t(-INFINITY);
      sum[r] = acc_t(0);
    }
  }

  // Folds in the thread's 4 x 4 logits scale * dot of the tile at (row0, col0). Columns
  // >= n_y (padding) and, with mask_diagonal, column == row are left out by predicate. So is a
  // row's positive logit, stored instead (one thread of the grid meets it): the sums hold the
  // negatives, and lse_merge_kernel adds the positive exactly as the CPU kernel does.
  __device__ __forceinline__ void update(const acc_t (&dot)[kMicro][kMicro], int64_t row0,
                                         int64_t col0, int64_t n_y, bool mask_diagonal,
                                         bool fixed, acc_t scale, const PositiveLogits<acc_t>& positives) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
      const int64_t row = row0 + ty + 16 * r;
      const int64_t positive_col = positives.column(row);
      bool ok[kMicro];
      acc_t s[kMicro];
      acc_t tile_max = acc_t(-INFINITY);
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const int64_t col = col0 + tx + 16 * c;
        s[c] = scale * dot[r][c];
        if (col == positive_col) positives.pos[row] = s[c];
        ok[c] = col < n_y && !(mask_diagonal && col == row) && col != positive_col;
        if (ok[c] && s[c] > tile_max) tile_max = s[c];
      }
      if (fixed) {  // |S| <= scale: one exp per logit, no running max
#pragma unroll
        for (int c = 0; c < kMicro; ++c)
          if (ok[c]) sum[r] += exp_acc(s[c] - scale);
      } else if (tile_max != acc_t(-INFINITY)) {
        acc_t part = 0;
#pragma unroll
        for (int c = 0; c < kMicro; ++c)
          if (ok[c]) part += exp_acc(s[c] - tile_max);
        lse_merge<acc_t>(max[r], sum[r], tile_max, part);
      }
    }
  }

  // Merges the 16 lanes (one half-warp) sharing each row; lane tx == 0 writes the partial
  // (max, sum) of its rows < n_x to part_max/part_sum[split * n_x + row].
  __device__ __forceinline__ void write(int64_t row0, int64_t n_x, int64_t split,
                                        acc_t* __restrict__ part_max, acc_t* __restrict__ part_sum) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
#pragma unroll
      for (int off = 8; off > 0; off /= 2) {
        const acc_t other_max = __shfl_xor_sync(0xffffffffu, max[r], off);
        const acc_t other_sum = __shfl_xor_sync(0xffffffffu, sum[r], off);
        lse_merge<acc_t>(max[r], sum[r], other_max, other_sum);
      }
      const int64_t row = row0 + ty + 16 * r;
      if (tx == 0 && row < n_x) {
        part_max[split * n_x + row] = max[r];
        part_sum[split * n_x + row] = sum[r];
      }
    }
  }
};

// What the backward needs to form G for one sweep (see grad_partial_kernel).
template <typename acc_t>
struct GradTerms {
  const acc_t* lse_x;  // row-side lse (indexed by x row) or null
  const acc_t* lse_y;  // column-side lse (indexed by y row) or null
  int64_t n_x, n_y;
  bool mask_diagonal;
  int64_t pairs;       // > 0: the positive of row i is column ntxent_positive(i, pairs); else i
  acc_t n_pos;         // how many times the positive logit enters the loss of row i (1 or 2)

  // G_ij for an x row and y column of the tile (0 where (i, j) is not an allowed pair):
  //   exp(S - lse_x[i]) + exp(S - lse_y[j]) - n_pos [j is i's positive].
  // The -delta is folded in here, in acc_t, so that a confident row (P_ii near 1) keeps its
  // small G_ii exactly when G is later rounded to half for the tensor cores.
  __device__ __forceinline__ acc_t operator()(acc_t dot, acc_t scale, int64_t row, int64_t col) const {
    if (row >= n_x || col >= n_y || (mask_diagonal && row == col)) return acc_t(0);
    const acc_t s = scale * dot;
    acc_t g = 0;
    if (lse_x != nullptr) g += exp_acc(s - lse_x[row]);
    if (lse_y != nullptr) g += exp_acc(s - lse_y[col]);
    const int64_t positive = pairs > 0 ? ntxent_positive(row, pairs) : row;
    if (col == positive) g -= n_pos;
    return g;
  }
};

// ---- SIMT kernels (float32 / float64 rows) ---------------------------------------------------

// Row log-sum-exp, split over columns: block (bx, by) owns rows [64 bx, 64 bx + 64) of x and
// the column tiles [by * tiles_per_split, ...) of y, and writes the partial (max, sum) of each
// of its rows to part_max/part_sum[by * n_x + row]. With mask_diagonal, column == row is left
// out (NT-Xent). Padded columns (>= n_y) are left out by predicate.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lse_partial_kernel(const acc_t* __restrict__ x, const acc_t* __restrict__ y, int64_t n_x,
                       int64_t n_y, int64_t dim_pad, const acc_t* __restrict__ scale_ptr,
                       bool mask_diagonal, PositiveLogits<acc_t> positives, int64_t tiles_per_split,
                       acc_t* __restrict__ part_max, acc_t* __restrict__ part_sum) {
  __shared__ acc_t xs[kDepth][kPad];
  __shared__ acc_t ys[kDepth][kPad];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const acc_t scale = *scale_ptr;
  const bool fixed = can_use_fixed_shift<acc_t>(scale);
  RowStats<acc_t> stats;
  stats.init(fixed, scale);
  const int64_t col_tiles = (n_y + kTile - 1) / kTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < col_tiles ? t_begin + tiles_per_split : col_tiles;
  for (int64_t t = t_begin; t < t_end; ++t) {
    acc_t dot[kMicro][kMicro];
    tile_dot(x, y, row0, t * kTile, dim_pad, xs, ys, dot);
    stats.update(dot, row0, t * kTile, n_y, mask_diagonal, fixed, scale, positives);
  }
  stats.write(row0, n_x, blockIdx.y, part_max, part_sum);
}

// lse[i] from the column splits' partial (max, sum) pairs over the negatives and the positive
// logit pos[i], and row i's cross-entropy ce[i] = lse[i] - pos[i] (cross_entropy_from_negatives:
// exactly 0 without negatives, never negative, NaN stays).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lse_merge_kernel(const acc_t* __restrict__ part_max, const acc_t* __restrict__ part_sum,
                     int64_t splits, int64_t n, const acc_t* __restrict__ pos, acc_t* __restrict__ lse,
                     acc_t* __restrict__ ce) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  acc_t m = acc_t(-INFINITY), s = acc_t(0);
  for (int64_t k = 0; k < splits; ++k) lse_merge<acc_t>(m, s, part_max[k * n + i], part_sum[k * n + i]);
  const acc_t p = pos[i];
  ce[i] = cross_entropy_from_negatives<acc_t>(m, s, p);
  lse_merge<acc_t>(m, s, p, acc_t(1));
  lse[i] = lse_finalize<acc_t>(m, s);
}

// Gradient sums by recomputation, split over columns. Block (bx, by, bz) owns rows
// [64 bx, 64 bx + 64) of x, the feature chunk [128 by, 128 by + 128) and the column tiles of
// split bz. For each column tile it recomputes S = scale * x_I . y_J, forms G (GradTerms) and
// accumulates dX_I += G Y_J. The sums land in grad_part[bz][row][feature] (rows < n_x,
// features < dim_pad); the finalize kernel sums the splits. Blocks with by == 0 also write
// sum_ij G_ij (x_i . y_j) to prob_cos_part[bz * gridDim.x + bx] when it is non-null
// (d loss / d logit_scale).
// Two float32 blocks per SM need <= 128 registers a thread; float64 (the gradcheck path) gets
// all it wants.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads, sizeof(acc_t) == 4 ? 2 : 1)
    grad_partial_kernel(const acc_t* __restrict__ x, const acc_t* __restrict__ y, int64_t n_x_pad,
                        int64_t dim_pad, const acc_t* __restrict__ scale_ptr, GradTerms<acc_t> terms,
                        int64_t tiles_per_split, acc_t* __restrict__ grad_part,
                        acc_t* __restrict__ prob_cos_part) {
  acc_t* smem = dynamic_shared_memory<acc_t>();
  auto xs = reinterpret_cast<acc_t(*)[kPad]>(smem);
  auto ys = reinterpret_cast<acc_t(*)[kPad]>(smem + kDepth * kPad);
  auto gs = reinterpret_cast<acc_t(*)[kPad]>(smem + 2 * kDepth * kPad);
  auto vs = reinterpret_cast<acc_t(*)[kGradCols]>(smem + 2 * kDepth * kPad + kTile * kPad);
  __shared__ acc_t reduce_scratch[32];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t feat0 = static_cast<int64_t>(blockIdx.y) * kGradCols;
  const acc_t scale = *scale_ptr;

  acc_t grad[kMicro][kGradMicro];
#pragma unroll
  for (int r = 0; r < kMicro; ++r)
#pragma unroll
    for (int c = 0; c < kGradMicro; ++c) grad[r][c] = acc_t(0);
  acc_t prob_cos = 0;

  const int64_t col_tiles = (terms.n_y + kTile - 1) / kTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.z) * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < col_tiles ? t_begin + tiles_per_split : col_tiles;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * kTile;
    acc_t dot[kMicro][kMicro];
    tile_dot(x, y, row0, col0, dim_pad, xs, ys, dot);
    // G tile into shared memory. The barrier closing the previous tile's G.Y loop (and the
    // one closing tile_dot) ordered every earlier read of gs before these writes.
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
      const int64_t row = row0 + ty + 16 * r;
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const acc_t g = terms(dot[r][c], scale, row, col0 + tx + 16 * c);
        prob_cos += g * dot[r][c];
        gs[ty + 16 * r][tx + 16 * c] = g;
      }
    }
    // dX_I[:, chunk] += G (kTile x kTile) . Y_J[:, chunk], kDepth rows of Y_J at a time.
    for (int n0 = 0; n0 < kTile; n0 += kDepth) {
#pragma unroll
      for (int l = 0; l < kDepth * kGradCols / kThreads; ++l) {
        const int idx = tid + l * kThreads;
        const int k = idx / kGradCols, c = idx % kGradCols;
        const int64_t feat = feat0 + c;
        vs[k][c] = feat < dim_pad ? y[(col0 + n0 + k) * dim_pad + feat] : acc_t(0);
      }
      __syncthreads();  // vs loaded (and, on n0 == 0, gs written)
#pragma unroll
      for (int k = 0; k < kDepth; ++k) {
        acc_t g[kMicro];
#pragma unroll
        for (int r = 0; r < kMicro; ++r) g[r] = gs[ty + 16 * r][n0 + k];
#pragma unroll
        for (int c = 0; c < kGradMicro; ++c) {
          const acc_t v = vs[k][tx + 16 * c];
#pragma unroll
          for (int r = 0; r < kMicro; ++r) grad[r][c] += g[r] * v;
        }
      }
      __syncthreads();  // vs (and gs) free for the next slice / tile
    }
  }

  acc_t* out = grad_part + (static_cast<int64_t>(blockIdx.z) * n_x_pad + row0) * dim_pad;
#pragma unroll
  for (int r = 0; r < kMicro; ++r) {
    const int row_local = ty + 16 * r;
    if (row0 + row_local >= terms.n_x) continue;
#pragma unroll
    for (int c = 0; c < kGradMicro; ++c) {
      const int64_t feat = feat0 + tx + 16 * c;
      if (feat < dim_pad) out[row_local * dim_pad + feat] = grad[r][c];
    }
  }
  if (prob_cos_part != nullptr && blockIdx.y == 0) {  // uniform over the block
    const acc_t total = block_sum(prob_cos, reduce_scratch);
    if (tid == 0) prob_cos_part[static_cast<int64_t>(blockIdx.z) * gridDim.x + blockIdx.x] = total;
  }
}


// ---- tensor-core kernels (fp16/bf16 input: half rows, float32 S, statistics and G) -----------
// Unit rows are rounded to fp16 (not bf16) for the MMA even for bf16 input: their entries lie in
// [-1, 1], where fp16 keeps 3 more mantissa bits. The elementwise phases are the SIMT ones.

// Raw dots of a 64 x 64 tile on the tensor cores into s_tile (row length kSPad). Warp w computes
// rows 16 (w % 4) .. +16 and columns 32 (w / 4) .. +32 as two 16 x 16 fragments, loading the
// half rows straight from global memory: rows are padded to kTile and features to 16, so every
// load is in bounds and 32-byte aligned (dim_pad * 2 bytes is a multiple of 32).
__device__ __forceinline__ void tile_dot_mma(const __half* __restrict__ x, const __half* __restrict__ y,
                                             int64_t row0, int64_t col0, int64_t dim_pad,
                                             float* s_tile) {
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / 32;
  const int fr = (warp % 4) * 16, fc = (warp / 4) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc0, acc1;
  wmma::fill_fragment(acc0, 0.0f);
  wmma::fill_fragment(acc1, 0.0f);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  // S = X Y^T: Y's rows read column-major are the columns of Y^T.
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b0, b1;
  const __half* xa = x + (row0 + fr) * dim_pad;
  const __half* yb0 = y + (col0 + fc) * dim_pad;
  const __half* yb1 = yb0 + 16 * dim_pad;
  const unsigned ldm = static_cast<unsigned>(dim_pad);
  for (int64_t k0 = 0; k0 < dim_pad; k0 += 16) {
    wmma::load_matrix_sync(a, xa + k0, ldm);
    wmma::load_matrix_sync(b0, yb0 + k0, ldm);
    wmma::load_matrix_sync(b1, yb1 + k0, ldm);
    wmma::mma_sync(acc0, a, b0, acc0);
    wmma::mma_sync(acc1, a, b1, acc1);
  }
  wmma::store_matrix_sync(s_tile + fr * kSPad + fc, acc0, kSPad, wmma::mem_row_major);
  wmma::store_matrix_sync(s_tile + fr * kSPad + fc + 16, acc1, kSPad, wmma::mem_row_major);
}

// lse_partial_kernel with the tile on the tensor cores (same grid, same outputs).
__global__ void __launch_bounds__(kThreads)
    lse_partial_mma_kernel(const __half* __restrict__ x, const __half* __restrict__ y, int64_t n_x,
                           int64_t n_y, int64_t dim_pad, const float* __restrict__ scale_ptr,
                           bool mask_diagonal, PositiveLogits<float> positives, int64_t tiles_per_split,
                           float* __restrict__ part_max, float* __restrict__ part_sum) {
  __shared__ __align__(32) float s_tile[kTile * kSPad];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const float scale = *scale_ptr;
  const bool fixed = can_use_fixed_shift<float>(scale);
  RowStats<float> stats;
  stats.init(fixed, scale);
  const int64_t col_tiles = (n_y + kTile - 1) / kTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < col_tiles ? t_begin + tiles_per_split : col_tiles;
  for (int64_t t = t_begin; t < t_end; ++t) {
    tile_dot_mma(x, y, row0, t * kTile, dim_pad, s_tile);
    __syncthreads();  // s_tile complete
    float dot[kMicro][kMicro];
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) dot[r][c] = s_tile[(ty + 16 * r) * kSPad + tx + 16 * c];
    __syncthreads();  // s_tile read: free for the next tile
    stats.update(dot, row0, t * kTile, n_y, mask_diagonal, fixed, scale, positives);
  }
  stats.write(row0, n_x, blockIdx.y, part_max, part_sum);
}

// grad_partial_kernel with both GEMMs on the tensor cores (same grid and outputs; static
// shared memory: 17 KiB S tile + 9 KiB G tile). G is formed in float32 (the -delta included)
// and rounded to fp16 for the G.Y product; dX accumulates in float32 fragments. Warp w owns
// dX rows 16 (w % 4) .. +16 and features feat0 + 64 (w / 4) + 16 f, f < 4.
__global__ void __launch_bounds__(kThreads)
    grad_partial_mma_kernel(const __half* __restrict__ x, const __half* __restrict__ y,
                            int64_t n_x_pad, int64_t dim_pad, const float* __restrict__ scale_ptr,
                            GradTerms<float> terms, int64_t tiles_per_split,
                            float* __restrict__ grad_part, float* __restrict__ prob_cos_part) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) float s_tile[kTile * kSPad];
  __shared__ __align__(32) __half g_tile[kTile * kGPad];
  __shared__ float reduce_scratch[32];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16, warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const float scale = *scale_ptr;
  const int fr = (warp % 4) * 16;
  const int64_t warp_feat0 = static_cast<int64_t>(blockIdx.y) * kGradCols + (warp / 4) * 64;
  const unsigned ldm = static_cast<unsigned>(dim_pad);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.0f);
  float prob_cos = 0;

  const int64_t col_tiles = (terms.n_y + kTile - 1) / kTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.z) * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < col_tiles ? t_begin + tiles_per_split : col_tiles;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * kTile;
    tile_dot_mma(x, y, row0, col0, dim_pad, s_tile);
    __syncthreads();  // s_tile complete
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
      const int64_t row = row0 + ty + 16 * r;
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const float dot = s_tile[(ty + 16 * r) * kSPad + tx + 16 * c];
        const float g = terms(dot, scale, row, col0 + tx + 16 * c);
        prob_cos += g * dot;
        g_tile[(ty + 16 * r) * kGPad + tx + 16 * c] = __float2half_rn(g);
      }
    }
    __syncthreads();  // g_tile complete
#pragma unroll
    for (int kk = 0; kk < kTile; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
      wmma::load_matrix_sync(a, g_tile + fr * kGPad + kk, kGPad);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        const int64_t feat = warp_feat0 + 16 * f;
        if (feat < dim_pad) {  // uniform over the warp; dim_pad is a multiple of 16
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
          wmma::load_matrix_sync(b, y + (col0 + kk) * dim_pad + feat, ldm);
          wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
    }
    __syncthreads();  // s_tile and g_tile free for the next tile
  }

  // Rows up to row0 + 63 < n_x_pad exist in grad_part (padded rows hold zeros: G = 0 there).
  float* out = grad_part + (static_cast<int64_t>(blockIdx.z) * n_x_pad + row0 + fr) * dim_pad;
#pragma unroll
  for (int f = 0; f < 4; ++f) {
    const int64_t feat = warp_feat0 + 16 * f;
    if (feat < dim_pad) wmma::store_matrix_sync(out + feat, acc[f], ldm, wmma::mem_row_major);
  }
  if (prob_cos_part != nullptr && blockIdx.y == 0) {  // uniform over the block
    const float total = block_sum(prob_cos, reduce_scratch);
    if (tid == 0) prob_cos_part[static_cast<int64_t>(blockIdx.z) * gridDim.x + blockIdx.x] = total;
  }
}

// loss = mean_i ce_row_i (the row cross-entropies of lse_merge_kernel), or for CLIP (ce_col
// non-null) the average of the row and column means. A scale that is not > 0 (checked on the
// host only when it is a CPU tensor) gives NaN. One block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    loss_kernel(const acc_t* __restrict__ ce_row, const acc_t* __restrict__ ce_col, int64_t n,
                const acc_t* __restrict__ scale_ptr, acc_t* __restrict__ loss) {
  __shared__ acc_t scratch[32];
  const acc_t scale = *scale_ptr;
  acc_t sum_row = 0, sum_col = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    sum_row += ce_row[i];
    if (ce_col != nullptr) sum_col += ce_col[i];
  }
  sum_row = block_sum(sum_row, scratch);
  sum_col = block_sum(sum_col, scratch);
  if (threadIdx.x == 0) {
    acc_t value = sum_row / static_cast<acc_t>(n);
    if (ce_col != nullptr) value = acc_t(0.5) * (value + sum_col / static_cast<acc_t>(n));
    *loss = scale > acc_t(0) ? value : acc_t(NAN);
  }
}

// d loss / d logit_scale = sum_ij G_ij cos_ij * grad_loss * mean_factor, from the per-block
// partial sums of the row sweep (G already holds the -delta). One block. parts_hold_logits: the
// parts are sums of G_ij S_ij = scale G_ij cos_ij (the mma kernels'), divided here once.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    scale_grad_kernel(const acc_t* __restrict__ prob_cos_part, int64_t n_part, bool parts_hold_logits,
                      const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ scale_ptr,
                      acc_t mean_factor, acc_t* __restrict__ out) {
  __shared__ acc_t scratch[32];
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < n_part; i += blockDim.x) sum += prob_cos_part[i];
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) {
    const acc_t scale = *scale_ptr;
    const acc_t value = (parts_hold_logits ? sum / scale : sum) * (*grad_loss * mean_factor);
    *out = scale > acc_t(0) ? value : acc_t(NAN);
  }
}

// Final gradient of one row per block: g = (sum over splits of grad_part) * grad_loss * scale
// * mean_factor, then through the normalisation: out = (g - (g.u) u) / ||z||
// (normalize_backward), written in out_t.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(128)
    grad_finalize_kernel(const acc_t* __restrict__ grad_part, int64_t splits, int64_t n_pad,
                         int64_t n, int64_t dim, int64_t dim_pad, const acc_t* __restrict__ unit,
                         const acc_t* __restrict__ norm, const acc_t* __restrict__ grad_loss,
                         const acc_t* __restrict__ scale_ptr, acc_t mean_factor,
                         out_t* __restrict__ out) {
  __shared__ acc_t scratch[32];
  const int64_t row = blockIdx.x;
  if (row >= n) return;  // uniform over the block
  const acc_t scale = *scale_ptr;
  const acc_t factor = scale > acc_t(0) ? *grad_loss * scale * mean_factor : acc_t(NAN);
  const acc_t* u = unit + row * dim_pad;
  auto grad_at = [&](int64_t c) {
    acc_t s = 0;
    for (int64_t k = 0; k < splits; ++k) s += grad_part[(k * n_pad + row) * dim_pad + c];
    return s * factor;
  };
  acc_t dot = 0;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) dot += grad_at(c) * u[c];
  dot = block_sum(dot, scratch);
  const acc_t nrm = norm[row];
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    out[row * dim + c] = to_out<out_t>(normalize_backward<acc_t>(grad_at(c), u[c], dot, nrm));
  }
}

}  // namespace pyssl::infonce::cuda
