// CUDA kernels of the fused InfoNCE family (NT-Xent, InfoNCE, CLIP), flash-attention style:
// a row block sweeps column tiles, recomputing each logit tile from the normalised rows; the
// (rows x keys) logit matrix is never allocated. Same semantics, checks, output shapes and
// dtypes as csrc/infonce/cpu/infonce_cpu.cpp; the kernels are in infonce_kernels.cuh.
//
// Launch plan (kTile = 64 rows/columns per tile, 256 threads, 4 x 4 logits per thread):
//   normalize_rows    one warp per row, 8 rows per block
//   lse_partial       grid (row tiles, column splits); merged by lse_merge (1 thread per row)
//   grad_partial      grid (row tiles, 128-feature chunks, column splits), 33 KiB (fp32) /
//                     65 KiB (fp64) dynamic shared memory; summed by grad_finalize (1 block/row)
//   loss / scale_grad: one block (the positive logits are taken by lse_partial from its tiles).
// fp16/bf16 input takes the *_mma variants (same grids): the tiles S = U V^T and G V run on the
// tensor cores (WMMA 16x16x16, fp16 operands, float32 accumulators), 8 warps per block, each
// owning 16 x 32 of the S tile and 16 x 64 of the block's dX chunk; 17 KiB (forward) and
// 26 KiB (backward) of static shared memory.
// Column splits keep the SMs busy for any batch: the forward asks for >= 4 blocks per SM
// (their partial (max, sum) pairs are merged per row), the backward for one full wave of
// 2 blocks per SM (its partial dX sums, splits x rows x d floats, are added in grad_finalize).
//
// grad_loss and logit_scale are read on the device (no host synchronisation). A logit_scale
// tensor that lives on the CPU is range-checked on the host like the CPU kernel does; one on
// the GPU cannot be without a sync, so a value that is not > 0 yields a NaN loss/gradient.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "device.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "infonce/infonce_check.h"
#include "infonce/cuda/infonce_kernels.cuh"
#include "infonce/cuda/infonce_mma.cuh"

namespace pyssl::infonce {
namespace {

using at::Tensor;
using namespace pyssl::infonce::cuda;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::ScalarType accumulate_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtypes the kernels read and write directly; others (float8) go through float32.
bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

int sm_count() {
  int device = 0, count = 0;
  PYSSL_CUDA_CHECK(cudaGetDevice(&device));
  PYSSL_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max(count, 1);
}

// Column splits of a sweep over col_tiles tiles so that about `target` blocks run, given
// `other` blocks per split: at least `target` (round_up) or at most `target` when that is the
// number of blocks resident at once (no half-empty second wave). Returns
// (splits, tiles_per_split) with no empty split.
std::pair<int64_t, int64_t> column_splits(int64_t col_tiles, int64_t other, int64_t target,
                                          bool round_up) {
  other = std::max<int64_t>(other, 1);
  const int64_t wanted = round_up ? ceil_div(target, other) : target / other;
  const int64_t splits = std::clamp<int64_t>(wanted, 1, col_tiles);
  const int64_t per_split = ceil_div(col_tiles, splits);
  return {ceil_div(col_tiles, per_split), per_split};
}

// A one-element tensor as a 0-dim tensor of `acc` on `device` (a copy only if needed).
Tensor device_scalar(const Tensor& t, const char* op, const char* name, at::Device device,
                     at::ScalarType acc) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold one value, got shape ", t.sizes());
  return t.to(device, acc).reshape({});
}

// Tensor cores serve fp16/bf16 input unless the caller says otherwise (`requested`, which the
// autograd wrappers decide once per forward and carry to the backward) or, when it does not
// say, PYSSL_INFONCE_TENSOR_CORES=0: the logits then come from fp16-rounded unit rows (errors
// ~1e-4 of a cosine), as in any fp16/bf16 matmul.
bool use_tensor_cores(const Tensor& a, const Tensor& b, std::optional<bool> requested) {
  auto half_like = [](at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; };
  bool allowed = true;
  if (requested.has_value()) {
    allowed = *requested;
  } else if (const char* env = std::getenv("PYSSL_INFONCE_TENSOR_CORES")) {
    allowed = std::string(env) != "0";
  }
  return allowed && half_like(a.scalar_type()) && half_like(b.scalar_type());
}

// Which tensor-core kernels serve fp16/bf16: the mma.sync ones (infonce_mma.cuh, operands in the
// input's own dtype) unless PYSSL_INFONCE_KERNELS=wmma asks for the older WMMA kernels (kept to
// time old against new on a GPU), or the two inputs differ in dtype (one operand type per MMA).
bool use_mma_kernels(const Tensor& a, const Tensor& b) {
  if (a.scalar_type() != b.scalar_type()) return false;
  const char* env = std::getenv("PYSSL_INFONCE_KERNELS");
  return env == nullptr || std::string(env) != "wmma";
}

enum class TensorCores { kNone, kWmma, kMma };

TensorCores tensor_core_kernels(const Tensor& a, const Tensor& b, std::optional<bool> requested) {
  if (!use_tensor_cores(a, b, requested)) return TensorCores::kNone;
  return use_mma_kernels(a, b) ? TensorCores::kMma : TensorCores::kWmma;
}

// Rows normalised in the accumulation dtype, zero-padded to (kTile, kDepth) multiples.
struct Normalized {
  Tensor unit;       // (rows_pad, dim_pad)
  Tensor unit_half;  // the same rounded to fp16 for the WMMA kernels, or undefined
  // The mma.sync kernels' operands (or undefined): the rows in the input's dtype and the unit
  // rows in fp16, (rows_pad, op_ld), and root_inv = sqrt(scale) / ||z|| (rows_pad,), 0 on
  // padding rows (S_ij = dot_ij * (root_inv_i * root_inv_j): the same bits for S_ji).
  Tensor op_raw, op_unit, root_inv;
  int64_t op_ld = 0;
  int64_t op_rows = 0;  // rows of op_raw, op_unit, root_inv: rows padded to mma::kWideRows
  Tensor norm;       // (rows,) = ||z||
  int64_t rows, rows_pad, dim, dim_pad;
  at::ScalarType dtype;  // the input's dtype, that of its gradient
};

template <typename in_t, typename acc_t>
void launch_normalize(const Tensor& z, Normalized& n, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(n.rows_pad, kWarps));
  device::launch<normalize_rows_kernel<in_t, acc_t>>(blocks, kThreads, 0, stream,
      z.const_data_ptr<in_t>(), z.stride(0), z.stride(1), n.rows, n.rows_pad, n.dim, n.dim_pad,
      n.unit.mutable_data_ptr<acc_t>(), n.norm.mutable_data_ptr<acc_t>(),
      n.unit_half.defined() ? reinterpret_cast<__half*>(n.unit_half.mutable_data_ptr<at::Half>()) : nullptr);
}

