#pragma once
// Tensor-core kernels of the InfoNCE family for fp16/bf16 input, built the way FlashAttention-2
// builds its tiles (included by infonce_cuda.cu only; the older WMMA kernels in
// infonce_kernels.cuh stay selectable for comparison):
//   - the operands are the input rows themselves in their own dtype (bf16 stays bf16), padded to
//     kStage features; S = (z_i . z_j) * (a_i * a_j), a = sqrt(scale) / ||z||, applied in
//     the epilogue, so the products are exact in the float32 accumulators and no rounded copy
//     of the unit rows enters S;
//   - a 64-row block is 4 warps of 16 rows; U and V slices of kStage features are staged in
//     shared memory by cp.async, double-buffered (the copy of the next slice overlaps the MMAs
//     of this one), read with ldmatrix into mma.sync.m16n8k16 fragments;
//   - the epilogue works on the accumulator fragments in registers: S = dot * (a_i * a_j) with
//     a = sqrt(scale) / ||z|| (root_inv), then ex2.approx((S - m) * log2(e)); masks only on edge and diagonal
//     tiles, 32-bit local indices. S is the same bits for (i, j) and (j, i) and stays in natural
//     units, as lse is stored, so every S - lse of the backward (row and column side) is the
//     forward's to the bit: a loss near 0 keeps P_pos - 1 exact (an asymmetric product or lse
//     converted to log2 units and back leaves an ulp of |S| in every positive's gradient);
//   - the backward forms G in registers and feeds it to the second MMA (dX += G V) straight from
//     the accumulator registers: the C fragment of two adjacent 8-column tiles is the A fragment
//     of their 16 columns. That MMA takes fp16 operands for bf16 input too: G and the unit rows
//     V lie in [-2, 2], where fp16 keeps 3 more bits than bf16. G is scaled by 2^13 before
//     rounding (no overflow, and probabilities down to 1e-8 stay normal fp16 numbers at any
//     batch size), undone on the float32 result.
// Grids and outputs are those of lse_partial_mma_kernel / grad_partial_mma_kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "infonce/cuda/infonce_kernels.cuh"
#include "device_smem.h"
#include "ptx.h"

namespace pyssl::infonce::cuda::mma {

constexpr int kThreads = 128;          // 4 warps, 16 rows each
constexpr int kStage = 32;             // features per pipeline stage; operands are padded to it
constexpr int kRow = kStage + 8;       // shared row in 16-bit elements: 80 bytes, so the 8 rows
                                       // one ldmatrix reads start in 8 different bank groups
constexpr int kGradRow = kGradCols + 8;  // 272-byte rows of the backward's V chunk (same reason)
using ptx::kLog2e;
using ptx::pack_pair;
using ptx::to_op;

constexpr float kGScale = 8192.0f;

// Rows kTile x kStage of `src` (row length ld, 16-bit elements) from (row0, k0) into `dst`:
// 256 16-byte copies, 2 per thread.
__device__ __forceinline__ void stage_slice(uint16_t (*dst)[kRow], const uint16_t* __restrict__ src,
                                            int64_t row0, int64_t ld, int64_t k0) {
#pragma unroll
  for (int l = 0; l < 2; ++l) {
    const int piece = static_cast<int>(threadIdx.x) + l * kThreads;
    const int r = piece / 4, c = (piece % 4) * 8;
    ptx::cp_async_16(&dst[r][c], src + (row0 + r) * ld + k0 + c);
  }
}

// acc[n] (8 columns each) += A . V_s[0 .. 64)[kk .. kk + 16)^T for the warp's A fragment (its 16
// rows, the same 16 features).
template <typename op_t>
__device__ __forceinline__ void mma_k16(const uint32_t (&a)[4], const uint16_t (*vs)[kRow], int kk,
                                        float (&acc)[8][4]) {
  const int lane = threadIdx.x % 32, quad = lane / 8, r = lane % 8;  // lane 8 quad + r: row r of matrix quad
#pragma unroll
  for (int np = 0; np < 4; ++np) {  // columns 16 np .. +16: two n-tiles from one ldmatrix
    uint32_t b[4];
    ptx::ldmatrix<4>(b, &vs[np * 16 + (quad >> 1) * 8 + r][kk + (quad & 1) * 8]);
    const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
    ptx::mma_m16n8k16<op_t>(acc[2 * np], a, b_lo, acc[2 * np]);
    ptx::mma_m16n8k16<op_t>(acc[2 * np + 1], a, b_hi, acc[2 * np + 1]);
  }
}

// The warp's A fragment of U_s[16 warp .. +16][kk .. kk + 16).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t (*us)[kRow], int kk) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, quad = lane / 8, r = lane % 8;
  ptx::ldmatrix<4>(a, &us[warp * 16 + (quad & 1) * 8 + r][kk + (quad >> 1) * 8]);
}

// acc[n] (8 columns each) += U_s[16 warp .. +16] . V_s[0 .. 64)^T over one kStage slice.
template <typename op_t>
__device__ __forceinline__ void mma_slice(const uint16_t (*us)[kRow], const uint16_t (*vs)[kRow],
                                          float (&acc)[8][4]) {
#pragma unroll
  for (int kk = 0; kk < kStage; kk += 16) {
    uint32_t a[4];
    load_a(a, us, kk);
    mma_k16<op_t>(a, vs, kk, acc);
  }
}

