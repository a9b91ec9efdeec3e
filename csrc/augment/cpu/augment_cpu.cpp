// CPU kernel of the fused augmentation pipeline (see pyssl/augment/pipeline.py for the
// parameter layout). Each image is processed by one thread in a private float32 scratch that
// stays in cache: crop + flip (bilinear) -> jitter ops in the image's order -> grayscale, then
// one separable-blur + solarize + normalise sweep that writes the output once. The inner
// loops run over contiguous rows so the compiler can vectorise them.
#if defined(__GNUC__) && !defined(__clang__)
// Floating-point compares may raise exceptions under GCC's default -ftrapping-math, which
// stops it from if-converting (and so vectorising) the select-only per-pixel math; nothing
// here reads the exception flags, and values are unchanged (this is not fast-math).
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <vector>

#include "augment/augment_check.h"
#include "augment/augment_math.h"

namespace pyssl::augment {
namespace {

using at::Tensor;

template <typename in_t>
inline float to_unit(in_t v) {
  if constexpr (std::is_same_v<in_t, uint8_t>) {
    return static_cast<float>(v) * (1.f / 255.f);
  } else {
    return static_cast<float>(v);
  }
}

struct ImageParams {
  int64_t src, top, left, height, width;
  bool flip, gray;
  float factors[4];
  int64_t order[4];
  float sigma;
  int64_t ksize;
  float threshold;
};

struct Geometry {
  int64_t channels, in_h, in_w, out_h, out_w;
  int64_t in_stride[4];   // B, C, H, W of the input
  int64_t out_stride[4];  // B, C, H, W of the output
};

// Per-thread scratch, reused across the images of a chunk.
// Per-thread scratch rows (the image planes themselves are shared, see ImageBuffers).
struct Scratch {
  std::vector<float> row, acc;
  std::vector<int32_t> x0, x1;
  std::vector<float> wx0, wx1;
};

// One image's float32 planes: the pass-1 result and its horizontally blurred copy.
struct ImageBuffers {
  std::vector<float> planes;  // C x out_h x out_w
  std::vector<float> blur_h;  // C x out_h x out_w
};

// The hot loops are compiled twice, for AVX2 and for the baseline, and picked at load time
// (GCC/Clang function multiversioning); the wheel itself keeps the baseline x86-64 flags.
// No FMA in the AVX2 clone, so both clones round identically.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define PYSSL_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PYSSL_CPU_CLONES
#endif

// Crop + flip of output rows [y_begin, y_end): each row blends its two source rows over the
// crop's columns (contiguous, vectorised), then gathers every output pixel's two horizontal
// taps from that blend.
template <typename in_t>
PYSSL_CPU_CLONES void crop_flip(const in_t* in, const Geometry& g, const ImageParams& p,
                                float* planes, int64_t y_begin, int64_t y_end, Scratch& s) {
  const int64_t ow = g.out_w, oh = g.out_h, plane = oh * ow, cw = p.width;
  s.x0.resize(ow);
  s.x1.resize(ow);
  s.wx0.resize(ow);
  s.wx1.resize(ow);
  s.row.resize(cw);
  for (int64_t x = 0; x < ow; ++x) {
    const Taps t = bilinear_taps(p.flip ? ow - 1 - x : x, cw, ow);
    s.x0[x] = static_cast<int32_t>(t.i0);
    s.x1[x] = static_cast<int32_t>(t.i1);
    s.wx0[x] = t.w0;
    s.wx1[x] = t.w1;
  }
  const int64_t sw = g.in_stride[3];
  const in_t* image = in + p.src * g.in_stride[0] + p.left * sw;
  float* blended = s.row.data();
  const int32_t* x0 = s.x0.data();
  const int32_t* x1 = s.x1.data();
  const float* wx0 = s.wx0.data();
  const float* wx1 = s.wx1.data();
  for (int64_t y = y_begin; y < y_end; ++y) {
    const Taps ty = bilinear_taps(y, p.height, oh);
    for (int64_t c = 0; c < g.channels; ++c) {
      const in_t* r0 = image + c * g.in_stride[1] + (p.top + ty.i0) * g.in_stride[2];
      const in_t* r1 = image + c * g.in_stride[1] + (p.top + ty.i1) * g.in_stride[2];
      if (sw == 1) {
        for (int64_t j = 0; j < cw; ++j) blended[j] = to_unit(r0[j]) * ty.w0 + to_unit(r1[j]) * ty.w1;
      } else {
        for (int64_t j = 0; j < cw; ++j)
          blended[j] = to_unit(r0[j * sw]) * ty.w0 + to_unit(r1[j * sw]) * ty.w1;
      }
      float* dst = planes + c * plane + y * ow;
      for (int64_t x = 0; x < ow; ++x) dst[x] = blended[x0[x]] * wx0[x] + blended[x1[x]] * wx1[x];
    }
  }
}

// Sum of the luma (C = 3) or value (C = 1) of pixels [begin, end): the contrast mean's input.
PYSSL_CPU_CLONES double luma_sum(const float* planes, int64_t n, int64_t channels, int64_t begin,
                                 int64_t end) {
  const float *r = planes, *g = planes + (channels == 3 ? n : 0), *b = planes + (channels == 3 ? 2 * n : 0);
  double sum = 0;
  if (channels == 3) {
    for (int64_t i = begin; i < end; ++i) sum += luma(r[i], g[i], b[i]);
  } else {
    for (int64_t i = begin; i < end; ++i) sum += r[i];
  }
  return sum;
}

// Jitter op `op` with `factor` on pixels [begin, end); `mean` is the contrast mean.
PYSSL_CPU_CLONES void jitter_op(float* planes, int64_t n, int64_t channels, int64_t op,
                                float factor, float mean, int64_t begin, int64_t end) {
  float *r = planes, *g = planes + n, *b = planes + 2 * n;
  if (op == kBrightness || op == kContrast) {
    for (int64_t c = 0; c < channels; ++c) {
      float* v = planes + c * n;
      if (op == kBrightness) {
        for (int64_t i = begin; i < end; ++i) v[i] = clamp01(v[i] * factor);
      } else {
        for (int64_t i = begin; i < end; ++i) v[i] = blend(v[i], mean, factor);
      }
    }
  } else if (op == kSaturation) {
    for (int64_t i = begin; i < end; ++i) {
      const float l = luma(r[i], g[i], b[i]);
      r[i] = blend(r[i], l, factor);
      g[i] = blend(g[i], l, factor);
      b[i] = blend(b[i], l, factor);
    }
  } else if (op == kHue) {
    for (int64_t i = begin; i < end; ++i) shift_hue(r[i], g[i], b[i], factor);
  }
}

PYSSL_CPU_CLONES void to_gray(float* planes, int64_t n, int64_t begin, int64_t end) {
  float *r = planes, *g = planes + n, *b = planes + 2 * n;
  for (int64_t i = begin; i < end; ++i) {
    const float l = luma(r[i], g[i], b[i]);
    r[i] = l;
    g[i] = l;
    b[i] = l;
  }
}

// Normalised Gaussian taps (float), computed in double as torchvision's softmax does.
void blur_weights(const ImageParams& p, float* weights) {
  const int64_t radius = p.ksize / 2;
  double total = 0;
  for (int64_t k = 0; k < p.ksize; ++k) total += gaussian_tap(k, radius, p.sigma);
  for (int64_t k = 0; k < p.ksize; ++k)
    weights[k] = static_cast<float>(gaussian_tap(k, radius, p.sigma) / total);
}

// Horizontal blur of rows [y_begin, y_end) of every plane into blur_h (reflect padding).
PYSSL_CPU_CLONES void blur_rows(const Geometry& g, const ImageParams& p, const float* weights,
                                const float* planes, float* blur_h, int64_t y_begin,
                                int64_t y_end, Scratch& s) {
  const int64_t oh = g.out_h, ow = g.out_w, plane = oh * ow, radius = p.ksize / 2;
  s.row.resize(ow + 2 * radius);
  float* padded = s.row.data();
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t y = y_begin; y < y_end; ++y) {
      const float* src = planes + c * plane + y * ow;
      // Reflect only the borders: the index fold costs integer divisions.
      for (int64_t i = 0; i < radius; ++i) {
        padded[i] = src[reflect_index(i - radius, ow)];
        padded[ow + radius + i] = src[reflect_index(ow + i, ow)];
      }
      std::copy(src, src + ow, padded + radius);
      float* dst = blur_h + c * plane + y * ow;
      std::fill(dst, dst + ow, 0.f);
      for (int64_t k = 0; k < p.ksize; ++k) {
        const float w = weights[k];
        const float* in = padded + k;
        for (int64_t x = 0; x < ow; ++x) dst[x] += w * in[x];
      }
    }
  }
}

