#pragma once
// Argument checks of the MoCo ops, shared by the CPU and CUDA kernels (header-only, light).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pyssl::moco {

inline void check_moco(const at::Tensor& query, const at::Tensor& key, const at::Tensor& queue,
                       double temperature) {
  const char* op = "pyssl.moco";
  for (auto [t, name] : {std::pair{&query, "query"}, std::pair{&key, "key"}}) {
    TORCH_CHECK(t->dim() == 2, op, ": ", name, " must be 2-D (batch, dim), got shape ", t->sizes());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                t->scalar_type());
    TORCH_CHECK(t->size(0) > 0 && t->size(1) > 0, op, ": ", name, " must be non-empty, got shape ",
                t->sizes());
  }
  TORCH_CHECK(query.sizes() == key.sizes(), op, ": query and key must have the same shape, got ",
              query.sizes(), " and ", key.sizes());
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), op, ": query and key must have the same dtype, got ",
              query.scalar_type(), " and ", key.scalar_type());
  TORCH_CHECK(queue.dim() == 2 && queue.size(1) == query.size(1), op,
              ": queue must have shape (K, ", query.size(1), "), got ", queue.sizes());
  TORCH_CHECK(at::isFloatingType(queue.scalar_type()), op, ": queue must be a floating tensor, got ",
              queue.scalar_type());
  TORCH_CHECK(query.device() == key.device() && query.device() == queue.device(), op,
              ": query, key and queue must be on one device, got ", query.device(), ", ", key.device(),
              " and ", queue.device());
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
}

}  // namespace pyssl::moco
