#pragma once
// The tensor-core sweep of the MoCo queue loss for fp16/bf16 query and queue of one dtype
// (included by moco_cuda.cu only; moco_sweep_kernel stays for every other case and under
// PYSSL_MOCO_KERNELS=simt). Built as FlashAttention-2 builds its forward, with the queue as the
// keys and values at once:
//   - a block owns 64 kGroups query rows (4 warps of kGroups x 16: 32 rows a warp up to 128
//     features, so every queue fragment read from shared memory feeds two MMAs; 16 above) and
//     one column split of the queue; the rows are the raw query rows in their own dtype, so
//     S = (q_i . k_j) * a_i with a_i = 1 / (||q_i|| T) applied in the epilogue: the products
//     are exact in the float32 accumulators and no rounded copy of the unit row enters S (the
//     queue rows are used as stored);
//   - queue tiles of 64 rows x d are staged by cp.async, double-buffered (the next tile's copy
//     overlaps this one's MMAs), read by ldmatrix: S = Q_rows K^T by mma.sync.m16n8k16 from
//     the tile's rows, A += P K by a second mma.sync from the same tile through ldmatrix.trans;
//   - the online softmax works on S's accumulator fragments in log2 units (a_i log2(e) folded
//     into the epilogue's one multiply, exponentials by ex2.approx); the 4 lanes of a quad
//     share a row's running max, so the rescale of A is uniform over the row, and P, rounded
//     to the input dtype, is the A fragment of the second MMA straight from the registers;
//   - A (kGroups x 16 rows x d per warp) stays in float32 registers for the whole split: 128
//     registers at 32 rows x 128 features or 16 x 256. The query's A fragments stay in
//     registers where they take at most 32 (32 rows x 64 features); else they are read from
//     shared memory by ldmatrix per tile. Rows of more than 256 features stay on the
//     SIMT kernel: splitting the features would recompute S per chunk.
// Outputs are the SIMT sweep's partials (max, sum, A) per (split, row), in natural units, so
// moco_merge_kernel, moco_mean_kernel and the backward are shared.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_smem.h"
#include "ptx.h"