// Rows of at most kResidentSlices * kStage features keep the row block's A fragments in registers
// for the whole sweep (FlashAttention's resident Q): each tile then stages and reads only V.
constexpr int kResidentSlices = 4;

// The row block's A fragments, 2 per slice, staged once through the `us` buffers. Entries past
// the row's slices are zero and never read.
__device__ __forceinline__ void load_row_fragments(const uint16_t* __restrict__ x, int64_t row0, int64_t ld,
                                                   uint16_t (*us)[kTile][kRow],
                                                   uint32_t (&resident)[2 * kResidentSlices][4]) {
  const int slices = static_cast<int>(ld / kStage);
#pragma unroll
  for (int s = 0; s < kResidentSlices; ++s) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e) resident[2 * s + h][e] = 0u;
    if (s < slices) {  // uniform over the block
      stage_slice(us[s & 1], x, row0, ld, int64_t{s} * kStage);
      ptx::cp_async_commit();
      ptx::cp_async_wait(0);
      __syncthreads();
      load_a(resident[2 * s], us[s & 1], 0);
      load_a(resident[2 * s + 1], us[s & 1], 16);
    }
  }
  __syncthreads();  // the buffers are free
}

// tile_dots (below) with the row block's fragments in registers: only V's slices are staged.
template <typename op_t>
__device__ __forceinline__ void tile_dots_resident(const uint16_t* __restrict__ y, int64_t col0, int64_t ld,
                                                   const uint32_t (&resident)[2 * kResidentSlices][4],
                                                   uint16_t (*vs)[kTile][kRow], float (&acc)[8][4]) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
  stage_slice(vs[0], y, col0, ld, 0);
  ptx::cp_async_commit();
  const int slices = static_cast<int>(ld / kStage);
#pragma unroll
  for (int s = 0; s < kResidentSlices; ++s) {
    if (s < slices) {  // uniform over the block; unrolled, so `resident` is indexed statically
      const int buf = s & 1;
      if (s + 1 < slices) stage_slice(vs[buf ^ 1], y, col0, ld, int64_t{s + 1} * kStage);
      ptx::cp_async_commit();
      ptx::cp_async_wait(1);
      __syncthreads();
      mma_k16<op_t>(resident[2 * s], vs[buf], 0, acc);
      mma_k16<op_t>(resident[2 * s + 1], vs[buf], 16, acc);
      __syncthreads();
    }
  }
}

// One 64 x 64 tile's raw dots (z_i . z_j) of the warp's 16 rows, through the pipeline of
// slices. Copies the caller issued before the call join slice 0's commit group; on return every
// copy has landed and the buffers are free (closing barrier).
template <typename op_t>
__device__ __forceinline__ void tile_dots(const uint16_t* __restrict__ x, const uint16_t* __restrict__ y,
                                          int64_t row0, int64_t col0, int64_t ld,
                                          uint16_t (*us)[kTile][kRow], uint16_t (*vs)[kTile][kRow],
                                          float (&acc)[8][4]) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
  stage_slice(us[0], x, row0, ld, 0);
  stage_slice(vs[0], y, col0, ld, 0);
  ptx::cp_async_commit();
  const int slices = static_cast<int>(ld / kStage);
  for (int s = 0; s < slices; ++s) {
    const int buf = s & 1;
    if (s + 1 < slices) {
      stage_slice(us[buf ^ 1], x, row0, ld, int64_t{s + 1} * kStage);
      stage_slice(vs[buf ^ 1], y, col0, ld, int64_t{s + 1} * kStage);
    }
    ptx::cp_async_commit();
    ptx::cp_async_wait(1);  // slice s has landed (the group just committed may be in flight)
    __syncthreads();        // ... for every thread's copies
    mma_slice<op_t>(us[buf], vs[buf], acc);
    __syncthreads();  // buffer `buf` is refilled two slices on
  }
}

// Wide row blocks (the forward with resident rows): each warp owns kGroups x 16 rows, so every
// B fragment read from shared memory feeds kGroups MMAs and a block of 64 kGroups rows reads each
// column tile from L2 once for all of them (FlashAttention-2's 128-row blocks).

// Rows (64 kGroups) x kStage of `src` from (row0, k0) into `dst`: 2 kGroups copies per thread.
template <int kGroups>
__device__ __forceinline__ void stage_rows(uint16_t (*dst)[kRow], const uint16_t* __restrict__ src, int64_t row0,
                                           int64_t ld, int64_t k0) {
#pragma unroll
  for (int l = 0; l < 2 * kGroups; ++l) {
    const int piece = static_cast<int>(threadIdx.x) + l * kThreads;
    const int r = piece / 4, c = (piece % 4) * 8;
    ptx::cp_async_16(&dst[r][c], src + (row0 + r) * ld + k0 + c);
  }
}