// Pass 2 for output rows [y_begin, y_end): vertical blur of blur_h (when the image is blurred,
// else the pass-1 planes as they are), solarize, normalise, cast and store.
template <typename out_t>
PYSSL_CPU_CLONES void finish_rows(out_t* out, const Geometry& g, const ImageParams& p,
                                  const float* weights, const float* planes, const float* blur_h,
                                  const float* mean, const float* stdev, int64_t index,
                                  int64_t y_begin, int64_t y_end, Scratch& s) {
  const int64_t oh = g.out_h, ow = g.out_w, plane = oh * ow;
  const float thr = p.threshold;
  const bool blurred = p.sigma > 0;
  const int64_t radius = p.ksize / 2;
  s.acc.resize(ow);
  float* acc = s.acc.data();
  for (int64_t c = 0; c < g.channels; ++c) {
    const float m = mean ? mean[c] : 0.f;
    const float sd = stdev ? stdev[c] : 1.f;
    out_t* dst_plane = out + index * g.out_stride[0] + c * g.out_stride[1];
    for (int64_t y = y_begin; y < y_end; ++y) {
      const float* src = planes + c * plane + y * ow;
      if (blurred) {
        std::fill(acc, acc + ow, 0.f);
        for (int64_t k = 0; k < p.ksize; ++k) {
          const float w = weights[k];
          const float* in = blur_h + c * plane + reflect_index(y - radius + k, oh) * ow;
          for (int64_t x = 0; x < ow; ++x) acc[x] += w * in[x];
        }
        src = acc;
      }
      out_t* dst = dst_plane + y * g.out_stride[2];
      const int64_t sx = g.out_stride[3];
      if (sx == 1) {  // NCHW: a contiguous row the compiler vectorises
        for (int64_t x = 0; x < ow; ++x) {
          float v = src[x];
          v = v >= thr ? 1.f - v : v;
          dst[x] = static_cast<out_t>((v - m) / sd);
        }
      } else {
        for (int64_t x = 0; x < ow; ++x) {
          float v = src[x];
          v = v >= thr ? 1.f - v : v;
          dst[x * sx] = static_cast<out_t>((v - m) / sd);
        }
      }
    }
  }
}

