// CUDA kernels of the fused augmentation pipeline. Same semantics, parameter layout and output
// as csrc/augment/cpu/augment_cpu.cpp; the per-pixel math is shared (augment_math.h).
//
// Launch plan, N output images of out_h x out_w, grid.x = image (so N is unbounded) and a
// grid-stride loop over pixels / tiles in grid.y:
//   contrast_mean   for the images with contrast jitter: recomputes each pixel up to the
//                   contrast step and sums its luma (double) per block; 256 threads per block
//   contrast_total  one thread per image: its blocks' sums in a fixed order (deterministic)
//   pass1           one thread per output pixel: crop + flip + jitter + gray, written once to a
//                   float32 (N, C, out_h, out_w) buffer
//   pass2           32 x 16 output tiles (256 threads): separable Gaussian blur in shared memory
//                   (halo of the image's radius, reflect padding) + solarize + normalise, cast
//                   and written to the output layout; images without blur skip the blur.
//
// No value checks here (they would need a device sync): source_index, crop boxes and jitter
// order are clamped into range so that bad values never read out of bounds, and blur radii
// are clamped to blur_kernel_bound / 2. The Python pipeline only draws valid parameters.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "device.h"
#include "device_smem.h"

#include <algorithm>
#include <optional>

#include "augment/augment_check.h"
#include "augment/augment_math.h"

namespace pyssl::augment {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kTileW = 32;
constexpr int kTileH = 16;
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename in_t>
__device__ __forceinline__ float to_unit(in_t v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_unit<uint8_t>(uint8_t v) {
  return static_cast<float>(v) * (1.f / 255.f);
}

// Per-image parameter arrays (device pointers, one row per output image).
struct Params {
  const int64_t* source_index;
  const int64_t* crop_boxes;  // (N, 4)
  const bool* flip;
  const float* jitter_factors;  // (N, 4)
  const int64_t* jitter_order;  // (N, 4)
  const bool* gray;
  const float* blur_sigma;
  const int64_t* blur_kernel_size;
  const float* solarize_threshold;
  const float* mean;  // (C,) or nullptr
  const float* std;
  const double* contrast_sum;  // (N,) luma sums at the contrast step, or nullptr
};

struct Geometry {
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  int64_t in_stride[4];
  int64_t out_stride[4];
};

struct Box {
  int64_t src, top, left, height, width;
};

// The image's crop box, clamped inside the image (the CPU kernel rejects bad boxes).
__device__ __forceinline__ Box load_box(const Params& p, const Geometry& g, int64_t n) {
  Box b;
  b.src = min(max(p.source_index[n], int64_t(0)), g.batch - 1);
  const int64_t* box = p.crop_boxes + 4 * n;
  b.top = min(max(box[0], int64_t(0)), g.in_h - 1);
  b.left = min(max(box[1], int64_t(0)), g.in_w - 1);
  b.height = min(max(box[2], int64_t(1)), g.in_h - b.top);
  b.width = min(max(box[3], int64_t(1)), g.in_w - b.left);
  return b;
}

// Crop + flip: the bilinear sample of output pixel (y, x), every channel into v. Vertical taps
// first, then horizontal, the CPU kernel's order (crop_flip), so that both give the same bits.
template <typename in_t>
__device__ __forceinline__ void sample(const in_t* __restrict__ in, const Geometry& g, const Box& b,
                                       bool flip, int64_t y, int64_t x, float v[3]) {
  const Taps tx = bilinear_taps(flip ? g.out_w - 1 - x : x, b.width, g.out_w);
  const Taps ty = bilinear_taps(y, b.height, g.out_h);
  const in_t* image = in + b.src * g.in_stride[0];
  const int64_t r0 = (b.top + ty.i0) * g.in_stride[2], r1 = (b.top + ty.i1) * g.in_stride[2];
  const int64_t c0 = (b.left + tx.i0) * g.in_stride[3], c1 = (b.left + tx.i1) * g.in_stride[3];
#pragma unroll
  for (int c = 0; c < 3; ++c) {  // constant indices keep v in registers
    if (c >= g.channels) break;
    const in_t* plane = image + c * g.in_stride[1];
    const float left = to_unit(plane[r0 + c0]) * ty.w0 + to_unit(plane[r1 + c0]) * ty.w1;
    const float right = to_unit(plane[r0 + c1]) * ty.w0 + to_unit(plane[r1 + c1]) * ty.w1;
    v[c] = left * tx.w0 + right * tx.w1;
  }
}

__device__ __forceinline__ float pixel_luma(const float v[3], int64_t channels) {
  return channels == 3 ? luma(v[0], v[1], v[2]) : v[0];
}

// The jitter ops of image n in its order, as the CPU kernel applies them (identity factors
// skipped). kUntilContrast: stop at the contrast step and return the luma there (the value the
// contrast mean averages); otherwise apply everything with the image's contrast mean.
template <bool kUntilContrast>
__device__ __forceinline__ float jitter(const Params& p, const Geometry& g, int64_t n, float v[3]) {
  const float* f = p.jitter_factors + 4 * n;
  const int64_t* order = p.jitter_order + 4 * n;
  const bool rgb = g.channels == 3;
  for (int k = 0; k < 4; ++k) {
    const int64_t op = min(max(order[k], int64_t(0)), int64_t(3));
    const float factor = f[op];
    if (op == kBrightness && factor != 1.f) {
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        if (c < g.channels) v[c] = clamp01(v[c] * factor);
      }
    } else if (op == kContrast && factor != 1.f) {
      if (kUntilContrast) return pixel_luma(v, g.channels);
      const float mean =
          static_cast<float>(p.contrast_sum[n] / static_cast<double>(g.out_h * g.out_w));
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        if (c < g.channels) v[c] = blend(v[c], mean, factor);
      }
    } else if (op == kSaturation && factor != 1.f && rgb) {
      const float l = luma(v[0], v[1], v[2]);
#pragma unroll
      for (int c = 0; c < 3; ++c) v[c] = blend(v[c], l, factor);
    } else if (op == kHue && factor != 0.f && rgb) {
      shift_hue(v[0], v[1], v[2], factor);
    }
  }
  return 0.f;
}

