#pragma once
// Per-pixel math of the fused augmentation pipeline, shared by the CPU kernel and the CUDA
// kernels so both compute the same float32 values. Each helper follows the matching
// torchvision.transforms.v2.functional op on float images in [0, 1] (see pyssl/augment).
#include <cmath>
#include <cstdint>

#include "common.h"

namespace pyssl::augment {

// Jitter op codes, the values of jitter_order (and the columns of jitter_factors).
enum JitterOp : int64_t { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };

// ITU-R 601 luma weights of torchvision's rgb_to_grayscale.
PYSSL_HOST_DEVICE float luma(float r, float g, float b) {
  return r * 0.2989f + g * 0.587f + b * 0.114f;
}

PYSSL_HOST_DEVICE float clamp01(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }

// torchvision's _blend: ratio * a + (1 - ratio) * b, clamped to [0, 1].
PYSSL_HOST_DEVICE float blend(float a, float b, float ratio) {
  return clamp01(a * ratio + b * (1.f - ratio));
}

// Bilinear source taps along one axis of a crop (align_corners=False, no antialias), as
// PyTorch's upsample_bilinear2d computes them for an input of `in_size` resized to `out_size`:
// src = (dst + 0.5) * in / out - 0.5, clamped at 0; i1 = i0 + 1 except at the last pixel.
struct Taps {
  int64_t i0, i1;
  float w0, w1;
};

PYSSL_HOST_DEVICE Taps bilinear_taps(int64_t dst, int64_t in_size, int64_t out_size) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = (static_cast<float>(dst) + 0.5f) * scale - 0.5f;
  if (src < 0.f) src = 0.f;
  int64_t i0 = static_cast<int64_t>(src);  // floor: src >= 0
  if (i0 > in_size - 1) i0 = in_size - 1;
  float w1 = src - static_cast<float>(i0);
  w1 = w1 < 0.f ? 0.f : (w1 > 1.f ? 1.f : w1);
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  return {i0, i1, 1.f - w1, w1};
}

PYSSL_HOST_DEVICE float max3(float a, float b, float c) {
  const float m = a > b ? a : b;
  return m > c ? m : c;
}
PYSSL_HOST_DEVICE float min3(float a, float b, float c) {
  const float m = a < b ? a : b;
  return m < c ? m : c;
}

// torchvision's adjust_hue on one float RGB pixel: RGB -> HSV (Pillow's formulas), hue
// shifted by `shift` modulo 1, HSV -> RGB with p, q, t clamped to [0, 1]. Written with selects
// only (no branches, no libm calls) so the CPU loop over pixels vectorises.
PYSSL_HOST_DEVICE void shift_hue(float& r, float& g, float& b, float shift) {
  const float maxc = max3(r, g, b);
  const float minc = min3(r, g, b);
  const bool eqc = maxc == minc;
  const float range = maxc - minc;
  const float s = range / (eqc ? 1.f : maxc);
  const float div = eqc ? 1.f : range;
  const float rc = (maxc - r) / div, gc = (maxc - g) / div, bc = (maxc - b) / div;
  // Every arm is computed before it is selected: GCC will not if-convert (vectorise) a select
  // whose arm holds floating-point arithmetic, since that arithmetic could trap.
  const float h_r = bc - gc, h_g = 2.f + rc - bc, h_b = 4.f + gc - rc;
  float h = maxc == g ? h_g : h_b;
  h = maxc == r ? h_r : h;
  // fmod(h / 6 + 1, 1) for h / 6 + 1 in [5/6, 2): one exact subtraction.
  h = h * (1.f / 6.f) + 1.f;
  const float h_wrapped = h - 1.f;
  h = h >= 1.f ? h_wrapped : h;
  // torch.remainder(h + shift, 1) for h + shift in (-0.5, 1.5).
  h = h + shift;
  const float h_up = h + 1.f, h_down = h - 1.f;
  h = h >= 1.f ? h_down : h;
  h = h < 0.f ? h_up : h;
  const float v = maxc;
  const float h6 = h * 6.f;
  int i = static_cast<int>(h6);  // floor: h6 >= 0
  const float f = h6 - static_cast<float>(i);
  i = i >= 6 ? i - 6 : i;
  const float sf = s * f;
  const float q = clamp01((1.f - sf) * v);
  const float t = clamp01((sf + (1.f - s)) * v);
  const float p = clamp01((1.f - s) * v);
  // Sector i picks (r, g, b) from (v, p, q, t): r = v q p p t v, g = t v v q p p, b = p p t v v q.
  // Non-short-circuit | keeps the selects free of control flow (if-converted, vectorised).
  const bool i0 = i == 0, i1 = i == 1, i2 = i == 2, i3 = i == 3, i4 = i == 4, i5 = i == 5;
  // One two-way select per step: GCC's if-conversion gives up on many-way merges.
  float rr = i1 ? q : p;
  rr = i4 ? t : rr;
  rr = (i0 | i5) ? v : rr;
  float gg = i3 ? q : p;
  gg = (i1 | i2) ? v : gg;
  gg = i0 ? t : gg;
  float bb = i5 ? q : p;
  bb = (i3 | i4) ? v : bb;
  bb = i2 ? t : bb;
  r = rr;
  g = gg;
  b = bb;
}