// Runs fn(begin, end, scratch) over [0, size): split across threads when `parallel` (one image
// at a time, rows in parallel), else inline (images in parallel, this image on one thread).
template <typename F>
void over_range(bool parallel, int64_t size, Scratch& own, const F& fn) {
  if (!parallel) {
    fn(int64_t(0), size, own);
    return;
  }
  at::parallel_for(0, size, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    fn(begin, end, s);
  });
}

// The whole pipeline for output image `index`.
template <typename in_t, typename out_t>
void process_image(const in_t* in, out_t* out, const Geometry& g, const ImageParams& p,
                   const float* mean, const float* stdev, int64_t index, bool parallel,
                   ImageBuffers& buf, Scratch& own) {
  const int64_t oh = g.out_h, n = oh * g.out_w, channels = g.channels;
  buf.planes.resize(channels * n);
  float* planes = buf.planes.data();
  // Pixel ranges of whole rows, so the parallel split stays row-aligned.
  const int64_t row = g.out_w;
  over_range(parallel, oh, own, [&](int64_t y0, int64_t y1, Scratch& s) {
    crop_flip(in, g, p, planes, y0, y1, s);
  });
  const bool rgb = channels == 3;
  for (int k = 0; k < 4; ++k) {
    const int64_t op = p.order[k];
    const float f = p.factors[op];
    const bool identity = op == kHue ? f == 0.f : f == 1.f;
    if (identity || (!rgb && (op == kSaturation || op == kHue))) continue;
    float mean_value = 0.f;
    if (op == kContrast) {
      double sum = 0;
      if (parallel) {
        sum = at::parallel_reduce(
            0, oh, 1, 0.0,
            [&](int64_t y0, int64_t y1, double acc) {
              return acc + luma_sum(planes, n, channels, y0 * row, y1 * row);
            },
            std::plus<double>());
      } else {
        sum = luma_sum(planes, n, channels, 0, n);
      }
      mean_value = static_cast<float>(sum / static_cast<double>(n));
    }
    over_range(parallel, oh, own, [&](int64_t y0, int64_t y1, Scratch&) {
      jitter_op(planes, n, channels, op, f, mean_value, y0 * row, y1 * row);
    });
  }
  if (p.gray && rgb) {
    over_range(parallel, oh, own, [&](int64_t y0, int64_t y1, Scratch&) {
      to_gray(planes, n, y0 * row, y1 * row);
    });
  }
  float weights[kMaxKernelSize];
  if (p.sigma > 0) {
    blur_weights(p, weights);
    buf.blur_h.resize(channels * n);
    over_range(parallel, oh, own, [&](int64_t y0, int64_t y1, Scratch& s) {
      blur_rows(g, p, weights, planes, buf.blur_h.data(), y0, y1, s);
    });
  }
  over_range(parallel, oh, own, [&](int64_t y0, int64_t y1, Scratch& s) {
    finish_rows(out, g, p, weights, planes, buf.blur_h.data(), mean, stdev, index, y0, y1, s);
  });
}