template <typename in_t, typename op_t>
void launch_prepare_operands(const Tensor& z, const Tensor& scale, Normalized& n, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(n.op_rows, 8));
  device::launch<mma::prepare_operands_kernel<in_t, op_t>>(blocks, 256, 0, stream,
      z.const_data_ptr<in_t>(), z.stride(0), z.stride(1), n.rows, n.op_rows, n.dim, n.op_ld,
      n.norm.const_data_ptr<float>(), scale.const_data_ptr<float>(),
      reinterpret_cast<op_t*>(n.op_raw.mutable_data_ptr()), reinterpret_cast<__half*>(n.op_unit.mutable_data_ptr()),
      n.root_inv.mutable_data_ptr<float>());
}

// scale: the logit scale (device scalar in acc), folded into the mma kernels' operands.
Normalized normalize_rows(const Tensor& z_in, at::ScalarType acc, TensorCores kernels, const Tensor& scale,
                          cudaStream_t stream) {
  const bool tensor_cores = kernels == TensorCores::kWmma;
  const Tensor z = kernel_dtype(z_in.scalar_type()) ? z_in : z_in.to(at::kFloat);
  Normalized n;
  n.rows = z.size(0);
  n.rows_pad = ceil_div(n.rows, kTile) * kTile;
  n.dim = z.size(1);
  n.dim_pad = ceil_div(n.dim, kDepth) * kDepth;
  n.dtype = z_in.scalar_type();
  const auto opts = z.options().dtype(acc);
  n.unit = at::empty({n.rows_pad, n.dim_pad}, opts);
  n.norm = at::empty({n.rows}, opts);
  if (tensor_cores) n.unit_half = at::empty({n.rows_pad, n.dim_pad}, z.options().dtype(at::kHalf));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "pyssl_normalize_rows_cuda", [&] {
    if (acc == at::kDouble) {
      launch_normalize<scalar_t, double>(z, n, stream);
    } else {
      launch_normalize<scalar_t, float>(z, n, stream);
    }
  });
  if (kernels == TensorCores::kMma) {
    n.op_rows = ceil_div(n.rows, mma::kWideRows) * mma::kWideRows;
    TORCH_CHECK(n.op_rows <= INT32_MAX, "pyssl.infonce: too many rows for the tensor-core kernels");
    n.op_ld = ceil_div(n.dim, mma::kStage) * mma::kStage;
    n.op_raw = at::empty({n.op_rows, n.op_ld}, z.options());
    n.op_unit = at::empty({n.op_rows, n.op_ld}, z.options().dtype(at::kHalf));
    n.root_inv = at::empty({n.op_rows}, z.options().dtype(at::kFloat));
    if (z.scalar_type() == at::kHalf) {
      launch_prepare_operands<at::Half, __half>(z, scale, n, stream);
    } else {
      launch_prepare_operands<at::BFloat16, __nv_bfloat16>(z, scale, n, stream);
    }
  }
  return n;
}