// The A fragments of the warp's kGroups x 16 rows for every slice, staged once through `us`.
template <int kGroups>
__device__ __forceinline__ void load_wide_row_fragments(const uint16_t* __restrict__ x, int64_t row0, int64_t ld,
                                                        uint16_t (*us)[kTile * kGroups][kRow],
                                                        uint32_t (&resident)[kGroups][2 * kResidentSlices][4]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, quad = lane / 8, r = lane % 8;
  const int slices = static_cast<int>(ld / kStage);
#pragma unroll
  for (int s = 0; s < kResidentSlices; ++s) {
#pragma unroll
    for (int m = 0; m < kGroups; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) resident[m][2 * s + h][e] = 0u;
    if (s < slices) {  // uniform over the block
      stage_rows<kGroups>(us[s & 1], x, row0, ld, int64_t{s} * kStage);
      ptx::cp_async_commit();
      ptx::cp_async_wait(0);
      __syncthreads();
#pragma unroll
      for (int m = 0; m < kGroups; ++m) {
        const int row = (warp * kGroups + m) * 16 + (quad & 1) * 8 + r;
        ptx::ldmatrix<4>(resident[m][2 * s], &us[s & 1][row][(quad >> 1) * 8]);
        ptx::ldmatrix<4>(resident[m][2 * s + 1], &us[s & 1][row][16 + (quad >> 1) * 8]);
      }
    }
  }
  __syncthreads();  // the buffers are free
}

// acc[m][n] = the dots of the warp's row group m with the 64 columns at col0 (8 per n): V's
// slices staged by cp.async, double-buffered; each B fragment serves every row group.
template <typename op_t, int kGroups>
__device__ __forceinline__ void wide_tile_dots(const uint16_t* __restrict__ y, int64_t col0, int64_t ld,
                                               const uint32_t (&resident)[kGroups][2 * kResidentSlices][4],
                                               uint16_t (*vs)[kTile][kRow], float (&acc)[kGroups][8][4]) {
  const int lane = threadIdx.x % 32, quad = lane / 8, r = lane % 8;
#pragma unroll
  for (int m = 0; m < kGroups; ++m)
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.0f;
  stage_slice(vs[0], y, col0, ld, 0);
  ptx::cp_async_commit();
  const int slices = static_cast<int>(ld / kStage);
#pragma unroll
  for (int s = 0; s < kResidentSlices; ++s) {
    if (s < slices) {  // uniform over the block; unrolled, so `resident` is indexed statically
      const int buf = s & 1;
      if (s + 1 < slices) stage_slice(vs[buf ^ 1], y, col0, ld, int64_t{s + 1} * kStage);
      ptx::cp_async_commit();
      ptx::cp_async_wait(1);
      __syncthreads();
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int kk = 16 * half;
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ptx::ldmatrix<4>(b, &vs[buf][np * 16 + (quad >> 1) * 8 + r][kk + (quad & 1) * 8]);
          const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
#pragma unroll
          for (int m = 0; m < kGroups; ++m) {
            ptx::mma_m16n8k16<op_t>(acc[m][2 * np], resident[m][2 * s + half], b_lo, acc[m][2 * np]);
            ptx::mma_m16n8k16<op_t>(acc[m][2 * np + 1], resident[m][2 * s + half], b_hi, acc[m][2 * np + 1]);
          }
        }
      }
      __syncthreads();
    }
  }
}

// Rows of at most this many features take the wide forward (kWideGroups row groups per warp).
constexpr int kWideGroups = 2;
constexpr int kWideRows = kTile * kWideGroups;  // rows of a wide block; the operands' row padding