std::vector<ImageParams> gather_params(const Tensor& images, const Tensor& source_index,
                                       const Tensor& crop_boxes, const Tensor& flip,
                                       const Tensor& jitter_factors, const Tensor& jitter_order,
                                       const Tensor& gray, const Tensor& blur_sigma,
                                       const Tensor& blur_kernel_size,
                                       const Tensor& solarize_threshold) {
  constexpr const char* op = "pyssl.augment_fused";
  const int64_t n = source_index.size(0), batch = images.size(0);
  const int64_t in_h = images.size(2), in_w = images.size(3);
  auto src = source_index.contiguous(), boxes = crop_boxes.contiguous(), fl = flip.contiguous(),
       fac = jitter_factors.contiguous(), ord = jitter_order.contiguous(), gr = gray.contiguous(),
       sig = blur_sigma.contiguous(), ks = blur_kernel_size.contiguous(),
       thr = solarize_threshold.contiguous();
  std::vector<ImageParams> params(n);
  for (int64_t i = 0; i < n; ++i) {
    ImageParams& p = params[i];
    p.src = src.const_data_ptr<int64_t>()[i];
    TORCH_CHECK(p.src >= 0 && p.src < batch, op, ": source_index[", i, "] = ", p.src,
                " is not an image of the batch of ", batch);
    const int64_t* box = boxes.const_data_ptr<int64_t>() + 4 * i;
    p.top = box[0];
    p.left = box[1];
    p.height = box[2];
    p.width = box[3];
    TORCH_CHECK(p.height > 0 && p.width > 0 && p.top >= 0 && p.left >= 0 &&
                    p.top + p.height <= in_h && p.left + p.width <= in_w,
                op, ": crop_boxes[", i, "] = (top ", p.top, ", left ", p.left, ", height ",
                p.height, ", width ", p.width, ") is not inside the ", in_h, "x", in_w, " image");
    p.flip = fl.const_data_ptr<bool>()[i];
    p.gray = gr.const_data_ptr<bool>()[i];
    bool seen[4] = {false, false, false, false};
    for (int k = 0; k < 4; ++k) {
      p.factors[k] = fac.const_data_ptr<float>()[4 * i + k];
      p.order[k] = ord.const_data_ptr<int64_t>()[4 * i + k];
      TORCH_CHECK(p.order[k] >= 0 && p.order[k] < 4 && !seen[p.order[k]], op,
                  ": jitter_order[", i, "] must be a permutation of 0..3");
      seen[p.order[k]] = true;
    }
    TORCH_CHECK(p.factors[0] >= 0 && p.factors[1] >= 0 && p.factors[2] >= 0, op,
                ": jitter_factors[", i, "] brightness/contrast/saturation must be >= 0");
    TORCH_CHECK(p.factors[3] >= -0.5f && p.factors[3] <= 0.5f, op, ": jitter_factors[", i,
                "] hue must be in [-0.5, 0.5], got ", p.factors[3]);
    p.sigma = sig.const_data_ptr<float>()[i];
    p.ksize = ks.const_data_ptr<int64_t>()[i];
    TORCH_CHECK(p.sigma >= 0 && std::isfinite(p.sigma), op, ": blur_sigma[", i,
                "] must be finite and >= 0 (0: no blur), got ", p.sigma);
    TORCH_CHECK(p.sigma == 0 || (p.ksize > 0 && p.ksize % 2 == 1 && p.ksize <= kMaxKernelSize),
                op, ": blur_kernel_size[", i, "] must be odd and in [1, ", kMaxKernelSize,
                "], got ", p.ksize);
    p.threshold = thr.const_data_ptr<float>()[i];
    TORCH_CHECK(!std::isnan(p.threshold), op, ": solarize_threshold[", i, "] is NaN");
  }
  return params;
}