const uint16_t* bits_ptr(const Tensor& t) { return static_cast<const uint16_t*>(t.const_data_ptr()); }

const __half* half_ptr(const Tensor& t) {
  return reinterpret_cast<const __half*>(t.const_data_ptr<at::Half>());
}

// Calls f(std::true_type) when x's rows are short enough for the mma kernels to keep the row
// block's fragments in registers, else f(std::false_type).
template <typename F>
void with_resident_rows(const Normalized& x, F&& f) {
  if (x.op_ld <= mma::kResidentSlices * mma::kStage) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The mma forward: rows of up to 128 features keep their fragments in registers, in wide blocks
// (mma::kWideRows rows, 32 per warp); longer rows stream both operands in 64-row blocks.
bool wide_forward(const Normalized& x) { return x.op_ld <= mma::kResidentSlices * mma::kStage; }

template <typename op_t>
void launch_lse_partial_mma(dim3 grid, const Normalized& x, const Normalized& y, const Tensor& scale,
                            bool mask_diagonal, const PositiveLogits<float>& positives, int64_t per_split,
                            Tensor& part_max, Tensor& part_sum, cudaStream_t stream) {
  auto launch = [&](auto kernel) {
    device::launch<decltype(kernel)::value>(grid, mma::kThreads, 0, stream,
        bits_ptr(x.op_raw), bits_ptr(y.op_raw), x.root_inv.const_data_ptr<float>(), y.root_inv.const_data_ptr<float>(),
        static_cast<int>(x.rows), static_cast<int>(y.rows), x.op_ld, scale.const_data_ptr<float>(),
        mask_diagonal, positives, static_cast<int>(per_split), part_max.mutable_data_ptr<float>(),
        part_sum.mutable_data_ptr<float>());
  };
  if (wide_forward(x)) {
    launch(std::integral_constant<decltype(&mma::lse_partial_kernel<op_t, true, mma::kWideGroups>),
                                  &mma::lse_partial_kernel<op_t, true, mma::kWideGroups>>{});
  } else {
    launch(std::integral_constant<decltype(&mma::lse_partial_kernel<op_t, false>), &mma::lse_partial_kernel<op_t, false>>{});
  }
}

template <typename op_t>
void launch_grad_partial_mma(dim3 grid, const Normalized& x, const Normalized& y, const Tensor& scale,
                             const GradTerms<float>& terms, int64_t per_split, Tensor& part,
                             float* prob_cos, cudaStream_t stream) {
  with_resident_rows(x, [&](auto resident) {
    device::launch<mma::grad_partial_kernel<op_t, decltype(resident)::value>>(grid, mma::kThreads, 0, stream,
        bits_ptr(x.op_raw), bits_ptr(y.op_raw), bits_ptr(y.op_unit), x.root_inv.const_data_ptr<float>(), y.root_inv.const_data_ptr<float>(),
        x.op_ld, static_cast<int>(x.rows_pad), static_cast<int>(x.dim_pad), scale.const_data_ptr<float>(), terms,
        static_cast<int>(per_split), part.mutable_data_ptr<float>(), prob_cos);
  });
}

// lse_out[i] = log sum_j exp(scale x_i . y_j) over the allowed columns j of y, and ce_out[i]
// = lse_out[i] - S_{i,p(i)}, row i's cross-entropy against its positive column p(i) (i, or the
// NT-Xent partner when pairs > 0), the positive taken from the same tiles.
void row_lse(const Normalized& x, const Normalized& y, bool mask_diagonal, int64_t pairs, const Tensor& scale,
             Tensor& lse_out, Tensor& ce_out, cudaStream_t stream) {
  const bool wide = x.op_raw.defined() && y.op_raw.defined() && wide_forward(x);
  const int64_t row_tiles = wide ? x.op_rows / mma::kWideRows : x.rows_pad / kTile, col_tiles = ceil_div(y.rows, kTile);
  const std::pair<int64_t, int64_t> split = column_splits(col_tiles, row_tiles, 4 * int64_t{sm_count()}, /*round_up=*/true);
  const int64_t splits = split.first, per_split = split.second;
  Tensor part_max = at::empty({splits, x.rows}, x.unit.options());
  Tensor part_sum = at::empty({splits, x.rows}, x.unit.options());
  Tensor pos = at::empty({x.rows}, x.unit.options());
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits));
  AT_DISPATCH_FLOATING_TYPES(x.unit.scalar_type(), "pyssl_row_lse_cuda", [&] {
    if (x.op_raw.defined() && y.op_raw.defined()) {
      const PositiveLogits<float> positives_f{pos.mutable_data_ptr<float>(), x.rows, pairs};
      if (x.dtype == at::kHalf) {
        launch_lse_partial_mma<__half>(grid, x, y, scale, mask_diagonal, positives_f, per_split, part_max, part_sum, stream);
      } else {
        launch_lse_partial_mma<__nv_bfloat16>(grid, x, y, scale, mask_diagonal, positives_f, per_split, part_max, part_sum, stream);
      }
    } else if (x.unit_half.defined() && y.unit_half.defined()) {
      device::launch<lse_partial_mma_kernel>(grid, kThreads, 0, stream,
          half_ptr(x.unit_half), half_ptr(y.unit_half), x.rows, y.rows, x.dim_pad,
          scale.const_data_ptr<float>(), mask_diagonal, PositiveLogits<float>{pos.mutable_data_ptr<float>(), x.rows, pairs}, per_split,
          part_max.mutable_data_ptr<float>(), part_sum.mutable_data_ptr<float>());
    } else {
      device::launch<lse_partial_kernel<scalar_t>>(grid, kThreads, 0, stream,
          x.unit.const_data_ptr<scalar_t>(), y.unit.const_data_ptr<scalar_t>(), x.rows, y.rows,
          x.dim_pad, scale.const_data_ptr<scalar_t>(), mask_diagonal,
          PositiveLogits<scalar_t>{pos.mutable_data_ptr<scalar_t>(), x.rows, pairs}, per_split,
          part_max.mutable_data_ptr<scalar_t>(), part_sum.mutable_data_ptr<scalar_t>());
    }
    device::launch<lse_merge_kernel<scalar_t>>(static_cast<unsigned>(ceil_div(x.rows, kThreads)), kThreads, 0, stream,
        part_max.const_data_ptr<scalar_t>(), part_sum.const_data_ptr<scalar_t>(), splits, x.rows,
        pos.const_data_ptr<scalar_t>(), lse_out.mutable_data_ptr<scalar_t>(), ce_out.mutable_data_ptr<scalar_t>());
  });
}

