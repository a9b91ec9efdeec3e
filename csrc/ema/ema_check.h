#pragma once
// Argument checks of ema_update_, shared by the CPU and CUDA kernels (header-only, light).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pyssl::ema {

inline void check_ema_lists(at::TensorList ema, at::TensorList online, double momentum) {
  TORCH_CHECK(ema.size() == online.size(), "pyssl.ema_update_: ema and online must have the same length, got ",
              ema.size(), " and ", online.size());
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, "pyssl.ema_update_: momentum must be in [0, 1], got ",
              momentum);
  for (size_t i = 0; i < ema.size(); ++i) {
    TORCH_CHECK(ema[i].sizes() == online[i].sizes(), "pyssl.ema_update_: ema[", i, "] has shape ",
                ema[i].sizes(), " but online[", i, "] has shape ", online[i].sizes());
    TORCH_CHECK(ema[i].device() == online[i].device() && ema[i].device() == ema[0].device(),
                "pyssl.ema_update_: all tensors must be on one device, got ema[", i, "] on ", ema[i].device(),
                ", online[", i, "] on ", online[i].device(), " and ema[0] on ", ema[0].device());
    TORCH_CHECK(at::isFloatingType(ema[i].scalar_type()) && at::isFloatingType(online[i].scalar_type()),
                "pyssl.ema_update_: tensors must be floating, got ", ema[i].scalar_type(), " and ",
                online[i].scalar_type(), " at index ", i);
  }
}

// Both tensors cover their storage densely in the same element order (contiguous, or the
// same permuted strides, e.g. channels_last): the update can run over the raw buffers.
inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense() && a.strides() == b.strides();
}

// What the fused kernels leave out: an empty tensor needs nothing, and strided views that do not
// share a dense layout are updated by TensorIterator (still in place, per element). True when
// ``ema`` is done and the caller should skip it.
inline bool update_outside_kernel(const at::Tensor& ema, const at::Tensor& online, double momentum) {
  if (ema.numel() == 0) return true;
  if (same_dense_layout(ema, online)) return false;
  ema.mul_(momentum).add_(online, 1.0 - momentum);
  return true;
}

}  // namespace pyssl::ema