// Row log-sum-exp partials, as lse_partial_mma_kernel: block (bx, by) owns kBlockRows rows of x
// from kBlockRows bx and the column tiles of split by; writes (max, sum) of its rows to
// part_*[by * n_x + row]. root_inv_x / root_inv_y: sqrt(scale) / max(||z||, eps) per padded row
// (0 on padding rows; x is padded to kWideRows rows). kResident: ld <= kResidentSlices * kStage,
// the row block's fragments stay in registers, kGroups row groups of 16 per warp (1 or
// kWideGroups); otherwise both operands stream through shared memory, one group per warp.
template <typename op_t, bool kResident, int kGroups = 1>
__global__ void __launch_bounds__(kThreads)
    lse_partial_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ y,
                       const float* __restrict__ root_inv_x, const float* __restrict__ root_inv_y, int n_x, int n_y,
                       int64_t ld, const float* __restrict__ scale_ptr, bool mask_diagonal,
                       PositiveLogits<float> positives, int tiles_per_split, float* __restrict__ part_max,
                       float* __restrict__ part_sum) {
  static_assert(kGroups == 1 || kResident, "wide row blocks keep their rows in registers");
  constexpr int kBlockRows = kTile * kGroups;
  constexpr int kRowsPerThread = 2 * kGroups;  // row r of group m: 16 (warp kGroups + m) + g + 8 (r % 2)
  __shared__ __align__(16) uint16_t us[2][kBlockRows][kRow];
  __shared__ __align__(16) uint16_t vs[2][kTile][kRow];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int row0 = static_cast<int>(blockIdx.x) * kBlockRows;
  int rows[kRowsPerThread];
#pragma unroll
  for (int h = 0; h < kRowsPerThread; ++h) rows[h] = row0 + (warp * kGroups + h / 2) * 16 + g + 8 * (h % 2);
  const float scale = *scale_ptr;
  const bool fixed = can_use_fixed_shift<float>(scale);
  const float shift = scale;  // the fixed shift
  float factor[kRowsPerThread], max[kRowsPerThread], sum[kRowsPerThread];  // S = dot * (factor_i * root_inv_j)
  int positive_col[kRowsPerThread];  // -1: the row has no positive to take (padding)
#pragma unroll
  for (int h = 0; h < kRowsPerThread; ++h) {
    factor[h] = root_inv_x[rows[h]];
    positive_col[h] = static_cast<int>(positives.column(rows[h]));
    max[h] = fixed ? shift : -INFINITY;
    sum[h] = 0.0f;
  }

  uint32_t resident[kGroups][2 * kResidentSlices][4];
  if constexpr (kResident) {
    if constexpr (kGroups == 1) {
      load_row_fragments(x, row0, ld, us, resident[0]);
    } else {
      load_wide_row_fragments<kGroups>(x, row0, ld, us, resident);
    }
  }
  const int col_tiles = (n_y + kTile - 1) / kTile;
  const int t_begin = static_cast<int>(blockIdx.y) * tiles_per_split;
  const int t_end = t_begin + tiles_per_split < col_tiles ? t_begin + tiles_per_split : col_tiles;
  for (int tile = t_begin; tile < t_end; ++tile) {
    const int col0 = tile * kTile;
    float acc[kGroups][8][4];
    if constexpr (kGroups > 1) {
      wide_tile_dots<op_t, kGroups>(y, col0, ld, resident, vs, acc);
    } else if constexpr (kResident) {
      tile_dots_resident<op_t>(y, col0, ld, resident[0], vs, acc[0]);
    } else {
      tile_dots<op_t>(x, y, row0, col0, ld, us, vs, acc[0]);
    }
    // Padding columns and (NT-Xent) the diagonal are masked by predicate, on the tiles that
    // have them only. A row's positive logit is stored from the very value its sum would have
    // taken, and left out of the sum (lse_merge_kernel adds it back).
    const bool edge = col0 + kTile > n_y || (mask_diagonal && col0 + kTile > row0 && col0 < row0 + kBlockRows);
    int local_positive[kRowsPerThread];
    bool has_positive = false;
#pragma unroll
    for (int h = 0; h < kRowsPerThread; ++h) {
      local_positive[h] = positive_col[h] - col0;
      has_positive = has_positive || static_cast<unsigned>(local_positive[h]) < kTile;
    }
    float logit[kRowsPerThread][16];
    // Nearly every tile is interior: no padding column, no diagonal, no positive in any lane of
    // the warp. It takes a path with no compare per logit (warp-uniform: the warp never splits).
    if (!edge && !__any_sync(0xffffffffu, has_positive)) {
#pragma unroll
      for (int m = 0; m < kGroups; ++m)
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = 2 * m + e / 2, col = col0 + n * 8 + 2 * t + (e & 1);
            logit[h][2 * n + (e & 1)] = acc[m][n][e] * (factor[h] * root_inv_y[col]);
          }
    } else {
#pragma unroll
      for (int m = 0; m < kGroups; ++m)
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = 2 * m + e / 2, local = n * 8 + 2 * t + (e & 1), col = col0 + local;
            float v = acc[m][n][e] * (factor[h] * root_inv_y[col]);
            if (has_positive && local == local_positive[h]) {
              positives.pos[rows[h]] = v;
              v = -INFINITY;
            } else if (edge && (col >= n_y || (mask_diagonal && col == rows[h]))) {
              v = -INFINITY;
            }
            logit[h][2 * n + (e & 1)] = v;
          }
    }
#pragma unroll
    for (int h = 0; h < kRowsPerThread; ++h) {
      if (fixed) {
#pragma unroll
        for (int c = 0; c < 16; ++c) sum[h] += ptx::ex2_approx((logit[h][c] - shift) * kLog2e);
      } else {
        float tile_max = -INFINITY;
#pragma unroll
        for (int c = 0; c < 16; ++c) tile_max = fmaxf(tile_max, logit[h][c]);
        const float new_max = fmaxf(max[h], tile_max);
        if (new_max != -INFINITY) {  // else every logit so far is masked: nothing to add
          float part = 0.0f;
#pragma unroll
          for (int c = 0; c < 16; ++c) part += ptx::ex2_approx((logit[h][c] - new_max) * kLog2e);
          sum[h] = sum[h] * ptx::ex2_approx((max[h] - new_max) * kLog2e) + part;
          max[h] = new_max;
        }
      }
    }
  }

  // The 4 lanes of a quad share the rows.
#pragma unroll
  for (int h = 0; h < kRowsPerThread; ++h) {
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {
      const float other_max = __shfl_xor_sync(0xffffffffu, max[h], off);
      const float other_sum = __shfl_xor_sync(0xffffffffu, sum[h], off);
      const float new_max = fmaxf(max[h], other_max);
      if (new_max != -INFINITY) {
        sum[h] = sum[h] * ptx::ex2_approx((max[h] - new_max) * kLog2e) +
                 other_sum * ptx::ex2_approx((other_max - new_max) * kLog2e);
        max[h] = new_max;
      }
    }
    if (t == 0 && rows[h] < n_x) {
      const int64_t at = static_cast<int64_t>(blockIdx.y) * n_x + rows[h];
      part_max[at] = max[h];
      part_sum[at] = sum[h];
    }
  }
}