// Index of tap i (which may lie outside [0, n)) under reflect padding (torch.nn.functional.pad
// mode="reflect", the edge pixel not repeated); folds repeatedly, so pads wider than the image
// stay in range where torch would refuse them.
PYSSL_HOST_DEVICE int64_t reflect_index(int64_t i, int64_t n) {
  if (n <= 1) return 0;
  const int64_t period = 2 * (n - 1);
  i = i < 0 ? -i : i;
  i %= period;
  return i >= n ? period - i : i;
}

// Unnormalised Gaussian tap weight k of a kernel of radius `radius`: torchvision's
// softmax(-(x / sigma)^2) with x = (k - radius) / sqrt(2).
PYSSL_HOST_DEVICE double gaussian_tap(int64_t k, int64_t radius, double sigma) {
  const double x = static_cast<double>(k - radius) / sigma;
  return exp(-0.5 * x * x);
}

// One image's RandomResizedCrop box (top, left, height, width) from its uniforms: u points at
// 4 * attempts values laid out [area | log ratio | top | left] with column stride `stride`.
// Doubles and round-half-even (rint) as torchvision's Python code computes.
PYSSL_HOST_DEVICE void draw_crop(const float* u, int64_t attempts, int64_t stride, int64_t height,
                                 int64_t width, double scale_min, double scale_max,
                                 double ratio_min, double ratio_max, int64_t* box) {
  const double area = static_cast<double>(height) * static_cast<double>(width);
  const double log_lo = log(ratio_min), log_hi = log(ratio_max);
  for (int64_t a = 0; a < attempts; ++a) {
    const double target = area * (scale_min + (scale_max - scale_min) * u[a * stride]);
    const double aspect = exp(log_lo + (log_hi - log_lo) * u[(attempts + a) * stride]);
    const int64_t w = static_cast<int64_t>(rint(sqrt(target * aspect)));
    const int64_t h = static_cast<int64_t>(rint(sqrt(target / aspect)));
    if (w > 0 && w <= width && h > 0 && h <= height) {
      int64_t top = static_cast<int64_t>(u[(2 * attempts + a) * stride] * (height - h + 1));
      int64_t left = static_cast<int64_t>(u[(3 * attempts + a) * stride] * (width - w + 1));
      box[0] = top < height - h ? top : height - h;
      box[1] = left < width - w ? left : width - w;
      box[2] = h;
      box[3] = w;
      return;
    }
  }
  const double in_ratio = static_cast<double>(width) / static_cast<double>(height);
  int64_t w = width, h = height;
  if (in_ratio < ratio_min) {
    h = static_cast<int64_t>(rint(static_cast<double>(width) / ratio_min));
  } else if (in_ratio > ratio_max) {
    w = static_cast<int64_t>(rint(static_cast<double>(height) * ratio_max));
  }
  w = w < 1 ? 1 : (w > width ? width : w);
  h = h < 1 ? 1 : (h > height ? height : h);
  box[0] = (height - h) / 2;
  box[1] = (width - w) / 2;
  box[2] = h;
  box[3] = w;
}

// Upper bound on a blur kernel's size (radius 95): one weight table per image lives in a fixed
// array, and a CUDA tile with a halo of 95 pixels still fits in shared memory.
constexpr int64_t kMaxKernelSize = 191;

}  // namespace pyssl::augment
