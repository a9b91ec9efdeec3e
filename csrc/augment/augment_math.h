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

// torchvision's adjust_hue on one float RGB pixel: RGB -> HSV (Pillow's formulas), hue
// shifted by `shift` modulo 1, HSV -> RGB with p, q, t clamped to [0, 1].
PYSSL_HOST_DEVICE void shift_hue(float& r, float& g, float& b, float shift) {
  const float maxc = fmaxf(r, fmaxf(g, b));
  const float minc = fminf(r, fminf(g, b));
  const bool eqc = maxc == minc;
  const float range = maxc - minc;
  const float s = range / (eqc ? 1.f : maxc);
  const float div = eqc ? 1.f : range;
  const float rc = (maxc - r) / div, gc = (maxc - g) / div, bc = (maxc - b) / div;
  float h;
  if (maxc == r) {
    h = bc - gc;
  } else if (maxc == g) {
    h = 2.f + rc - bc;
  } else {
    h = 4.f + gc - rc;
  }
  h = fmodf(h * (1.f / 6.f) + 1.f, 1.f);
  // torch.remainder(h + shift, 1): fmod, moved into [0, 1] for negative values.
  h = fmodf(h + shift, 1.f);
  if (h < 0.f) h += 1.f;
  const float v = maxc;
  const float h6 = h * 6.f;
  const float fi = floorf(h6);
  const float f = h6 - fi;
  int i = static_cast<int>(fi) % 6;
  if (i < 0) i += 6;
  const float sf = s * f;
  const float q = clamp01((1.f - sf) * v);
  const float t = clamp01((sf + (1.f - s)) * v);
  const float p = clamp01((1.f - s) * v);
  switch (i) {
    case 0: r = v; g = t; b = p; break;
    case 1: r = q; g = v; b = p; break;
    case 2: r = p; g = v; b = t; break;
    case 3: r = p; g = q; b = v; break;
    case 4: r = t; g = p; b = v; break;
    default: r = v; g = p; b = q; break;
  }
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

// Upper bound on a blur kernel's size: one weight table per image lives in a fixed array.
constexpr int64_t kMaxKernelSize = 255;

}  // namespace pyssl::augment
