#pragma once
// The tensor-core sweep of the MoCo queue loss for fp16/bf16 query and queue of one dtype
// (included by moco_cuda.cu only; moco_sweep_kernel stays for every other case and under
// PYSSL_MOCO_KERNELS=simt). Built as FlashAttention-2 builds its forward, with the queue as the
// keys and values at once:
//   - a block owns 64 query rows (4 warps x 16) and one column split of the queue; the rows are
//     the raw query rows in their own dtype, so S = (q_i . k_j) * a_i with a_i = 1 / (||q_i|| T)
//     applied in the epilogue: the products are exact in the float32 accumulators and no
//     rounded copy of the unit row enters S (the queue rows are used as stored);
//   - queue tiles of 64 rows x d are staged by cp.async, double-buffered (the next tile's copy
//     overlaps this one's MMAs), read by ldmatrix: S = Q_rows K^T by mma.sync.m16n8k16 from
//     the tile's rows, A += P K by a second mma.sync from the same tile through ldmatrix.trans;
//   - the online softmax works on S's accumulator fragments in log2 units (a_i log2(e) folded
//     into the epilogue's one multiply, exponentials by ex2.approx); the 4 lanes of a quad
//     share a row's running max, so the rescale of A is uniform over the row, and P, rounded
//     to the input dtype, is the A fragment of the second MMA straight from the registers;
//   - A (16 rows x d per warp) stays in float32 registers for the whole split: kDepth <= 256
//     features (128 registers at 256). Rows of up to 128 features also keep the query's A
//     fragments in registers (32 registers); wider rows read them from shared memory by
//     ldmatrix per tile (registers: A 128 + S 32 leave no room for 64 more). Rows of more than
//     256 features stay on the SIMT kernel: splitting the features would recompute S per chunk.
// Outputs are the SIMT sweep's partials (max, sum, A) per (split, row), in natural units, so
// moco_merge_kernel, moco_mean_kernel and the backward are shared.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_smem.h"
#include "ptx.h"