// Block (n, y) writes the luma sum of its pixels to partial[n * gridDim.y + y]; no atomics, so
// the image's sum (contrast_total_kernel) is the same on every run.
template <typename in_t>
__global__ void contrast_mean_kernel(const in_t* __restrict__ in, Params p, Geometry g,
                                     double* __restrict__ partial_sums) {
  const int64_t n = blockIdx.x;
  if (p.jitter_factors[4 * n + kContrast] == 1.f) return;  // uniform over the block
  const Box b = load_box(p, g, n);
  const bool flip = p.flip[n];
  const int64_t pixels = g.out_h * g.out_w;
  double acc = 0;
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < pixels;
       i += int64_t(gridDim.y) * blockDim.x) {
    float v[3];
    sample(in, g, b, flip, i / g.out_w, i % g.out_w, v);
    acc += jitter<true>(p, g, n, v);
  }
  __shared__ double partial[kThreads];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial_sums[n * gridDim.y + blockIdx.y] = partial[0];
}

// One thread per image: the sum of its blocks' partial sums, in block order.
__global__ void contrast_total_kernel(const Params p, const double* __restrict__ partial_sums,
                                      int64_t images, int64_t blocks, double* __restrict__ sums) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= images || p.jitter_factors[4 * n + kContrast] == 1.f) return;
  double total = 0;
  for (int64_t b = 0; b < blocks; ++b) total += partial_sums[n * blocks + b];
  sums[n] = total;
}

template <typename in_t>
__global__ void pass1_kernel(const in_t* __restrict__ in, Params p, Geometry g,
                             float* __restrict__ tmp) {
  const int64_t n = blockIdx.x;
  const Box b = load_box(p, g, n);
  const bool flip = p.flip[n], gray = p.gray[n] && g.channels == 3;
  const int64_t pixels = g.out_h * g.out_w;
  float* out = tmp + n * g.channels * pixels;
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < pixels;
       i += int64_t(gridDim.y) * blockDim.x) {
    float v[3];
    sample(in, g, b, flip, i / g.out_w, i % g.out_w, v);
    jitter<false>(p, g, n, v);
    if (gray) v[0] = v[1] = v[2] = luma(v[0], v[1], v[2]);
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      if (c < g.channels) out[c * pixels + i] = v[c];
    }
  }
}

// Shared memory of pass2 for a halo radius: input tile, horizontally blurred tile, weights.
int64_t pass2_shared_floats(int64_t radius) {
  const int64_t rows = kTileH + 2 * radius, cols = kTileW + 2 * radius;
  return rows * cols + rows * kTileW + kMaxKernelSize;
}

