// CUDA forward of the MoCo queue loss, flash-decoding style: MoCo's few queries (256) give
// only a handful of row blocks, so the queue's columns are split across blocks too; every
// block sweeps its column range with an online softmax and writes a partial (max, sum, A)
// triple per row, A = sum_j exp(S_ij - max) q_j; a merge kernel combines them per row.
// Same semantics, checks, outputs and dtypes as csrc/moco/cpu/moco_cpu.cpp (the backward is
// the device-generic at:: function registered there: it needs no queue).
//
// Launch plan (kRows = 16 rows x kCols = 64 queue columns per tile, 256 threads):
//   moco_prep    one warp per row: u_i = q_i / ||q_i|| / T (accumulation dtype), S_i0
//   moco_sweep   grid (row blocks, column splits); dynamic shared memory
//                (kRows * kChunk + kCols * (kChunk + 1) + kRows * kCols + 3 * kRows) accumulators:
//                a chunk of the block's u rows, a queue chunk, the probability tile and the
//                per-row (max, sum, rescale), 24 KiB for fp32 whatever d; plus the block's A
//                rows (kRows * d) where all fits in 48 KiB (fp32, d <= 377), else A stays in
//                global memory.
//   moco_merge   one block per row: merges the splits and the positive logit
//   moco_mean    one block: the mean over rows, in a fixed order (deterministic)
// Logits, max, sums and A stay in float32 (float64 for float64 input); fp16/bf16 queues and
// queries are converted on load.
//
// fp16/bf16 query and queue of one dtype, d a multiple of 8 up to 256 (rows 16-byte aligned
// for cp.async) take the tensor cores instead of moco_sweep: moco_mma_sweep_kernel
// (moco_mma.cuh), 128 query rows per block up to 128 features (64 above), the same partials for
// the same merge.
// PYSSL_MOCO_KERNELS=simt keeps moco_sweep (to time old against new on a GPU).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "device.h"
#include "device_smem.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>

#include "moco/moco_check.h"
#include "moco/moco_math.h"
#include "moco/cuda/moco_mma.cuh"

namespace pyssl::moco {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 16;   // query rows per block
constexpr int kCols = 64;   // queue columns per tile
constexpr int kChunk = 64;  // features per queue chunk in shared memory
constexpr int kRowGroups = kThreads / kCols;           // 4: a thread owns rows g, g+4, g+8, g+12
constexpr int kRowsPerThread = kRows / kRowGroups;     // 4
static_assert(kCols == 64 && kRows % kRowGroups == 0, "the softmax step gives each lane 2 columns");

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// u_i = q_i / max(||q_i||, eps) / T (into scaled_u, the SIMT sweep's operand, unless null),
// a_i = 1 / max(||q_i||, eps) / T (into row_factor, the tensor-core sweep's, unless null) and
// S_i0 = u_i . k_i / max(||k_i||, eps): one warp per row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    moco_prep_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ key, int64_t rows, int64_t dim,
                     acc_t scale, acc_t* __restrict__ scaled_u, acc_t* __restrict__ row_factor,
                     acc_t* __restrict__ positive) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;
  const scalar_t* q = query + row * dim;
  const scalar_t* k = key + row * dim;
  acc_t qq = 0, kk = 0, qk = 0;
  for (int64_t f = lane; f < dim; f += 32) {
    const acc_t a = static_cast<acc_t>(q[f]), b = static_cast<acc_t>(k[f]);
    qq += a * a;
    kk += b * b;
    qk += a * b;
  }
  qq = warp_sum(qq);
  kk = warp_sum(kk);
  qk = warp_sum(qk);
  const acc_t eps = static_cast<acc_t>(kNormEps);
  const acc_t q_norm = fmax(sqrt(qq), eps), k_norm = fmax(sqrt(kk), eps);
  if (scaled_u != nullptr) {
    for (int64_t f = lane; f < dim; f += 32) scaled_u[row * dim + f] = static_cast<acc_t>(q[f]) / q_norm * scale;
  }
  if (lane == 0) {
    positive[row] = qk / q_norm / k_norm * scale;
    if (row_factor != nullptr) row_factor[row] = scale / q_norm;
  }
}