namespace pyssl::moco::mma {

constexpr int kThreads = 128;     // 4 warps of kGroups x 16 query rows
template <int kGroups>
constexpr int kBlockRows = 64 * kGroups;  // query rows per block
constexpr int kTileCols = 64;     // queue rows (logit columns) per tile
constexpr int kMaxDepth = 256;    // widest row the kernel takes
constexpr int kRowPad = 8;        // shared row stride kDepth + 8: an odd number of 16-byte units,
                                  // so the 8 rows one ldmatrix reads start in 8 bank groups
constexpr float kLn2 = 0.6931471805599453f;

// Feature buckets the kernel is compiled for: the narrowest of 64, 128, 256 holding `dim`.
inline int depth_bucket(int64_t dim) { return dim <= 64 ? 64 : (dim <= 128 ? 128 : 256); }

// Row groups per warp: 2 (32 rows, each queue fragment feeding two MMAs) where A's registers
// (2 x d / 2 per thread) leave room, i.e. up to 128 features; 1 above.
template <int kDepth>
constexpr int row_groups() {
  return kDepth <= 128 ? 2 : 1;
}

// Query rows per block of the bucket holding `dim` (the host's row blocks).
inline int sweep_block_rows(int64_t dim) {
  switch (depth_bucket(dim)) {
    case 64: return kBlockRows<row_groups<64>()>;
    case 128: return kBlockRows<row_groups<128>()>;
    default: return kBlockRows<row_groups<256>()>;
  }
}

// Whether the warp's query fragments stay in registers for the whole sweep (kGroups x d / 4 of
// them): up to 128 in all; else they are read from shared memory by ldmatrix per tile.
template <int kDepth, int kGroups>
constexpr bool resident_rows() {
  return kGroups * kDepth <= 128;
}

// Dynamic shared memory of moco_mma_sweep_kernel<., kDepth, kGroups>: two queue tiles of 64 rows
// and the block's query rows (read once into registers where they are resident), rows of
// kDepth + 8 16-bit elements: 36 KiB at kDepth = 64, 68 KiB at 128, 99 KiB at 256.
template <int kDepth, int kGroups>
constexpr int64_t sweep_smem_bytes() {
  return (2 * kTileCols + kBlockRows<kGroups>) * int64_t{kDepth + kRowPad} * 2;
}

// Rows [row0, row0 + kRowsStaged) x features [0, ld) of src (rows of `dim` 16-bit elements, dim a
// multiple of 8) into dst (row stride kDepth + kRowPad): features below dim by 16-byte
// cp.async, rows at or past `limit` and the features [dim, ld) by plain zero stores (the
// MMAs read them: zeros keep garbage, NaN included, out of S and of P K).
template <int kDepth, int kRowsStaged>
__device__ __forceinline__ void stage_rows(uint16_t* dst, const uint16_t* __restrict__ src, int64_t row0,
                                           int64_t limit, int dim, int ld) {
  constexpr int kPiecesPerRow = kDepth / 8;
  constexpr int kStride = kDepth + kRowPad;
  // Unrolled, the copies (8 or 16 a thread) each keep an address live across the tile loop
  // (with 16-row warps: 208 registers at kDepth = 128 against 167 rolled, spills at 256); the
  // rolled loop recomputes them from shifts.
  const uint16_t* const block_src = src + row0 * dim;  // 32-bit offsets below: r * dim < 2^14
  const int rows_left = limit - row0 < kRowsStaged ? static_cast<int>(limit - row0) : kRowsStaged;
#pragma unroll(kDepth <= 64 ? kRowsStaged * kPiecesPerRow / kThreads : 1)
  for (unsigned i = 0; i < kRowsStaged * kPiecesPerRow / kThreads; ++i) {
    const unsigned piece = threadIdx.x + i * kThreads;
    const int r = static_cast<int>(piece / kPiecesPerRow), c = static_cast<int>(piece % kPiecesPerRow) * 8;  // shifts
    if (c < ld) {
      uint16_t* to = dst + r * kStride + c;
      if (c < dim && r < rows_left) {
        ptx::cp_async_16(to, block_src + (r * dim + c));
      } else {
        uint64_t* zeros = reinterpret_cast<uint64_t*>(to);
        zeros[0] = 0u;
        zeros[1] = 0u;
      }
    }
  }
}

// Block (bx, by): query rows [kBlockRows bx, +kBlockRows) (kBlockRows = 64 kGroups: each warp
// owns kGroups groups of 16 rows, so every queue fragment read from shared memory feeds kGroups
// MMAs) against the queue tiles of split by, tiles [by tiles_per_split, +tiles_per_split) (the
// host gives every split a tile). query: (rows, dim), queue: (keys, dim), both op_t bit
// patterns, dim a multiple of 8 up to kDepth, 16-byte aligned; row_factor: 1 / (max(||q_i||,
// eps) T) per row. Writes part_max / part_sum [by * rows + row] (natural units) and part_acc
// [(by * rows + row) * dim + f].
template <typename op_t, int kDepth, int kGroups>
__global__ void __launch_bounds__(kThreads)
    moco_mma_sweep_kernel(const uint16_t* __restrict__ query, const uint16_t* __restrict__ queue,
                          const float* __restrict__ row_factor, int rows, int64_t keys, int dim,
                          int tiles_per_split, float* __restrict__ part_max, float* __restrict__ part_sum,
                          float* __restrict__ part_acc) {
  static_assert(kDepth % 16 == 0 && kDepth <= kMaxDepth, "feature bucket");
  constexpr bool kResident = resident_rows<kDepth, kGroups>();
  constexpr int kStride = kDepth + kRowPad;
  constexpr int kSteps = kDepth / 16;  // 16-feature steps of the bucket
  constexpr int kRowsPerThread = 2 * kGroups;  // row h: 16 (warp kGroups + h / 2) + g + 8 (h % 2)
  uint16_t* const smem = dynamic_shared_memory<uint16_t>();
  auto tile_buffer = [&](int buf) { return smem + buf * kTileCols * kStride; };  // arithmetic: no local array
  uint16_t* const rows_smem = smem + 2 * kTileCols * kStride;  // the block's query rows

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int quad = lane / 8, r = lane % 8;
  const int row0 = static_cast<int>(blockIdx.x) * kBlockRows<kGroups>;
  const int ld = (dim + 15) / 16 * 16;
  const int steps = ld / 16;
  const int64_t num_tiles = (keys + kTileCols - 1) / kTileCols;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < num_tiles ? t_begin + tiles_per_split : num_tiles;

  // S in log2 units: dot * (a_i log2(e)); rows past the batch get 0 (their S is 0, never stored).
  int my_rows[kRowsPerThread];
  float factor[kRowsPerThread], run_max[kRowsPerThread], run_sum[kRowsPerThread];
#pragma unroll
  for (int h = 0; h < kRowsPerThread; ++h) {
    my_rows[h] = row0 + (warp * kGroups + h / 2) * 16 + g + 8 * (h % 2);
    factor[h] = my_rows[h] < rows ? row_factor[my_rows[h]] * ptx::kLog2e : 0.0f;
    run_max[h] = -INFINITY;
    run_sum[h] = 0.0f;
  }
  float acc[kGroups][2 * kSteps][4];  // A of group m: features 8 n + 2 t + (e & 1), row h = 2 m + e / 2
#pragma unroll
  for (int m = 0; m < kGroups; ++m)
#pragma unroll
    for (int n = 0; n < 2 * kSteps; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.0f;

  // The query rows and the first tile, in one commit group.
  stage_rows<kDepth, kBlockRows<kGroups>>(rows_smem, query, row0, rows, dim, ld);
  stage_rows<kDepth, kTileCols>(tile_buffer(0), queue, t_begin * kTileCols, keys, dim, ld);
  ptx::cp_async_commit();
  uint32_t resident[kResident ? kGroups : 1][kResident ? kSteps : 1][4];
  if constexpr (kResident) {
    ptx::cp_async_wait(0);
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kGroups; ++m)
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        if (s < steps) {  // uniform over the block
          ptx::ldmatrix<4>(resident[m][s], rows_smem + ((warp * kGroups + m) * 16 + (quad & 1) * 8 + r) * kStride +
                                               s * 16 + (quad >> 1) * 8);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) resident[m][s][e] = 0u;
        }
      }
  }

  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    const int buf = static_cast<int>(tile - t_begin) & 1;
    const int64_t col0 = tile * kTileCols;
    ptx::cp_async_wait(0);
    __syncthreads();  // this tile has landed; the last tile's P K is done with buffer buf ^ 1
    if (tile + 1 < t_end) {
      stage_rows<kDepth, kTileCols>(tile_buffer(buf ^ 1), queue, col0 + kTileCols, keys, dim, ld);
    }
    ptx::cp_async_commit();
    const uint16_t* const v = tile_buffer(buf);

    // S = Q_rows K^T for the warp's row groups and the tile's 64 columns (8 per n).
    float s_acc[kGroups][8][4];