namespace pyssl::moco::mma {

constexpr int kThreads = 128;     // 4 warps, 16 query rows each
constexpr int kBlockRows = 64;    // query rows per block
constexpr int kTileCols = 64;     // queue rows (logit columns) per tile
constexpr int kMaxDepth = 256;    // widest row the kernel takes
constexpr int kRowPad = 8;        // shared row stride kDepth + 8: an odd number of 16-byte units,
                                  // so the 8 rows one ldmatrix reads start in 8 bank groups
constexpr float kLn2 = 0.6931471805599453f;

// Feature buckets the kernel is compiled for: the narrowest of 64, 128, 256 holding `dim`.
inline int depth_bucket(int64_t dim) { return dim <= 64 ? 64 : (dim <= 128 ? 128 : 256); }

template <int kDepth>
constexpr bool resident_rows() {
  return kDepth <= 128;
}

// Dynamic shared memory of moco_mma_sweep_kernel<., kDepth>: two queue tiles and (rows wider
// than 128 features) the block's query rows, 64 x (kDepth + 8) 16-bit elements each.
template <int kDepth>
constexpr int64_t sweep_smem_bytes() {
  return (resident_rows<kDepth>() ? 2 : 3) * int64_t{kTileCols} * (kDepth + kRowPad) * 2;
}

// Rows [row0, row0 + 64) x features [0, ld) of src (rows of `dim` 16-bit elements, dim a
// multiple of 8) into dst (row stride kDepth + kRowPad): features below dim by 16-byte
// cp.async, rows at or past `limit` and the features [dim, ld) by plain zero stores (the
// MMAs read them: zeros keep garbage, NaN included, out of S and of P K).
template <int kDepth>
__device__ __forceinline__ void stage_rows(uint16_t* dst, const uint16_t* __restrict__ src, int64_t row0,
                                           int64_t limit, int dim, int ld) {
  constexpr int kPiecesPerRow = kDepth / 8;
  constexpr int kStride = kDepth + kRowPad;
  // Unrolled, the copies (8 or 16 a thread) each keep an address live across the tile loop:
  // 208 registers at kDepth = 128 (2 blocks an SM, 167 rolled: 3) and spills at 256 (209
  // rolled); the rolled loop recomputes them from shifts.
  const uint16_t* const block_src = src + row0 * dim;  // 32-bit offsets below: r * dim < 2^14
  const int rows_left = limit - row0 < kTileCols ? static_cast<int>(limit - row0) : kTileCols;
#pragma unroll(kDepth <= 64 ? kTileCols * kPiecesPerRow / kThreads : 1)
  for (unsigned i = 0; i < kTileCols * kPiecesPerRow / kThreads; ++i) {
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

// Block (bx, by): query rows [64 bx, 64 bx + 64) against the queue tiles of split by,
// tiles [by tiles_per_split, +tiles_per_split) (the host gives every split a tile). query: (rows,
// dim), queue: (keys, dim), both op_t bit patterns, dim a multiple of 8 up to kDepth, 16-byte
// aligned; row_factor: 1 / (max(||q_i||, eps) T) per row. Writes part_max / part_sum
// [by * rows + row] (natural units) and part_acc [(by * rows + row) * dim + f].
template <typename op_t, int kDepth>
__global__ void __launch_bounds__(kThreads)
    moco_mma_sweep_kernel(const uint16_t* __restrict__ query, const uint16_t* __restrict__ queue,
                          const float* __restrict__ row_factor, int rows, int64_t keys, int dim,
                          int tiles_per_split, float* __restrict__ part_max, float* __restrict__ part_sum,
                          float* __restrict__ part_acc) {
  static_assert(kDepth % 16 == 0 && kDepth <= kMaxDepth, "feature bucket");
  constexpr bool kResident = resident_rows<kDepth>();
  constexpr int kStride = kDepth + kRowPad;
  constexpr int kSteps = kDepth / 16;  // 16-feature steps of the bucket
  uint16_t* const smem = dynamic_shared_memory<uint16_t>();
  auto tile_buffer = [&](int buf) { return smem + buf * kTileCols * kStride; };  // arithmetic: no local array
  uint16_t* const rows_smem = smem + 2 * kTileCols * kStride;  // the query rows (!kResident)

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int quad = lane / 8, r = lane % 8;
  const int row0 = static_cast<int>(blockIdx.x) * kBlockRows;
  const int my_rows[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
  const int ld = (dim + 15) / 16 * 16;
  const int steps = ld / 16;
  const int64_t num_tiles = (keys + kTileCols - 1) / kTileCols;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < num_tiles ? t_begin + tiles_per_split : num_tiles;

  // S in log2 units: dot * (a_i log2(e)); rows past the batch get 0 (their S is 0, never stored).
  float factor[2], run_max[2], run_sum[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    factor[h] = my_rows[h] < rows ? row_factor[my_rows[h]] * ptx::kLog2e : 0.0f;
    run_max[h] = -INFINITY;
    run_sum[h] = 0.0f;
  }
  float acc[2 * kSteps][4];  // A: features 8 n + 2 t + (e & 1) of rows g + 8 (e / 2)
#pragma unroll
  for (int n = 0; n < 2 * kSteps; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;

  // The query rows (through tile buffer 1 when they go to registers) and the first tile, in one
  // commit group.
  stage_rows<kDepth>(kResident ? tile_buffer(1) : rows_smem, query, row0, rows, dim, ld);
  stage_rows<kDepth>(tile_buffer(0), queue, t_begin * kTileCols, keys, dim, ld);
  ptx::cp_async_commit();
  uint32_t resident[kResident ? kSteps : 1][4];
  if constexpr (kResident) {
    ptx::cp_async_wait(0);
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      if (s < steps) {  // uniform over the block
        ptx::ldmatrix<4>(resident[s], tile_buffer(1) + (warp * 16 + (quad & 1) * 8 + r) * kStride + s * 16 +
                                          (quad >> 1) * 8);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) resident[s][e] = 0u;
      }
    }
    // Buffer 1 is refilled only after the first tile's barrier below, which every warp reaches
    // after its ldmatrix.
  }

  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    const int buf = static_cast<int>(tile - t_begin) & 1;
    const int64_t col0 = tile * kTileCols;
    ptx::cp_async_wait(0);
    __syncthreads();  // this tile has landed; the last tile's P K is done with buffer buf ^ 1
    if (tile + 1 < t_end) stage_rows<kDepth>(tile_buffer(buf ^ 1), queue, col0 + kTileCols, keys, dim, ld);
    ptx::cp_async_commit();
    const uint16_t* const v = tile_buffer(buf);

    // S = Q_rows K^T for the warp's 16 rows and the tile's 64 columns (8 per n).
    float s_acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s_acc[n][e] = 0.0f;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      if (s < steps) {  // uniform over the block; unrolled, so `resident` is indexed statically
        uint32_t a[4];
        if constexpr (kResident) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[e] = resident[s][e];
        } else {
          ptx::ldmatrix<4>(a, rows_smem + (warp * 16 + (quad & 1) * 8 + r) * kStride + s * 16 + (quad >> 1) * 8);
        }
#pragma unroll
        for (int np = 0; np < 4; ++np) {  // columns 16 np .. +16: two n-tiles from one ldmatrix
          uint32_t b[4];
          ptx::ldmatrix<4>(b, v + (np * 16 + (quad >> 1) * 8 + r) * kStride + s * 16 + (quad & 1) * 8);
          const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
          ptx::mma_m16n8k16<op_t>(s_acc[2 * np], a, b_lo, s_acc[2 * np]);
          ptx::mma_m16n8k16<op_t>(s_acc[2 * np + 1], a, b_hi, s_acc[2 * np + 1]);
        }
      }
    }

    // The epilogue: S in log2 units; columns past the queue (its last tile only) masked.
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s_acc[n][e] *= factor[e / 2];
    if (col0 + kTileCols > keys) {  // uniform over the block
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (col0 + n * 8 + 2 * t + (e & 1) >= keys) s_acc[n][e] = -INFINITY;
        }
    }
    // Online softmax per row: the quad's max, the rescale of the sum and of A, P in place of S.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n) tile_max = fmaxf(tile_max, fmaxf(s_acc[n][2 * h], s_acc[n][2 * h + 1]));
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
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          s_acc[n][e] = ptx::ex2_approx(s_acc[n][e] - shift);
          tile_sum += s_acc[n][e];
        }
      }
      run_sum[h] = run_sum[h] * rescale + tile_sum;  // this lane's columns: the quad sums at the end