// Loads queue columns [col0, col0 + kCols) x features [f0, f0 + kChunk) into smem (zeros
// past the queue's end or the feature dim), converted to acc_t. Row stride kChunk + 1 keeps
// the column-wise reads of the logit step free of bank conflicts.
template <typename queue_t, typename acc_t>
__device__ __forceinline__ void load_queue_chunk(const queue_t* __restrict__ queue, int64_t keys, int64_t dim,
                                                 int64_t col0, int64_t f0, acc_t* chunk) {
  for (int idx = threadIdx.x; idx < kCols * kChunk; idx += kThreads) {
    const int c = idx / kChunk, f = idx % kChunk;
    const int64_t col = col0 + c, feat = f0 + f;
    chunk[c * (kChunk + 1) + f] = (col < keys && feat < dim) ? static_cast<acc_t>(queue[col * dim + feat]) : acc_t(0);
  }
}

// Loads the block's scaled query rows, features [f0, f0 + kChunk), into smem (zeros for rows
// past the batch and features past the dim).
template <typename acc_t>
__device__ __forceinline__ void load_query_chunk(const acc_t* __restrict__ scaled_u, int64_t rows, int64_t dim,
                                                 int64_t row0, int64_t f0, acc_t* chunk) {
  for (int idx = threadIdx.x; idx < kRows * kChunk; idx += kThreads) {
    const int r = idx / kChunk, f = idx % kChunk;
    const int64_t row = row0 + r, feat = f0 + f;
    chunk[idx] = (row < rows && feat < dim) ? scaled_u[row * dim + feat] : acc_t(0);
  }
}

