#pragma once
// Shape/dtype checks of augment_fused shared by the CPU and CUDA entry points. Value checks
// (boxes inside the image, sigma >= 0) need the data on the host and live with each kernel.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace pyssl::augment {

inline void check_param(const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                        at::ScalarType dtype, const at::Tensor& images) {
  constexpr const char* op = "pyssl.augment_fused";
  if (cols == 0) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must have shape (", rows,
                ",), got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name,
                " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  }
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == images.device(), op, ": ", name, " is on ", t.device(),
              " but images on ", images.device());
}

// Returns the number of output images.
inline int64_t check_fused_args(const at::Tensor& images, const at::Tensor& source_index,
                                const at::Tensor& crop_boxes, const at::Tensor& flip,
                                const at::Tensor& jitter_factors, const at::Tensor& jitter_order,
                                const at::Tensor& gray, const at::Tensor& blur_sigma,
                                const at::Tensor& blur_kernel_size,
                                const at::Tensor& solarize_threshold, const at::Tensor& mean,
                                const at::Tensor& std, int64_t out_h, int64_t out_w,
                                std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "pyssl.augment_fused";
  TORCH_CHECK(images.dim() == 4, op, ": images must be (B, C, H, W), got shape ", images.sizes());
  const int64_t channels = images.size(1);
  TORCH_CHECK(channels == 1 || channels == 3, op, ": images must have 1 or 3 channels, got ",
              channels);
  TORCH_CHECK(images.size(0) > 0 && images.size(2) > 0 && images.size(3) > 0, op,
              ": images must be non-empty, got shape ", images.sizes());
  const auto in_t = images.scalar_type();
  TORCH_CHECK(in_t == at::kByte || in_t == at::kFloat || in_t == at::kDouble ||
                  in_t == at::kHalf || in_t == at::kBFloat16,
              op, ": images must be uint8 or floating, got ", in_t);
  TORCH_CHECK(out_h > 0 && out_w > 0, op, ": output size must be positive, got (", out_h, ", ",
              out_w, ")");
  const auto out_t = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(out_t == at::kFloat || out_t == at::kHalf || out_t == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16, got ", out_t);
  const int64_t n = source_index.dim() == 1 ? source_index.size(0) : -1;
  TORCH_CHECK(n > 0, op, ": source_index must be a non-empty 1-D tensor, got shape ",
              source_index.sizes());
  check_param(source_index, "source_index", n, 0, at::kLong, images);
  check_param(crop_boxes, "crop_boxes", n, 4, at::kLong, images);
  check_param(flip, "flip", n, 0, at::kBool, images);
  check_param(jitter_factors, "jitter_factors", n, 4, at::kFloat, images);
  check_param(jitter_order, "jitter_order", n, 4, at::kLong, images);
  check_param(gray, "gray", n, 0, at::kBool, images);
  check_param(blur_sigma, "blur_sigma", n, 0, at::kFloat, images);
  check_param(blur_kernel_size, "blur_kernel_size", n, 0, at::kLong, images);
  check_param(solarize_threshold, "solarize_threshold", n, 0, at::kFloat, images);
  TORCH_CHECK(mean.numel() == std.numel() && (mean.numel() == 0 || mean.numel() == channels), op,
              ": mean and std must both be empty or hold one value per channel (", channels,
              "), got ", mean.numel(), " and ", std.numel());
  if (mean.numel() > 0) {
    check_param(mean, "mean", channels, 0, at::kFloat, images);
    check_param(std, "std", channels, 0, at::kFloat, images);
  }
  return n;
}

// Returns the number of attempts per image.
inline int64_t check_draw_crops_args(const at::Tensor& uniforms, int64_t height, int64_t width,
                                     double scale_min, double scale_max, double ratio_min,
                                     double ratio_max) {
  constexpr const char* op = "pyssl.augment_draw_crops";
  TORCH_CHECK(uniforms.dim() == 2 && uniforms.size(1) > 0 && uniforms.size(1) % 4 == 0, op,
              ": uniforms must be (N, 4 * attempts), got shape ", uniforms.sizes());
  TORCH_CHECK(uniforms.scalar_type() == at::kFloat, op, ": uniforms must be float32, got ",
              uniforms.scalar_type());
  TORCH_CHECK(height > 0 && width > 0, op, ": image size must be positive, got ", height, "x",
              width);
  TORCH_CHECK(0 <= scale_min && scale_min <= scale_max && scale_max > 0, op,
              ": need 0 <= scale_min <= scale_max, scale_max > 0, got (", scale_min, ", ",
              scale_max, ")");
  TORCH_CHECK(0 < ratio_min && ratio_min <= ratio_max, op,
              ": need 0 < ratio_min <= ratio_max, got (", ratio_min, ", ", ratio_max, ")");
  return uniforms.size(1) / 4;
}

}  // namespace pyssl::augment