#pragma unroll
    for (int m = 0; m < kGroups; ++m)
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s_acc[m][n][e] = 0.0f;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      if (s < steps) {  // uniform over the block; unrolled, so `resident` is indexed statically
        uint32_t a[kGroups][4];
#pragma unroll
        for (int m = 0; m < kGroups; ++m) {
          if constexpr (kResident) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[m][e] = resident[m][s][e];
          } else {
            ptx::ldmatrix<4>(a[m], rows_smem + ((warp * kGroups + m) * 16 + (quad & 1) * 8 + r) * kStride + s * 16 +
                                       (quad >> 1) * 8);
          }
        }
#pragma unroll
        for (int np = 0; np < 4; ++np) {  // columns 16 np .. +16: two n-tiles from one ldmatrix
          uint32_t b[4];
          ptx::ldmatrix<4>(b, v + (np * 16 + (quad >> 1) * 8 + r) * kStride + s * 16 + (quad & 1) * 8);
          const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
#pragma unroll
          for (int m = 0; m < kGroups; ++m) {
            ptx::mma_m16n8k16<op_t>(s_acc[m][2 * np], a[m], b_lo, s_acc[m][2 * np]);
            ptx::mma_m16n8k16<op_t>(s_acc[m][2 * np + 1], a[m], b_hi, s_acc[m][2 * np + 1]);
          }
        }
      }
    }

    // The epilogue: S in log2 units; columns past the queue (its last tile only) masked.
#pragma unroll
    for (int m = 0; m < kGroups; ++m)
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s_acc[m][n][e] *= factor[2 * m + e / 2];
    if (col0 + kTileCols > keys) {  // uniform over the block
#pragma unroll
      for (int m = 0; m < kGroups; ++m)
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (col0 + n * 8 + 2 * t + (e & 1) >= keys) s_acc[m][n][e] = -INFINITY;
          }
    }
    // Online softmax per row: the quad's max, the rescale of the sum and of A, P in place of S.