#pragma unroll
      for (int n = 0; n < 2 * kSteps; ++n) {
        acc[n][2 * h] *= rescale;
        acc[n][2 * h + 1] *= rescale;
      }
    }

    // A += P K: P's 16-column blocks as A fragments from the registers (packed first: 16
    // registers instead of S's 32 while the MMAs run), K's rows by ldmatrix.trans.
    uint32_t p_frag[4][4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      p_frag[q][0] = ptx::pack_pair<op_t>(s_acc[2 * q][0], s_acc[2 * q][1]);
      p_frag[q][1] = ptx::pack_pair<op_t>(s_acc[2 * q][2], s_acc[2 * q][3]);
      p_frag[q][2] = ptx::pack_pair<op_t>(s_acc[2 * q + 1][0], s_acc[2 * q + 1][1]);
      p_frag[q][3] = ptx::pack_pair<op_t>(s_acc[2 * q + 1][2], s_acc[2 * q + 1][3]);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t (&a)[4] = p_frag[q];
#pragma unroll
      for (int p = 0; p < kSteps; ++p) {
        if (p < steps) {  // uniform over the block
          uint32_t b[4];
          ptx::ldmatrix<4, true>(b, v + (q * 16 + (quad & 1) * 8 + r) * kStride + p * 16 + (quad >> 1) * 8);
          const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
          ptx::mma_m16n8k16<op_t>(acc[2 * p], a, b_lo, acc[2 * p]);
          ptx::mma_m16n8k16<op_t>(acc[2 * p + 1], a, b_hi, acc[2 * p + 1]);
        }
      }
    }
  }
  ptx::cp_async_wait(0);  // nothing is left in flight (the last commit group is empty)

#pragma unroll
  for (int h = 0; h < 2; ++h) {
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
          out[feat] = acc[n][2 * h];
          out[feat + 1] = acc[n][2 * h + 1];
        }
      }
    }
  }
}

}  // namespace pyssl::moco::mma