// The backward's terms of a thread's two rows: root_inv (S = dot * factor_i * root_inv_j), the
// row-side lse (+inf for rows past n_x or without the term) and the positive column.
__device__ __forceinline__ void load_grad_row_terms(const int (&rows)[2], const float* __restrict__ root_inv_x,
                                                    const GradTerms<float>& terms, float (&factor)[2],
                                                    float (&lse_row)[2], int (&positive)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    factor[h] = root_inv_x[rows[h]];
    lse_row[h] = terms.lse_x != nullptr && rows[h] < terms.n_x ? terms.lse_x[rows[h]] : INFINITY;
    positive[h] = static_cast<int>(terms.pairs > 0 ? ntxent_positive(rows[h], terms.pairs) : rows[h]);
  }
}

// Gradient sums, as grad_partial_mma_kernel: block (bx, by, bz) owns rows 64 bx .. +64 of x,
// features kGradCols by .. +kGradCols and the column tiles of split bz; for each tile it forms
// G = exp(S - lse_x[i]) + exp(S - lse_y[j]) - n_pos [j = p(i)] and adds G V_J (V = unit rows,
// y_unit, fp16) to grad_part[bz][row][feature] (features < dim_pad, the float32 layout's padding).
// prob_cos_part[bz * gridDim.x + bx] gets sum_ij G_ij S_ij (blocks with by == 0).
template <typename op_t, bool kResident>
__global__ void __launch_bounds__(kThreads)
    grad_partial_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ y,
                        const uint16_t* __restrict__ y_unit, const float* __restrict__ root_inv_x,
                        const float* __restrict__ root_inv_y, int64_t ld, int n_x_pad, int dim_pad,
                        const float* __restrict__ scale_ptr, GradTerms<float> terms, int tiles_per_split,
                        float* __restrict__ grad_part, float* __restrict__ prob_cos_part) {
  __shared__ __align__(16) uint16_t us[2][kTile][kRow];
  __shared__ __align__(16) uint16_t vs[2][kTile][kRow];
  __shared__ __align__(16) uint16_t vchunk[kTile][kGradRow];
  __shared__ float reduce_scratch[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int quad = lane / 8, r = lane % 8;
  const int row0 = static_cast<int>(blockIdx.x) * kTile;
  const int feat0 = static_cast<int>(blockIdx.y) * kGradCols;
  const int rows[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
  const int n_x = static_cast<int>(terms.n_x), n_y = static_cast<int>(terms.n_y);
  float factor[2], lse_row[2];
  int positive[2];
  load_grad_row_terms(rows, root_inv_x, terms, factor, lse_row, positive);
  const int slices = static_cast<int>(ld / kStage);
  const int chunk_pairs = feat0 + kGradCols <= slices * kStage ? kGradCols / 16 : (slices * kStage - feat0) / 16;

  float grad[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) grad[n][e] = 0.0f;
  float prob_cos = 0.0f;
  uint32_t resident[2 * kResidentSlices][4];
  if constexpr (kResident) load_row_fragments(x, row0, ld, us, resident);

  const int col_tiles = (n_y + kTile - 1) / kTile;
  const int t_begin = static_cast<int>(blockIdx.z) * tiles_per_split;
  const int t_end = t_begin + tiles_per_split < col_tiles ? t_begin + tiles_per_split : col_tiles;
  for (int tile = t_begin; tile < t_end; ++tile) {
    const int col0 = tile * kTile;
    // The unit rows of V_J's feature chunk, in flight while S is formed: 64 rows x up to 16
    // pieces of 8 features.
    for (int piece = threadIdx.x; piece < kTile * 2 * chunk_pairs; piece += kThreads) {
      const int row = piece / (2 * chunk_pairs), c = (piece % (2 * chunk_pairs)) * 8;
      ptx::cp_async_16(&vchunk[row][c], y_unit + (col0 + row) * ld + feat0 + c);
    }
    float acc[8][4];
    if constexpr (kResident) {  // both wait for every copy, vchunk's too
      tile_dots_resident<op_t>(y, col0, ld, resident, vs, acc);
    } else {
      tile_dots<op_t>(x, y, row0, col0, ld, us, vs, acc);
    }

    const bool edge = col0 + kTile > n_y || row0 + kTile > n_x || (terms.mask_diagonal && col0 == row0);
    const bool has_positive = static_cast<unsigned>(positive[0] - col0) < kTile ||
                              static_cast<unsigned>(positive[1] - col0) < kTile;
    // As in the forward: interior tiles take a path with no compare per weight.
    if (!edge && !__any_sync(0xffffffffu, has_positive)) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e / 2, col = col0 + n * 8 + 2 * t + (e & 1);
          const float logit = acc[n][e] * (factor[h] * root_inv_y[col]);  // the forward's S
          float weight = 0.0f;
          if (terms.lse_x != nullptr) weight += ptx::ex2_approx((logit - lse_row[h]) * kLog2e);
          if (terms.lse_y != nullptr) weight += ptx::ex2_approx((logit - terms.lse_y[col]) * kLog2e);
          prob_cos += weight * logit;  // scale_grad_kernel divides by scale
          acc[n][e] = weight * kGScale;
        }
      }
    } else {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e / 2, col = col0 + n * 8 + 2 * t + (e & 1);
          const float logit = acc[n][e] * (factor[h] * root_inv_y[col]);
          float weight = 0.0f;
          if (rows[h] < n_x && !(edge && (col >= n_y || (terms.mask_diagonal && col == rows[h])))) {
            if (terms.lse_x != nullptr) weight += ptx::ex2_approx((logit - lse_row[h]) * kLog2e);
            if (terms.lse_y != nullptr) weight += ptx::ex2_approx((logit - terms.lse_y[col]) * kLog2e);
            if (col == positive[h]) weight -= terms.n_pos;
          }
          prob_cos += weight * logit;
          acc[n][e] = weight * kGScale;
        }
      }
    }
    // dX_I[:, chunk] += G V_J[:, chunk]: G's 16-column blocks as A fragments from registers.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t a[4] = {pack_pair<__half>(acc[2 * q][0], acc[2 * q][1]),
                             pack_pair<__half>(acc[2 * q][2], acc[2 * q][3]),
                             pack_pair<__half>(acc[2 * q + 1][0], acc[2 * q + 1][1]),
                             pack_pair<__half>(acc[2 * q + 1][2], acc[2 * q + 1][3])};