#pragma unroll
    for (int h = 0; h < kRowsPerThread; ++h) {
      const int m = h / 2, e0 = 2 * (h % 2);
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n) tile_max = fmaxf(tile_max, fmaxf(s_acc[m][n][e0], s_acc[m][n][e0 + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(run_max[h], tile_max);
      // Every tile holds a valid column, so new_max is finite for finite input; the shift 0 for
      // an all -inf row keeps exp2(-inf - -inf) = NaN out (P = 0, the old sum kept at scale 0).
      const float shift = new_max == -INFINITY ? 0.0f : new_max;
      const float rescale = ptx::ex2_approx(run_max[h] - shift);  // the first tile: ex2(-inf) = 0
      run_max[h] = new_max;
      float tile_sum = 0.0f;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = e0; e < e0 + 2; ++e) {
          s_acc[m][n][e] = ptx::ex2_approx(s_acc[m][n][e] - shift);
          tile_sum += s_acc[m][n][e];
        }
      }
      run_sum[h] = run_sum[h] * rescale + tile_sum;  // this lane's columns: the quad sums at the end
#pragma unroll
      for (int n = 0; n < 2 * kSteps; ++n) {
        acc[m][n][e0] *= rescale;
        acc[m][n][e0 + 1] *= rescale;
      }
    }

    // A += P K: P's 16-column blocks as A fragments from the registers (packed first: half the
    // registers of S while the MMAs run), K's rows by ldmatrix.trans, each fragment for every group.
    uint32_t p_frag[kGroups][4][4];
#pragma unroll
    for (int m = 0; m < kGroups; ++m)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        p_frag[m][q][0] = ptx::pack_pair<op_t>(s_acc[m][2 * q][0], s_acc[m][2 * q][1]);
        p_frag[m][q][1] = ptx::pack_pair<op_t>(s_acc[m][2 * q][2], s_acc[m][2 * q][3]);
        p_frag[m][q][2] = ptx::pack_pair<op_t>(s_acc[m][2 * q + 1][0], s_acc[m][2 * q + 1][1]);
        p_frag[m][q][3] = ptx::pack_pair<op_t>(s_acc[m][2 * q + 1][2], s_acc[m][2 * q + 1][3]);
      }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int p = 0; p < kSteps; ++p) {
        if (p < steps) {  // uniform over the block
          uint32_t b[4];
          ptx::ldmatrix<4, true>(b, v + (q * 16 + (quad & 1) * 8 + r) * kStride + p * 16 + (quad >> 1) * 8);
          const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
#pragma unroll
          for (int m = 0; m < kGroups; ++m) {
            ptx::mma_m16n8k16<op_t>(acc[m][2 * p], p_frag[m][q], b_lo, acc[m][2 * p]);
            ptx::mma_m16n8k16<op_t>(acc[m][2 * p + 1], p_frag[m][q], b_hi, acc[m][2 * p + 1]);
          }
        }
      }
    }
  }
  ptx::cp_async_wait(0);  // nothing is left in flight (the last commit group is empty)

#pragma unroll
  for (int h = 0; h < kRowsPerThread; ++h) {
    const int m = h / 2, e0 = 2 * (h % 2);
    run_sum[h] += __shfl_xor_sync(0xffffffffu, run_sum[h], 1);
    run_sum[h] += __shfl_xor_sync(0xffffffffu, run_sum[h], 2);
    if (my_rows[h] < rows) {
      const int64_t at = static_cast<int64_t>(blockIdx.y) * rows + my_rows[h];
      if (t == 0) {
        part_max[at] = run_max[h] * kLn2;
        part_sum[at] = run_sum[h];
      }
      float* out = part_acc + at * dim;
#pragma unroll
      for (int n = 0; n < 2 * kSteps; ++n) {
        const int feat = n * 8 + 2 * t;
        if (feat < dim) {  // dim is a multiple of 8: both features of the pair exist
          out[feat] = acc[m][n][e0];
          out[feat + 1] = acc[m][n][e0 + 1];
        }
      }
    }
  }
}

}  // namespace pyssl::moco::mma