Tensor reduce_loss(const Tensor& ce_row, const Tensor* ce_col, const Tensor& scale, cudaStream_t stream) {
  Tensor loss = at::empty({}, ce_row.options());
  AT_DISPATCH_FLOATING_TYPES(ce_row.scalar_type(), "pyssl_infonce_loss_cuda", [&] {
    device::launch<loss_kernel<scalar_t>>(1, kThreads, 0, stream,
        ce_row.const_data_ptr<scalar_t>(), ce_col != nullptr ? ce_col->const_data_ptr<scalar_t>() : nullptr,
        ce_row.size(0), scale.const_data_ptr<scalar_t>(), loss.mutable_data_ptr<scalar_t>());
  });
  return loss;
}

struct GradSums {
  Tensor part;      // (splits, x.rows_pad, x.dim_pad), rows < x.rows written
  int64_t splits;
  Tensor prob_cos;  // per-block sum_ij G_ij cos_ij, or undefined
  bool prob_cos_holds_logits = false;  // sums of G_ij S_ij instead (the mma kernels)
};

// The mma backward for bf16 rows of 129 .. mma::kWideGradMaxDepth features: one block owns all
// the features of its rows (each S tile formed once), unless PYSSL_INFONCE_KERNELS=chunked asks
// for the 128-feature chunks of grad_partial_kernel (kept to time old against new on a GPU).
bool wide_backward(const Normalized& x) {
  if (x.dtype != at::kBFloat16 || x.op_ld <= mma::kResidentSlices * mma::kStage ||
      x.op_ld > mma::kWideGradMaxDepth) {
    return false;
  }
  const char* env = std::getenv("PYSSL_INFONCE_KERNELS");
  return env == nullptr || std::string(env) != "chunked";
}