#pragma unroll
      for (int p = 0; p < kGradCols / 16; ++p) {
        if (p < chunk_pairs) {  // uniform over the block
          uint32_t b[4];
          ptx::ldmatrix<4, true>(b, &vchunk[q * 16 + (quad & 1) * 8 + r][p * 16 + (quad >> 1) * 8]);
          const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
          ptx::mma_m16n8k16<__half>(grad[2 * p], a, b_lo, grad[2 * p]);
          ptx::mma_m16n8k16<__half>(grad[2 * p + 1], a, b_hi, grad[2 * p + 1]);
        }
      }
    }
    __syncthreads();  // vchunk is refilled by the next tile
  }

  // Rows up to row0 + 63 < n_x_pad exist in grad_part (padding rows get zeros: G = 0 there).
  constexpr float unscale = 1.0f / kGScale;
  float* out = grad_part + (static_cast<int64_t>(blockIdx.z) * n_x_pad) * dim_pad;
#pragma unroll
  for (int n = 0; n < 16; ++n) {
    const int feat = feat0 + n * 8 + 2 * t;
    if (feat < dim_pad) {  // dim_pad is a multiple of 16: both features of the pair exist
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* dst = out + static_cast<int64_t>(rows[h]) * dim_pad + feat;
        dst[0] = grad[n][2 * h] * unscale;
        dst[1] = grad[n][2 * h + 1] * unscale;
      }
    }
  }
  if (prob_cos_part != nullptr && blockIdx.y == 0) {  // uniform over the block
    const float total = block_sum(prob_cos, reduce_scratch);
    if (threadIdx.x == 0) prob_cos_part[static_cast<int64_t>(blockIdx.z) * gridDim.x + blockIdx.x] = total;
  }
}

// ---- the backward for rows of up to kWideGradMaxDepth features (bf16) ---------------------------
// grad_partial_kernel owns one 128-feature chunk of dX per block, so a row of d features costs
// d / 128 recomputations of every S tile and its exponentials (5 GEMM-equivalents per sweep at
// CLIP's d = 512 instead of 2). Here one block owns all the features of its 64 rows: 4 x
// kFeatureGroups warps, the rows' operands resident in shared memory for the whole sweep, each
// V tile staged once (double-buffered, the next tile's copy overlapping this one's MMAs). Per
// tile, warp (row group w % 4, column group w / 4) forms its slice of S and of G once; G goes to
// shared memory and every warp multiplies its 16 rows of G by its 128 features of V.
// The second MMA reads V's raw bf16 rows, the tile S came from, instead of a separate array of
// unit rows (half the L2 traffic): G'_ij = G_ij / ||v_j|| = G_ij * root_inv_j / sqrt(scale),
// rounded to bf16 (bf16 has float32's range, so no scaling against underflow is needed; its 8
// bits are those of the bf16 gradient the op returns). fp16 input keeps grad_partial_kernel:
// fp16's range cannot hold G / ||v|| for every norm.
constexpr int kWideGradMaxDepth = 512;
constexpr int kWideGradRowPad = 8;  // row stride ld + 8 elements: an odd number of 16-byte units

// Dynamic shared memory of wide_grad_kernel: the rows U (kTile x (ld + 8)), two V buffers of
// the same shape, and G (kTile x (kTile + 8)), in 16-bit elements.
inline int64_t wide_grad_smem_bytes(int64_t ld) {
  return 2 * (3 * kTile * (ld + kWideGradRowPad) + kTile * (kTile + 8));
}