template <typename out_t>
__global__ void pass2_kernel(const float* __restrict__ tmp, Params p, Geometry g,
                             int64_t max_radius, out_t* __restrict__ out) {
  float* smem = dynamic_shared_memory<float>();
  const int64_t n = blockIdx.x;
  const int64_t oh = g.out_h, ow = g.out_w, pixels = oh * ow;
  const int64_t tiles_x = (ow + kTileW - 1) / kTileW;
  const int64_t tiles = tiles_x * ((oh + kTileH - 1) / kTileH);
  const float sigma = p.blur_sigma[n];
  const float threshold = p.solarize_threshold[n];
  const bool blurred = sigma > 0.f;
  const int64_t ksize =
      blurred ? min(max(p.blur_kernel_size[n], int64_t(1)), 2 * max_radius + 1) : 1;
  const int64_t radius = ksize / 2;
  const int64_t rows = kTileH + 2 * radius, cols = kTileW + 2 * radius;
  float* tile = smem;
  float* tile_h = tile + (kTileH + 2 * max_radius) * (kTileW + 2 * max_radius);
  float* weights = tile_h + (kTileH + 2 * max_radius) * kTileW;
  const int tid = threadIdx.x;

  if (blurred) {  // uniform over the block
    if (tid == 0) {
      double total = 0;
      for (int64_t k = 0; k < ksize; ++k) total += gaussian_tap(k, radius, sigma);
      for (int64_t k = 0; k < ksize; ++k)
        weights[k] = static_cast<float>(gaussian_tap(k, radius, sigma) / total);
    }
    __syncthreads();
  }

  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const int64_t y0 = (t / tiles_x) * kTileH, x0 = (t % tiles_x) * kTileW;
    for (int64_t c = 0; c < g.channels; ++c) {
      const float* plane = tmp + (n * g.channels + c) * pixels;
      const float m = p.mean ? p.mean[c] : 0.f;
      const float sd = p.std ? p.std[c] : 1.f;
      out_t* out_plane = out + n * g.out_stride[0] + c * g.out_stride[1];
      if (blurred) {
        for (int64_t i = tid; i < rows * cols; i += blockDim.x) {
          const int64_t y = reflect_index(y0 - radius + i / cols, oh);
          const int64_t x = reflect_index(x0 - radius + i % cols, ow);
          tile[i] = plane[y * ow + x];
        }
        __syncthreads();
        for (int64_t i = tid; i < rows * kTileW; i += blockDim.x) {
          const float* src = tile + (i / kTileW) * cols + (i % kTileW);
          float acc = 0.f;
          for (int64_t k = 0; k < ksize; ++k) acc += weights[k] * src[k];
          tile_h[i] = acc;
        }
        __syncthreads();
      }
      for (int64_t i = tid; i < kTileH * kTileW; i += blockDim.x) {
        const int64_t ty = i / kTileW, tx = i % kTileW;
        const int64_t y = y0 + ty, x = x0 + tx;
        if (y >= oh || x >= ow) continue;
        float v;
        if (blurred) {
          float acc = 0.f;
          for (int64_t k = 0; k < ksize; ++k) acc += weights[k] * tile_h[(ty + k) * kTileW + tx];
          v = acc;
        } else {
          v = plane[y * ow + x];
        }
        v = v >= threshold ? 1.f - v : v;
        out_plane[y * g.out_stride[2] + x * g.out_stride[3]] = static_cast<out_t>((v - m) / sd);
      }
      if (blurred) __syncthreads();  // the tiles are reused by the next channel / tile
    }
  }
}