// One block: kRows query rows against the tiles [tile_begin, tile_end) of the queue. Shared
// memory does not grow with the feature dim (the query rows come in kChunk-feature chunks, as
// the queue's do), so any dim runs, as on the CPU. The accumulator A (kRows x dim) stays in
// shared memory when it fits beside the tiles within 48 KiB (acc_in_shared), else in the
// block's own slice of part_acc in global memory: every element has one owning thread for the
// whole sweep, so either place gives the same values in the same order.
template <typename queue_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    moco_sweep_kernel(const acc_t* __restrict__ scaled_u, const queue_t* __restrict__ queue, int64_t rows,
                      int64_t keys, int64_t dim, int64_t tiles_per_split, bool acc_in_shared,
                      acc_t* __restrict__ part_max, acc_t* __restrict__ part_sum, acc_t* __restrict__ part_acc) {
  acc_t* s_u = dynamic_shared_memory<acc_t>();  // kRows x kChunk
  acc_t* s_q = s_u + kRows * kChunk;                // kCols x (kChunk + 1)
  acc_t* s_p = s_q + kCols * (kChunk + 1);          // kRows x kCols: logits, then probabilities
  acc_t* s_max = s_p + kRows * kCols;               // kRows
  acc_t* s_sum = s_max + kRows;                     // kRows
  acc_t* s_rescale = s_sum + kRows;                 // kRows
  acc_t* s_acc = s_rescale + kRows;                 // kRows x dim when acc_in_shared

  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t split = blockIdx.y;
  acc_t* acc_rows = acc_in_shared ? s_acc : part_acc + (split * rows + row0) * dim;
  if (tid < kRows) {
    s_max[tid] = -INFINITY;
    s_sum[tid] = 0;
  }
  __syncthreads();

  const int lane_col = tid % kCols;  // a column of the tile (logits) or a feature of the chunk (A)
  const int group = tid / kCols;     // rows group, group + 4, group + 8, group + 12
  const int warp = tid / 32, lane = tid % 32;
  const int64_t num_tiles = (keys + kCols - 1) / kCols;
  const int64_t tile_begin = split * tiles_per_split;
  const int64_t tile_end = std::min(num_tiles, tile_begin + tiles_per_split);

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * kCols;
    // 1. logits S = U Q^T for the tile, chunk by chunk of features
    acc_t logit[kRowsPerThread] = {};
    for (int64_t f0 = 0; f0 < dim; f0 += kChunk) {
      load_query_chunk(scaled_u, rows, dim, row0, f0, s_u);
      load_queue_chunk(queue, keys, dim, col0, f0, s_q);
      __syncthreads();
      const int fc = static_cast<int>(std::min<int64_t>(kChunk, dim - f0));
      for (int f = 0; f < fc; ++f) {
        const acc_t qv = s_q[lane_col * (kChunk + 1) + f];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) logit[i] += s_u[(group + kRowGroups * i) * kChunk + f] * qv;
      }
      __syncthreads();
    }
    const bool col_valid = col0 + lane_col < keys;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      s_p[(group + kRowGroups * i) * kCols + lane_col] = col_valid ? logit[i] : acc_t(-INFINITY);
    }
    __syncthreads();

    // 2. online softmax per row: new max, rescale factor, probabilities (masked -> 0)
    for (int r = warp; r < kRows; r += kWarps) {
      const acc_t x0 = s_p[r * kCols + lane], x1 = s_p[r * kCols + lane + 32];
      const acc_t tile_max = warp_max(fmax(x0, x1));
      const acc_t old_max = s_max[r];
      const acc_t new_max = fmax(old_max, tile_max);
      acc_t rescale = 1, p0 = 0, p1 = 0;
      if (new_max != -INFINITY) {  // every tile has a valid column, but never exp(-inf - -inf)
        rescale = exp_acc(old_max - new_max);  // old_max = -inf: 0
        p0 = exp_acc(x0 - new_max);
        p1 = exp_acc(x1 - new_max);
      }
      s_p[r * kCols + lane] = p0;
      s_p[r * kCols + lane + 32] = p1;
      const acc_t tile_sum = warp_sum(p0 + p1);
      // Every lane read s_max[r] above; the shuffles order no shared-memory accesses, so the
      // warp meets here before lane 0 overwrites it.
      __syncwarp();
      if (lane == 0) {
        s_max[r] = new_max;
        s_sum[r] = s_sum[r] * rescale + tile_sum;
        s_rescale[r] = rescale;
      }
    }
    __syncthreads();

    // 3. A <- A * rescale + P Q, chunk by chunk of features (the chunk is re-read, from L2);
    // the first tile starts A (unwritten until then).
    for (int64_t f0 = 0; f0 < dim; f0 += kChunk) {
      load_queue_chunk(queue, keys, dim, col0, f0, s_q);
      __syncthreads();
      if (f0 + lane_col < dim) {
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          const int r = group + kRowGroups * i;
          if (row0 + r >= rows) continue;
          acc_t* a_ptr = acc_rows + r * dim + f0 + lane_col;
          acc_t a = tile == tile_begin ? acc_t(0) : *a_ptr * s_rescale[r];
          for (int c = 0; c < kCols; ++c) a += s_p[r * kCols + c] * s_q[c * (kChunk + 1) + lane_col];
          *a_ptr = a;
        }
      }
      __syncthreads();
    }
  }

  if (acc_in_shared) {
    for (int64_t idx = tid; idx < kRows * dim; idx += kThreads) {
      const int64_t r = idx / dim, f = idx % dim;
      if (row0 + r < rows) part_acc[(split * rows + row0 + r) * dim + f] = s_acc[idx];
    }
  }
  if (tid < kRows && row0 + tid < rows) {
    part_max[split * rows + row0 + tid] = s_max[tid];
    part_sum[split * rows + row0 + tid] = s_sum[tid];
  }
}