template <int kFeatureGroups>
void launch_wide_grad(const Normalized& x, const Normalized& y, const Tensor& scale, const GradTerms<float>& terms,
                      int64_t row_tiles, int64_t col_tiles, bool want_prob_cos, GradSums& out,
                      cudaStream_t stream) {
  constexpr auto kernel = &mma::wide_grad_kernel<kFeatureGroups>;
  constexpr int threads = mma::kThreads * kFeatureGroups;
  const int64_t smem = mma::wide_grad_smem_bytes(x.op_ld);
  device::set_max_dynamic_shared_memory<kernel>(static_cast<int>(smem));
  // Blocks resident per SM on the H100/H200: 227 KiB of shared memory usable (1 KiB reserved per
  // block) and 2048 threads.
  constexpr int64_t kSharedPerSm = 227 * 1024, kReservedPerBlock = 1024, kThreadsPerSm = 2048;
  const int64_t per_sm =
      std::max<int64_t>(1, std::min<int64_t>(kSharedPerSm / (smem + kReservedPerBlock), kThreadsPerSm / threads));
  const std::pair<int64_t, int64_t> split =
      column_splits(col_tiles, row_tiles, per_sm * int64_t{sm_count()}, /*round_up=*/false);
  out.splits = split.first;
  out.part = at::empty({out.splits, x.rows_pad, x.dim_pad}, x.unit.options());
  float* prob_cos = nullptr;
  if (want_prob_cos) {
    out.prob_cos = at::empty({out.splits * row_tiles}, x.unit.options());
    prob_cos = out.prob_cos.mutable_data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(out.splits));
  device::launch<kernel>(grid, threads, static_cast<int>(smem), stream,
      bits_ptr(x.op_raw), bits_ptr(y.op_raw), x.root_inv.const_data_ptr<float>(), y.root_inv.const_data_ptr<float>(),
      static_cast<int>(x.op_ld), static_cast<int>(x.rows_pad), static_cast<int>(x.dim_pad),
      scale.const_data_ptr<float>(), terms, static_cast<int>(split.second), out.part.mutable_data_ptr<float>(),
      prob_cos);
  out.prob_cos_holds_logits = true;
}