Tensor augment_fused_cuda(const Tensor& images, const Tensor& source_index,
                          const Tensor& crop_boxes, const Tensor& flip,
                          const Tensor& jitter_factors, const Tensor& jitter_order,
                          const Tensor& gray, const Tensor& blur_sigma,
                          const Tensor& blur_kernel_size, const Tensor& solarize_threshold,
                          const Tensor& mean, const Tensor& std, int64_t out_h, int64_t out_w,
                          std::optional<at::ScalarType> out_dtype, bool channels_last,
                          int64_t blur_kernel_bound) {
  const int64_t n = check_fused_args(images, source_index, crop_boxes, flip, jitter_factors,
                                     jitter_order, gray, blur_sigma, blur_kernel_size,
                                     solarize_threshold, mean, std, out_h, out_w, out_dtype);
  device::Guard guard(images.device());
  cudaStream_t stream = device::current_stream();
  const int64_t channels = images.size(1);

  int64_t bound = blur_kernel_bound;
  if (bound < 0) bound = blur_kernel_size.max().item<int64_t>();  // a device sync
  bound = std::clamp<int64_t>(bound, 1, kMaxKernelSize);
  const int64_t max_radius = bound / 2;

  Tensor src = source_index.contiguous(), boxes = crop_boxes.contiguous(),
         fl = flip.contiguous(), fac = jitter_factors.contiguous(),
         ord = jitter_order.contiguous(), gr = gray.contiguous(), sig = blur_sigma.contiguous(),
         ks = blur_kernel_size.contiguous(), thr = solarize_threshold.contiguous(),
         mean_c = mean.contiguous(), std_c = std.contiguous();
  Params p{src.const_data_ptr<int64_t>(),
           boxes.const_data_ptr<int64_t>(),
           fl.const_data_ptr<bool>(),
           fac.const_data_ptr<float>(),
           ord.const_data_ptr<int64_t>(),
           gr.const_data_ptr<bool>(),
           sig.const_data_ptr<float>(),
           ks.const_data_ptr<int64_t>(),
           thr.const_data_ptr<float>(),
           mean.numel() ? mean_c.const_data_ptr<float>() : nullptr,
           std.numel() ? std_c.const_data_ptr<float>() : nullptr,
           nullptr};

  Tensor out = at::empty({n, channels, out_h, out_w},
                         images.options()
                             .dtype(out_dtype.value_or(at::kFloat))
                             .memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous));
  Geometry g{images.size(0), channels, images.size(2), images.size(3), out_h, out_w, {}, {}};
  for (int d = 0; d < 4; ++d) {
    g.in_stride[d] = images.stride(d);
    g.out_stride[d] = out.stride(d);
  }
  Tensor tmp = at::empty({n, channels, out_h, out_w}, images.options().dtype(at::kFloat));
  const int64_t pixels = out_h * out_w;
  const dim3 grid1(static_cast<unsigned>(n),
                   static_cast<unsigned>(std::min(ceil_div(pixels, kThreads), kMaxGridY)));
  // Read only for images with contrast jitter, each written first by contrast_total_kernel.
  Tensor sums = at::empty({n}, images.options().dtype(at::kDouble));
  Tensor partial_sums = at::empty({n * static_cast<int64_t>(grid1.y)}, sums.options());
  p.contrast_sum = sums.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND3(
      at::kByte, at::kHalf, at::kBFloat16, images.scalar_type(), "pyssl_augment_pass1_cuda", [&] {
        const scalar_t* in = images.const_data_ptr<scalar_t>();
        device::launch<contrast_mean_kernel<scalar_t>>(grid1, kThreads, 0, stream,
            in, p, g, partial_sums.mutable_data_ptr<double>());
        device::launch<contrast_total_kernel>(static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream,
            p, partial_sums.const_data_ptr<double>(), n, static_cast<int64_t>(grid1.y),
            sums.mutable_data_ptr<double>());
        device::launch<pass1_kernel<scalar_t>>(grid1, kThreads, 0, stream, in, p, g,
                                               tmp.mutable_data_ptr<float>());
      });

  const int64_t tiles = ceil_div(out_h, kTileH) * ceil_div(out_w, kTileW);
  const dim3 grid2(static_cast<unsigned>(n), static_cast<unsigned>(std::min(tiles, kMaxGridY)));
  const size_t smem = pass2_shared_floats(max_radius) * sizeof(float);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "pyssl_augment_pass2_cuda", [&] {
        if (smem > 48 * 1024) {
          device::set_max_dynamic_shared_memory<pass2_kernel<scalar_t>>(static_cast<int>(smem));
        }
        device::launch<pass2_kernel<scalar_t>>(grid2, kThreads, smem, stream,
            tmp.const_data_ptr<float>(), p, g, max_radius, out.mutable_data_ptr<scalar_t>());
      });
  return out;
}

__global__ void draw_crops_kernel(const float* __restrict__ u, int64_t n, int64_t attempts,
                                  int64_t height, int64_t width, double scale_min,
                                  double scale_max, double ratio_min, double ratio_max,
                                  int64_t* __restrict__ boxes) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  draw_crop(u + i * 4 * attempts, attempts, 1, height, width, scale_min, scale_max, ratio_min,
            ratio_max, boxes + 4 * i);
}

Tensor augment_draw_crops_cuda(const Tensor& uniforms, int64_t height, int64_t width,
                               double scale_min, double scale_max, double ratio_min,
                               double ratio_max) {
  const int64_t attempts = check_draw_crops_args(uniforms, height, width, scale_min, scale_max,
                                                 ratio_min, ratio_max);
  device::Guard guard(uniforms.device());
  cudaStream_t stream = device::current_stream();
  const int64_t n = uniforms.size(0);
  Tensor u = uniforms.contiguous();
  Tensor boxes = at::empty({n, 4}, uniforms.options().dtype(at::kLong));
  if (n == 0) return boxes;
  device::launch<draw_crops_kernel>(static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream,
      u.const_data_ptr<float>(), n, attempts, height, width, scale_min, scale_max, ratio_min,
      ratio_max, boxes.mutable_data_ptr<int64_t>());
  return boxes;
}

}  // namespace

PYSSL_DEVICE_LIBRARY_IMPL(m) {
  m.impl("augment_fused", &augment_fused_cuda);
  m.impl("augment_draw_crops", &augment_draw_crops_cuda);
}

}  // namespace pyssl::augment