// Rows [row0, row0 + kTile) x [0, ld) of src into dst (row stride ld + kWideGradRowPad).
template <int kBlockThreads>
__device__ __forceinline__ void stage_rows_all(uint16_t* dst, const uint16_t* __restrict__ src, int64_t row0,
                                               int ld) {
  const int pieces_per_row = ld / 8, stride = ld + kWideGradRowPad;
  for (int piece = threadIdx.x; piece < kTile * pieces_per_row; piece += kBlockThreads) {
    const int r = piece / pieces_per_row, c = (piece % pieces_per_row) * 8;
    ptx::cp_async_16(dst + r * stride + c, src + (row0 + r) * static_cast<int64_t>(ld) + c);
  }
}

// As grad_partial_kernel (the same G, grad_part and prob_cos_part layouts, grad_part scaled by
// 1, not kGScale), for bf16 rows of ld <= kFeatureGroups * kGradCols features: grid (row tiles,
// column splits), 128 kFeatureGroups threads, wide_grad_smem_bytes(ld) of dynamic shared memory.
template <int kFeatureGroups>
__global__ void __launch_bounds__(kThreads * kFeatureGroups)
    wide_grad_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ y,
                     const float* __restrict__ root_inv_x, const float* __restrict__ root_inv_y, int ld,
                     int n_x_pad, int dim_pad, const float* __restrict__ scale_ptr, GradTerms<float> terms,
                     int tiles_per_split, float* __restrict__ grad_part, float* __restrict__ prob_cos_part) {
  static_assert(8 % kFeatureGroups == 0, "each warp takes 8 / kFeatureGroups of S's 8-column tiles");
  constexpr int kBlockThreads = kThreads * kFeatureGroups;
  constexpr int kColTiles = 8 / kFeatureGroups;  // 8-column tiles of S per warp
  constexpr int kGRow = kTile + 8;               // G's row stride: 144 bytes, conflict-free ldmatrix
  uint16_t* const smem = dynamic_shared_memory<uint16_t>();
  const int stride = ld + kWideGradRowPad;
  uint16_t* const us = smem;
  auto vs = [&](int buf) { return smem + (1 + buf) * kTile * stride; };  // arithmetic: no local array
  uint16_t* const gs = smem + 3 * kTile * stride;
  __shared__ float reduce_scratch[32];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int quad = lane / 8, r = lane % 8;
  const int group = warp % 4, part = warp / 4;  // 16-row group; column group (S) and feature group (G V)
  const int row0 = static_cast<int>(blockIdx.x) * kTile;
  const int rows[2] = {row0 + group * 16 + g, row0 + group * 16 + g + 8};
  const int n_x = static_cast<int>(terms.n_x), n_y = static_cast<int>(terms.n_y);
  const float inv_sqrt_scale = rsqrtf(*scale_ptr);  // NaN for a negative scale, as the loss is
  float factor[2], lse_row[2];
  int positive[2];
  load_grad_row_terms(rows, root_inv_x, terms, factor, lse_row, positive);
  const int feat0 = part * kGradCols;
  const int feature_pairs = feat0 + kGradCols <= ld ? kGradCols / 16 : (ld > feat0 ? (ld - feat0) / 16 : 0);

  float grad[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) grad[n][e] = 0.0f;
  float prob_cos = 0.0f;

  const int col_tiles = (n_y + kTile - 1) / kTile;
  const int t_begin = static_cast<int>(blockIdx.y) * tiles_per_split;
  const int t_end = t_begin + tiles_per_split < col_tiles ? t_begin + tiles_per_split : col_tiles;
  stage_rows_all<kBlockThreads>(us, x, row0, ld);
  if (t_begin < t_end) stage_rows_all<kBlockThreads>(vs(0), y, int64_t{t_begin} * kTile, ld);
  ptx::cp_async_commit();
  for (int tile = t_begin; tile < t_end; ++tile) {
    const int buf = (tile - t_begin) & 1, col0 = tile * kTile;
    ptx::cp_async_wait(0);
    __syncthreads();  // this tile's V has landed; the last tile's G V is done with G and V[buf ^ 1]
    if (tile + 1 < t_end) stage_rows_all<kBlockThreads>(vs(buf ^ 1), y, int64_t{col0} + kTile, ld);
    ptx::cp_async_commit();

    // S for the warp's 16 rows and its kColTiles 8-column tiles: columns 8 (part + kFeatureGroups c).
    float acc[kColTiles][4];
#pragma unroll
    for (int c = 0; c < kColTiles; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[c][e] = 0.0f;
    const uint16_t* v = vs(buf);
    for (int kk = 0; kk < ld; kk += 16) {
      uint32_t a[4];
      ptx::ldmatrix<4>(a, us + (group * 16 + (quad & 1) * 8 + r) * stride + kk + (quad >> 1) * 8);
#pragma unroll
      for (int c = 0; c < kColTiles; c += 2) {  // two 8-column tiles from one ldmatrix
        const int n_lo = part + kFeatureGroups * c, n_hi = part + kFeatureGroups * (c + 1);
        uint32_t b[4];
        const int n_tile = (quad >> 1) ? n_hi : n_lo;
        ptx::ldmatrix<4>(b, v + (n_tile * 8 + r) * stride + kk + (quad & 1) * 8);
        const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
        ptx::mma_m16n8k16<__nv_bfloat16>(acc[c], a, b_lo, acc[c]);
        ptx::mma_m16n8k16<__nv_bfloat16>(acc[c + 1], a, b_hi, acc[c + 1]);
      }
    }

    // G' = G / ||v_j|| into shared memory, as bf16.
    const bool edge = col0 + kTile > n_y || row0 + kTile > n_x || (terms.mask_diagonal && col0 == row0);
#pragma unroll
    for (int c = 0; c < kColTiles; ++c) {
      const int local0 = (part + kFeatureGroups * c) * 8 + 2 * t;
      float weight[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2, col = col0 + local0 + (e & 1);
        const float root_inv_col = root_inv_y[col];
        const float logit = acc[c][e] * (factor[h] * root_inv_col);  // the forward's S
        float w = 0.0f;
        if (!edge || (rows[h] < n_x && col < n_y && !(terms.mask_diagonal && col == rows[h]))) {
          if (terms.lse_x != nullptr) w += ptx::ex2_approx((logit - lse_row[h]) * kLog2e);
          if (terms.lse_y != nullptr) w += ptx::ex2_approx((logit - terms.lse_y[col]) * kLog2e);
          if (col == positive[h]) w -= terms.n_pos;
        }
        prob_cos += w * logit;  // scale_grad_kernel divides by scale
        weight[e] = w * (root_inv_col * inv_sqrt_scale);
      }
      const int row_local = group * 16 + g;
      *reinterpret_cast<uint32_t*>(gs + row_local * kGRow + local0) = pack_pair<__nv_bfloat16>(weight[0], weight[1]);
      *reinterpret_cast<uint32_t*>(gs + (row_local + 8) * kGRow + local0) =
          pack_pair<__nv_bfloat16>(weight[2], weight[3]);
    }
    __syncthreads();  // G is complete

    // dX[16 rows of the group][the part's 128 features] += G' V.
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // G's 16-column blocks
      uint32_t a[4];
      ptx::ldmatrix<4>(a, gs + (group * 16 + (quad & 1) * 8 + r) * kGRow + q * 16 + (quad >> 1) * 8);
#pragma unroll
      for (int p = 0; p < kGradCols / 16; ++p) {
        if (p < feature_pairs) {  // uniform over the warp
          uint32_t b[4];
          ptx::ldmatrix<4, true>(b, v + (q * 16 + (quad & 1) * 8 + r) * stride + feat0 + p * 16 + (quad >> 1) * 8);
          const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
          ptx::mma_m16n8k16<__nv_bfloat16>(grad[2 * p], a, b_lo, grad[2 * p]);
          ptx::mma_m16n8k16<__nv_bfloat16>(grad[2 * p + 1], a, b_hi, grad[2 * p + 1]);
        }
      }
    }
  }
  ptx::cp_async_wait(0);  // a split with no tile still staged its rows

  float* out = grad_part + (static_cast<int64_t>(blockIdx.y) * n_x_pad) * dim_pad;
#pragma unroll
  for (int n = 0; n < 16; ++n) {
    const int feat = feat0 + n * 8 + 2 * t;
    if (n / 2 < feature_pairs && feat < dim_pad) {  // dim_pad is a multiple of 16: both features exist
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* dst = out + static_cast<int64_t>(rows[h]) * dim_pad + feat;
        dst[0] = grad[n][2 * h];
        dst[1] = grad[n][2 * h + 1];
      }
    }
  }
  if (prob_cos_part != nullptr) {  // uniform over the block
    const float total = block_sum(prob_cos, reduce_scratch);
    if (threadIdx.x == 0) prob_cos_part[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
  }
}