// Sums G Y over the columns of y for every row of x (see grad_partial_kernel). lse_x / lse_y
// are the row- and column-side lse (null: term absent); the positive of row i is column i, or
// its NT-Xent partner when pairs > 0, and enters G with -n_pos.
GradSums grad_sweep(const Normalized& x, const Normalized& y, const Tensor& scale,
                    const Tensor* lse_x, const Tensor* lse_y, bool mask_diagonal, int64_t pairs,
                    double n_pos, bool want_prob_cos, cudaStream_t stream) {
  const int64_t row_tiles = x.rows_pad / kTile, col_tiles = ceil_div(y.rows, kTile);
  auto make_terms = [&](auto zero) {
    using acc_t = decltype(zero);
    GradTerms<acc_t> terms;
    terms.lse_x = lse_x != nullptr ? lse_x->const_data_ptr<acc_t>() : nullptr;
    terms.lse_y = lse_y != nullptr ? lse_y->const_data_ptr<acc_t>() : nullptr;
    terms.n_x = x.rows;
    terms.n_y = y.rows;
    terms.mask_diagonal = mask_diagonal;
    terms.pairs = pairs;
    terms.n_pos = static_cast<acc_t>(n_pos);
    return terms;
  };
  if (x.op_raw.defined() && y.op_raw.defined() && wide_backward(x)) {
    GradSums out;
    if (x.op_ld <= 2 * kGradCols) {
      launch_wide_grad<2>(x, y, scale, make_terms(0.0f), row_tiles, col_tiles, want_prob_cos, out, stream);
    } else {
      launch_wide_grad<4>(x, y, scale, make_terms(0.0f), row_tiles, col_tiles, want_prob_cos, out, stream);
    }
    return out;
  }
  const int64_t chunks = ceil_div(x.dim_pad, kGradCols);
  // Two backward blocks fit an SM (128 registers x 256 threads): fill one wave of them.
  const std::pair<int64_t, int64_t> split =
      column_splits(col_tiles, row_tiles * chunks, 2 * int64_t{sm_count()}, /*round_up=*/false);
  const int64_t splits = split.first, per_split = split.second;
  GradSums out;
  out.splits = splits;
  out.part = at::empty({splits, x.rows_pad, x.dim_pad}, x.unit.options());
  if (want_prob_cos) out.prob_cos = at::empty({splits * row_tiles}, x.unit.options());
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(chunks),
                  static_cast<unsigned>(splits));
  if (x.op_raw.defined() && y.op_raw.defined()) {  // fp16/bf16 input: float32 statistics
    float* prob_cos = want_prob_cos ? out.prob_cos.mutable_data_ptr<float>() : nullptr;
    if (x.dtype == at::kHalf) {
      launch_grad_partial_mma<__half>(grid, x, y, scale, make_terms(0.0f), per_split, out.part, prob_cos, stream);
    } else {
      launch_grad_partial_mma<__nv_bfloat16>(grid, x, y, scale, make_terms(0.0f), per_split, out.part, prob_cos, stream);
    }
    out.prob_cos_holds_logits = true;
    return out;
  }
  if (x.unit_half.defined() && y.unit_half.defined()) {  // fp16/bf16 input: float32 statistics
    float* prob_cos = want_prob_cos ? out.prob_cos.mutable_data_ptr<float>() : nullptr;
    device::launch<grad_partial_mma_kernel>(grid, kThreads, 0, stream,
        half_ptr(x.unit_half), half_ptr(y.unit_half), x.rows_pad, x.dim_pad,
        scale.const_data_ptr<float>(), make_terms(0.0f), per_split,
        out.part.mutable_data_ptr<float>(), prob_cos);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(x.unit.scalar_type(), "pyssl_grad_sweep_cuda", [&] {
    const int smem = kGradSmemElems * static_cast<int>(sizeof(scalar_t));
    // Above 48 KiB (float64) dynamic shared memory needs an explicit opt-in.
    device::set_max_dynamic_shared_memory<grad_partial_kernel<scalar_t>>(smem);
    device::launch<grad_partial_kernel<scalar_t>>(grid, kThreads, smem, stream,
        x.unit.const_data_ptr<scalar_t>(), y.unit.const_data_ptr<scalar_t>(), x.rows_pad,
        x.dim_pad, scale.const_data_ptr<scalar_t>(), make_terms(scalar_t(0)), per_split,
        out.part.mutable_data_ptr<scalar_t>(),
        want_prob_cos ? out.prob_cos.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return out;
}

template <typename acc_t, typename out_t>
void launch_grad_finalize(const GradSums& sums, const Normalized& x, const Tensor& grad_loss,
                          const Tensor& scale, double mean_factor, Tensor& out, cudaStream_t stream) {
  device::launch<grad_finalize_kernel<acc_t, out_t>>(static_cast<unsigned>(x.rows), 128, 0, stream,
      sums.part.const_data_ptr<acc_t>(), sums.splits, x.rows_pad, x.rows, x.dim, x.dim_pad,
      x.unit.const_data_ptr<acc_t>(), x.norm.const_data_ptr<acc_t>(),
      grad_loss.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
      static_cast<acc_t>(mean_factor), out.mutable_data_ptr<out_t>());
}

// dL/dz of the rows of x: sums * grad * scale * mean_factor through the normalisation, in
// x's input dtype.
Tensor grad_finalize(const GradSums& sums, const Normalized& x, const Tensor& grad_loss,
                     const Tensor& scale, double mean_factor, cudaStream_t stream) {
  const at::ScalarType out_dtype = kernel_dtype(x.dtype) ? x.dtype : at::kFloat;
  Tensor out = at::empty({x.rows, x.dim}, x.unit.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "pyssl_grad_finalize_cuda", [&] {
    if (x.unit.scalar_type() == at::kDouble) {
      launch_grad_finalize<double, scalar_t>(sums, x, grad_loss, scale, mean_factor, out, stream);
    } else {
      launch_grad_finalize<float, scalar_t>(sums, x, grad_loss, scale, mean_factor, out, stream);
    }
  });
  return out_dtype == x.dtype ? out : out.to(x.dtype);
}

// ---- NT-Xent ----------------------------------------------------------------------------------

void check_ntxent_cuda(const Tensor& z, double temperature) {
  check_ntxent(z, temperature);
  device::check_on_device(z, "pyssl.ntxent", "z");
}

std::tuple<Tensor, Tensor> ntxent_forward_cuda(const Tensor& z, double temperature, std::optional<bool> tensor_cores) {
  check_ntxent_cuda(z, temperature);
  device::Guard guard(z.device());
  cudaStream_t stream = device::current_stream();
  const at::ScalarType acc = accumulate_type(z);
  const int64_t rows = z.size(0), pairs = rows / 2;
  Tensor scale = at::empty({}, z.options().dtype(acc)).fill_(1.0 / temperature);
  Normalized n = normalize_rows(z, acc, tensor_core_kernels(z, z, tensor_cores), scale, stream);

  Tensor lse = at::empty({rows}, n.unit.options());
  Tensor ce = at::empty({rows}, n.unit.options());
  row_lse(n, n, /*mask_diagonal=*/true, pairs, scale, lse, ce, stream);
  Tensor loss = reduce_loss(ce, nullptr, scale, stream);
  return {loss.to(z.scalar_type()), lse};
}

Tensor ntxent_backward_cuda(const Tensor& grad_loss, const Tensor& z, const Tensor& lse,
                            double temperature, std::optional<bool> tensor_cores) {
  check_ntxent_cuda(z, temperature);
  const int64_t rows = z.size(0), pairs = rows / 2;
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == rows, "pyssl.ntxent_backward: lse must have shape (",
              rows, "), got ", lse.sizes());
  device::Guard guard(z.device());
  cudaStream_t stream = device::current_stream();
  const at::ScalarType acc = accumulate_type(z);
  Tensor scale = at::empty({}, z.options().dtype(acc)).fill_(1.0 / temperature);
  Normalized n = normalize_rows(z, acc, tensor_core_kernels(z, z, tensor_cores), scale, stream);
  Tensor grad = device_scalar(grad_loss, "pyssl.ntxent_backward", "grad_loss", z.device(), acc);
  Tensor lse_acc = lse.to(z.device(), acc).contiguous();

  // dU_k = sum_j (P_kj + P_jk - 2 [j = p(k)]) u_j: S is symmetric, so one sweep with both lse
  // terms; the positive logit S_{k,p(k)} appears in row k and (as S_{p(k),k}) in row p(k).
  GradSums sums = grad_sweep(n, n, scale, &lse_acc, &lse_acc, /*mask_diagonal=*/true, pairs,
                             /*n_pos=*/2.0, /*want_prob_cos=*/false, stream);
  return grad_finalize(sums, n, grad, scale, 1.0 / static_cast<double>(rows), stream);
}

// ---- InfoNCE / CLIP ---------------------------------------------------------------------------

void check_infonce_cuda(const Tensor& query, const Tensor& key, const Tensor& logit_scale, bool symmetric) {
  check_infonce(query, key, logit_scale, symmetric);
  device::check_on_device(query, "pyssl.infonce", "query");
  device::check_on_device(key, "pyssl.infonce", "key");
  if (!device::on_device(logit_scale)) checked_logit_scale(logit_scale);  // free to read without a device sync
}

std::tuple<Tensor, Tensor, Tensor> infonce_forward_cuda(const Tensor& query, const Tensor& key,
                                                        const Tensor& logit_scale, bool symmetric,
                                                        std::optional<bool> tensor_cores_requested) {
  check_infonce_cuda(query, key, logit_scale, symmetric);
  device::Guard guard(query.device());
  cudaStream_t stream = device::current_stream();
  const at::ScalarType acc = accumulate_type(query);
  const int64_t rows = query.size(0), keys = key.size(0);
  const TensorCores tensor_cores = tensor_core_kernels(query, key, tensor_cores_requested);
  Tensor scale = device_scalar(logit_scale, "pyssl.infonce", "logit_scale", query.device(), acc);
  Normalized nq = normalize_rows(query, acc, tensor_cores, scale, stream);
  Normalized nk = normalize_rows(key, acc, tensor_cores, scale, stream);

  Tensor lse_row = at::empty({rows}, nq.unit.options());
  Tensor ce_row = at::empty({rows}, nq.unit.options());
  row_lse(nq, nk, /*mask_diagonal=*/false, /*pairs=*/0, scale, lse_row, ce_row, stream);
  Tensor lse_col = at::empty({symmetric ? keys : 0}, nq.unit.options());
  Tensor ce_col = at::empty({symmetric ? keys : 0}, nq.unit.options());
  // CLIP's column statistics: the same sweep with the roles of query and key swapped (each side
  // takes its positive S_ii from its own sweep).
  if (symmetric) row_lse(nk, nq, /*mask_diagonal=*/false, /*pairs=*/0, scale, lse_col, ce_col, stream);
  Tensor loss = reduce_loss(ce_row, symmetric ? &ce_col : nullptr, scale, stream);
  return {loss.to(query.scalar_type()), lse_row, lse_col};
}

std::tuple<Tensor, Tensor, Tensor> infonce_backward_cuda(const Tensor& grad_loss, const Tensor& query,
                                                         const Tensor& key, const Tensor& logit_scale,
                                                         const Tensor& lse_row, const Tensor& lse_col,
                                                         bool symmetric, std::optional<bool> tensor_cores_requested,
                                                         std::array<bool, 3> output_mask) {
  check_infonce_cuda(query, key, logit_scale, symmetric);
  const int64_t rows = query.size(0), keys = key.size(0);
  TORCH_CHECK(lse_row.dim() == 1 && lse_row.size(0) == rows,
              "pyssl.infonce_backward: lse_row must have shape (", rows, "), got ", lse_row.sizes());
  TORCH_CHECK(!symmetric || (lse_col.dim() == 1 && lse_col.size(0) == keys),
              "pyssl.infonce_backward: lse_col must have shape (", keys, "), got ", lse_col.sizes());
  device::Guard guard(query.device());
  cudaStream_t stream = device::current_stream();
  const at::ScalarType acc = accumulate_type(query);
  const at::Device device = query.device();
  const TensorCores tensor_cores = tensor_core_kernels(query, key, tensor_cores_requested);
  Tensor scale = device_scalar(logit_scale, "pyssl.infonce_backward", "logit_scale", device, acc);
  Normalized nq = normalize_rows(query, acc, tensor_cores, scale, stream);
  Normalized nk = normalize_rows(key, acc, tensor_cores, scale, stream);
  Tensor grad = device_scalar(grad_loss, "pyssl.infonce_backward", "grad_loss", device, acc);
  Tensor lse_r = lse_row.to(device, acc).contiguous();
  Tensor lse_c = symmetric ? lse_col.to(device, acc).contiguous() : Tensor();
  const Tensor* lse_c_ptr = symmetric ? &lse_c : nullptr;

  // Row side: dU_i = sum_j G_ij v_j, G = P_row (+ P_col for CLIP) - n_pos [j = i]. Column
  // side: the same sweep with query and key swapped, dV_j = sum_i G_ij u_i; no atomics. A
  // gradient left out of output_mask skips its sweep; sum_ij G_ij S_ij (for the scale) comes
  // from whichever sweep runs, the row side when both do.
  const bool want_query = output_mask[0], want_key = output_mask[1], want_scale = output_mask[2];
  const double positives_per_row = symmetric ? 2.0 : 1.0;
  const bool row_sweep = want_query || (want_scale && !want_key);
  std::optional<GradSums> row_sums, col_sums;
  if (row_sweep) {
    row_sums = grad_sweep(nq, nk, scale, &lse_r, lse_c_ptr, false, /*pairs=*/0, positives_per_row,
                          /*want_prob_cos=*/want_scale, stream);
  }
  if (want_key) {
    col_sums = grad_sweep(nk, nq, scale, lse_c_ptr, &lse_r, false, /*pairs=*/0, positives_per_row,
                          /*want_prob_cos=*/want_scale && !row_sweep, stream);
  }

  const double mean_factor = 1.0 / (positives_per_row * static_cast<double>(rows));
  Tensor grad_query = want_query ? grad_finalize(*row_sums, nq, grad, scale, mean_factor, stream) : Tensor();
  Tensor grad_key = want_key ? grad_finalize(*col_sums, nk, grad, scale, mean_factor, stream) : Tensor();
  if (!want_scale) return {grad_query, grad_key, Tensor()};

  const GradSums& scale_sums = row_sweep ? *row_sums : *col_sums;
  Tensor grad_scale = at::empty({}, nq.unit.options());
  AT_DISPATCH_FLOATING_TYPES(nq.unit.scalar_type(), "pyssl_scale_grad_cuda", [&] {
    device::launch<scale_grad_kernel<scalar_t>>(1, kThreads, 0, stream,
        scale_sums.prob_cos.const_data_ptr<scalar_t>(), scale_sums.prob_cos.numel(), scale_sums.prob_cos_holds_logits,
        grad.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
        static_cast<scalar_t>(mean_factor), grad_scale.mutable_data_ptr<scalar_t>());
  });
  grad_scale = grad_scale.to(logit_scale.device(), logit_scale.scalar_type()).reshape(logit_scale.sizes());
  return {grad_query, grad_key, grad_scale};
}

}  // namespace

PYSSL_DEVICE_LIBRARY_IMPL(m) {
  m.impl("ntxent_forward", &ntxent_forward_cuda);
  m.impl("ntxent_backward", &ntxent_backward_cuda);
  m.impl("infonce_forward", &infonce_forward_cuda);
  m.impl("infonce_backward", &infonce_backward_cuda);
}

}  // namespace pyssl::infonce