Tensor augment_fused_cpu(const Tensor& images, const Tensor& source_index,
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
  const auto params = gather_params(images, source_index, crop_boxes, flip, jitter_factors,
                                    jitter_order, gray, blur_sigma, blur_kernel_size,
                                    solarize_threshold);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(blur_kernel_bound < 0 || params[i].sigma == 0 ||
                    params[i].ksize <= blur_kernel_bound,
                "pyssl.augment_fused: blur_kernel_size[", i, "] = ", params[i].ksize,
                " exceeds blur_kernel_bound = ", blur_kernel_bound);
  }
  const int64_t channels = images.size(1);
  Tensor out = at::empty({n, channels, out_h, out_w},
                         images.options()
                             .dtype(out_dtype.value_or(at::kFloat))
                             .memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous));
  Geometry g{channels, images.size(2), images.size(3), out_h, out_w, {}, {}};
  for (int d = 0; d < 4; ++d) {
    g.in_stride[d] = images.stride(d);
    g.out_stride[d] = out.stride(d);
  }
  Tensor mean_c = mean.contiguous(), std_c = std.contiguous();
  const float* mean_p = mean.numel() ? mean_c.const_data_ptr<float>() : nullptr;
  const float* std_p = std.numel() ? std_c.const_data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND3(
      at::kByte, at::kHalf, at::kBFloat16, images.scalar_type(), "pyssl_augment_fused", [&] {
        using in_t = scalar_t;
        const in_t* in = images.const_data_ptr<in_t>();
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, out.scalar_type(), "pyssl_augment_fused_out", [&] {
              using out_t = scalar_t;
              out_t* o = out.mutable_data_ptr<out_t>();
              // Enough images for every thread: one image per thread at a time, all in
              // cache. Fewer (a batch of 1 or 2): images one after the other, rows split.
              if (n >= at::get_num_threads()) {
                at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
                  ImageBuffers buf;
                  Scratch s;
                  for (int64_t i = begin; i < end; ++i)
                    process_image(in, o, g, params[i], mean_p, std_p, i, false, buf, s);
                });
              } else {
                ImageBuffers buf;
                Scratch s;
                for (int64_t i = 0; i < n; ++i)
                  process_image(in, o, g, params[i], mean_p, std_p, i, true, buf, s);
              }
            });
      });
  return out;
}

Tensor augment_draw_crops_cpu(const Tensor& uniforms, int64_t height, int64_t width,
                              double scale_min, double scale_max, double ratio_min,
                              double ratio_max) {
  const int64_t attempts = check_draw_crops_args(uniforms, height, width, scale_min, scale_max,
                                                 ratio_min, ratio_max);
  const int64_t n = uniforms.size(0);
  Tensor u = uniforms.contiguous();
  Tensor boxes = at::empty({n, 4}, uniforms.options().dtype(at::kLong));
  const float* up = u.const_data_ptr<float>();
  int64_t* bp = boxes.mutable_data_ptr<int64_t>();
  // A few microseconds per image: serial (a parallel region costs more than the work).
  for (int64_t i = 0; i < n; ++i) {
    draw_crop(up + i * 4 * attempts, attempts, 1, height, width, scale_min, scale_max, ratio_min,
              ratio_max, bp + 4 * i);
  }
  return boxes;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssl, CPU, m) {
  m.impl("augment_fused", &augment_fused_cpu);
  m.impl("augment_draw_crops", &augment_draw_crops_cpu);
}

}  // namespace pyssl::augment