// The operands of the kernels above for one padded row per warp: the row itself in op_t
// (`raw`), the unit row u = z / max(||z||, eps) rounded to fp16 (`unit`, the backward's V), and
// root_inv = sqrt(scale) / max(||z||, eps) (NaN for a negative scale, as the loss must be);
// zeros on padding rows and features.
template <typename in_t, typename op_t>
__global__ void __launch_bounds__(256)
    prepare_operands_kernel(const in_t* __restrict__ z, int64_t stride_row, int64_t stride_col, int64_t rows,
                            int64_t rows_pad, int64_t dim, int64_t ld, const float* __restrict__ norm,
                            const float* __restrict__ scale, op_t* __restrict__ raw, __half* __restrict__ unit,
                            float* __restrict__ root_inv) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  if (row >= rows_pad) return;  // the whole warp leaves together
  const bool real = row < rows;
  const float inverse = real ? inverse_norm<float>(norm[row]) : 0.0f;
  for (int64_t c = lane; c < ld; c += 32) {
    const float v = real && c < dim ? static_cast<float>(z[row * stride_row + c * stride_col]) : 0.0f;
    raw[row * ld + c] = to_op<op_t>(v);
    unit[row * ld + c] = __float2half_rn(v * inverse);
  }
  if (lane == 0) root_inv[row] = real ? sqrtf(*scale) * inverse : 0.0f;
}

}  // namespace pyssl::infonce::cuda::mma