// Per row: merge the splits' (max, sum, A) with the positive (S_i0, 1, 0).
template <typename acc_t>
__global__ void moco_merge_kernel(const acc_t* __restrict__ positive, const acc_t* __restrict__ part_max,
                                  const acc_t* __restrict__ part_sum, const acc_t* __restrict__ part_acc,
                                  int64_t rows, int64_t dim, int64_t splits, acc_t* __restrict__ lse,
                                  acc_t* __restrict__ expected_queue, acc_t* __restrict__ row_loss) {
  const int64_t row = blockIdx.x;
  const acc_t pos = positive[row];
  acc_t max_all = pos;
  for (int64_t s = 0; s < splits; ++s) max_all = fmax(max_all, part_max[s * rows + row]);
  acc_t queue_sum = 0;
  for (int64_t s = 0; s < splits; ++s) {
    const acc_t m = part_max[s * rows + row];
    if (m != -INFINITY) queue_sum += part_sum[s * rows + row] * exp_acc(m - max_all);
  }
  const acc_t sum = queue_sum + exp_acc(pos - max_all);
  for (int64_t f = threadIdx.x; f < dim; f += blockDim.x) {
    acc_t a = 0;
    for (int64_t s = 0; s < splits; ++s) {
      const acc_t m = part_max[s * rows + row];
      if (m != -INFINITY) a += part_acc[(s * rows + row) * dim + f] * exp_acc(m - max_all);
    }
    expected_queue[row * dim + f] = a / sum;
  }
  if (threadIdx.x == 0) {
    const acc_t value = max_all + log_acc(sum);
    lse[row] = value;
    // lse - pos from the queue's sum alone, as the CPU kernel (common.h): exactly 0 without a
    // queue, never negative, NaN stays.
    row_loss[row] = cross_entropy_from_negatives<acc_t>(max_all, queue_sum, pos);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void moco_mean_kernel(const acc_t* __restrict__ row_loss, int64_t rows, scalar_t* __restrict__ loss) {
  __shared__ acc_t partial[kThreads];
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) s += row_loss[i];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[0] = static_cast<scalar_t>(partial[0] / static_cast<acc_t>(rows));
}

// The sweep's shared memory without A (a query chunk, a queue chunk, the probability tile, the
// row statistics), and whether A (kRows x dim) fits beside it within the 48 KiB a block gets
// without an opt-in (fp32: dim <= 377); larger A lives in global memory.
template <typename acc_t>
size_t sweep_tile_smem_bytes() {
  return sizeof(acc_t) * static_cast<size_t>(kRows * kChunk + kCols * (kChunk + 1) + kRows * kCols + 3 * kRows);
}

template <typename acc_t>
bool sweep_acc_in_shared(int64_t dim) {
  return sweep_tile_smem_bytes<acc_t>() + sizeof(acc_t) * static_cast<size_t>(kRows * dim) <= 48 * 1024;
}

// Whether the tensor-core sweep serves these inputs: fp16/bf16 query and queue of one dtype (one
// operand type per MMA), rows of a multiple of 8 features up to mma::kMaxDepth starting on 16-byte
// boundaries (cp.async copies 16 bytes; a view's storage offset can break that), and
// PYSSL_MOCO_KERNELS not "simt".
bool use_mma_sweep(const Tensor& query, const Tensor& queue) {
  const auto dtype = query.scalar_type();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || queue.scalar_type() != dtype) return false;
  const int64_t dim = query.size(1);
  if (dim % 8 != 0 || dim > mma::kMaxDepth || query.size(0) > INT32_MAX) return false;
  const auto aligned = [](const Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  if (!aligned(query) || !aligned(queue)) return false;
  const char* env = std::getenv("PYSSL_MOCO_KERNELS");
  return env == nullptr || std::string(env) != "simt";
}

// Column splits of the tensor-core sweep: about kMmaBlocksPerSm blocks per SM in all (its
// registers, 209-248 per thread, allow 2); more splits would only grow the partial A that the
// merge reads (splits x rows x d floats: 17 MB at N = 256, d = 128). No split without a tile.
constexpr int64_t kMmaBlocksPerSm = 2;

template <typename op_t, int kDepth>
void launch_mma_sweep(const Tensor& query, const Tensor& queue, const Tensor& row_factor, int64_t row_blocks,
                      int64_t splits, int64_t tiles_per_split, Tensor& part_max, Tensor& part_sum, Tensor& part_acc,
                      cudaStream_t stream) {
  constexpr int kGroups = mma::row_groups<kDepth>();
  constexpr auto kernel = &mma::moco_mma_sweep_kernel<op_t, kDepth, kGroups>;
  constexpr int64_t smem = mma::sweep_smem_bytes<kDepth, kGroups>();
  if constexpr (smem > 48 * 1024) device::set_max_dynamic_shared_memory<kernel>(static_cast<int>(smem));
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  device::launch<kernel>(grid, mma::kThreads, static_cast<size_t>(smem), stream,
                         static_cast<const uint16_t*>(query.const_data_ptr()),
                         static_cast<const uint16_t*>(queue.const_data_ptr()), row_factor.const_data_ptr<float>(),
                         static_cast<int>(query.size(0)), queue.size(0), static_cast<int>(query.size(1)),
                         static_cast<int>(tiles_per_split), part_max.mutable_data_ptr<float>(),
                         part_sum.mutable_data_ptr<float>(), part_acc.mutable_data_ptr<float>());
}

template <typename op_t>
void dispatch_mma_sweep(const Tensor& query, const Tensor& queue, const Tensor& row_factor, int64_t row_blocks,
                        int64_t splits, int64_t tiles_per_split, Tensor& part_max, Tensor& part_sum,
                        Tensor& part_acc, cudaStream_t stream) {
  switch (mma::depth_bucket(query.size(1))) {
    case 64:
      launch_mma_sweep<op_t, 64>(query, queue, row_factor, row_blocks, splits, tiles_per_split, part_max, part_sum,
                                 part_acc, stream);
      break;
    case 128:
      launch_mma_sweep<op_t, 128>(query, queue, row_factor, row_blocks, splits, tiles_per_split, part_max, part_sum,
                                  part_acc, stream);
      break;
    default:
      launch_mma_sweep<op_t, 256>(query, queue, row_factor, row_blocks, splits, tiles_per_split, part_max, part_sum,
                                  part_acc, stream);
      break;
  }
}

std::tuple<Tensor, Tensor, Tensor> moco_forward_cuda(const Tensor& query_in, const Tensor& key_in,
                                                     const Tensor& queue_in, double temperature) {
  check_moco(query_in, key_in, queue_in, temperature);
  device::Guard guard(query_in.device());
  const auto stream = device::current_stream();
  const Tensor query = query_in.contiguous(), key = key_in.contiguous(), queue = queue_in.contiguous();
  const int64_t rows = query.size(0), dim = query.size(1), keys = queue.size(0);
  const at::ScalarType acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = query.options().dtype(acc);

  int device = query.get_device(), sms = 0, smem_optin = 0;
  PYSSL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  PYSSL_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));

  // Column splits: about 4 blocks per SM in all (the SIMT sweep; kMmaBlocksPerSm for the
  // tensor-core sweep), no split without a tile.
  const bool mma_sweep = keys > 0 && use_mma_sweep(query, queue);
  const int64_t block_rows = mma_sweep ? mma::sweep_block_rows(dim) : kRows;
  const int64_t row_blocks = (rows + block_rows - 1) / block_rows;
  const int64_t num_tiles = (keys + kCols - 1) / kCols;  // kCols = mma::kTileCols
  static_assert(kCols == mma::kTileCols, "both sweeps tile the queue alike");
  int64_t splits = 0, tiles_per_split = 0;
  if (num_tiles > 0) {
    const int64_t target = (mma_sweep ? kMmaBlocksPerSm : 4) * static_cast<int64_t>(sms);
    const int64_t wanted = std::max<int64_t>(1, (target + row_blocks - 1) / row_blocks);
    tiles_per_split = (num_tiles + std::min(wanted, num_tiles) - 1) / std::min(wanted, num_tiles);
    splits = (num_tiles + tiles_per_split - 1) / tiles_per_split;
  }

  Tensor scaled_u = mma_sweep ? Tensor() : at::empty({rows, dim}, acc_opts);
  Tensor row_factor = mma_sweep ? at::empty({rows}, acc_opts) : Tensor();
  Tensor positive = at::empty({rows}, acc_opts);
  Tensor part_max = at::empty({std::max<int64_t>(splits, 1), rows}, acc_opts);
  Tensor part_sum = at::empty({std::max<int64_t>(splits, 1), rows}, acc_opts);
  Tensor part_acc = at::empty({std::max<int64_t>(splits, 1), rows, dim}, acc_opts);
  Tensor lse = at::empty({rows}, acc_opts);
  Tensor expected_queue = at::empty({rows, dim}, acc_opts);
  Tensor row_loss = at::empty({rows}, acc_opts);
  Tensor loss = at::empty({}, query.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "pyssl_moco_forward_cuda", [&] {
    using query_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<query_t, double>, double, float>;
    const unsigned prep_blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
    device::launch<moco_prep_kernel<query_t, acc_t>>(prep_blocks, kThreads, 0, stream,
        query.const_data_ptr<query_t>(), key.const_data_ptr<query_t>(), rows, dim,
        static_cast<acc_t>(1.0 / temperature), mma_sweep ? nullptr : scaled_u.mutable_data_ptr<acc_t>(),
        mma_sweep ? row_factor.mutable_data_ptr<acc_t>() : nullptr, positive.mutable_data_ptr<acc_t>());

    if (mma_sweep) {
      if constexpr (std::is_same_v<query_t, at::Half>) {
        dispatch_mma_sweep<__half>(query, queue, row_factor, row_blocks, splits, tiles_per_split, part_max, part_sum,
                                   part_acc, stream);
      } else if constexpr (std::is_same_v<query_t, at::BFloat16>) {
        dispatch_mma_sweep<__nv_bfloat16>(query, queue, row_factor, row_blocks, splits, tiles_per_split, part_max,
                                          part_sum, part_acc, stream);
      }
    } else if (splits > 0) {
      const bool acc_in_shared = sweep_acc_in_shared<acc_t>(dim);
      const size_t smem = sweep_tile_smem_bytes<acc_t>() + (acc_in_shared ? sizeof(acc_t) * kRows * dim : 0);
      TORCH_CHECK(smem <= static_cast<size_t>(smem_optin), "pyssl.moco: the CUDA kernel needs ", smem,
                  " bytes of shared memory per block, the device has ", smem_optin);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(), "pyssl_moco_sweep_cuda", [&] {
        constexpr auto kernel = &moco_sweep_kernel<scalar_t, acc_t>;
        if (smem > 48 * 1024) device::set_max_dynamic_shared_memory<kernel>(static_cast<int>(smem));
        const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
        device::launch<kernel>(grid, kThreads, smem, stream, scaled_u.const_data_ptr<acc_t>(), queue.const_data_ptr<scalar_t>(), rows,
                               keys, dim, tiles_per_split, acc_in_shared, part_max.mutable_data_ptr<acc_t>(),
                               part_sum.mutable_data_ptr<acc_t>(), part_acc.mutable_data_ptr<acc_t>());
      });
    }

    device::launch<moco_merge_kernel<acc_t>>(static_cast<unsigned>(rows), 128, 0, stream,
        positive.const_data_ptr<acc_t>(), part_max.const_data_ptr<acc_t>(), part_sum.const_data_ptr<acc_t>(),
        part_acc.const_data_ptr<acc_t>(), rows, dim, splits, lse.mutable_data_ptr<acc_t>(),
        expected_queue.mutable_data_ptr<acc_t>(), row_loss.mutable_data_ptr<acc_t>());
    device::launch<moco_mean_kernel<query_t, acc_t>>(1, kThreads, 0, stream, row_loss.const_data_ptr<acc_t>(), rows,
                                                     loss.mutable_data_ptr<query_t>());
  });
  return {loss, lse, expected_queue};
}

}  // namespace

PYSSL_DEVICE_LIBRARY_IMPL(m) { m.impl("moco_forward", &moco_forward_cuda); }

}  // namespace pyssl::moco
