#pragma once
// Argument checks of the InfoNCE-family ops, shared by the CPU and CUDA kernels (header-only,
// light enough for .cu files). Reading logit_scale's value stays with each kernel: on CUDA it
// would cost a device sync.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pyssl::infonce {

inline void check_embeddings(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (batch, dim), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.size(0) > 0 && t.size(1) > 0, op, ": ", name, " must be non-empty, got shape ",
              t.sizes());
}

inline void check_ntxent(const at::Tensor& z, double temperature) {
  check_embeddings(z, "pyssl.ntxent", "z");
  TORCH_CHECK(z.size(0) % 2 == 0 && z.size(0) >= 2,
              "pyssl.ntxent: z must hold two views of N >= 1 rows each (2N rows), got ", z.size(0));
  TORCH_CHECK(temperature > 0, "pyssl.ntxent: temperature must be > 0, got ", temperature);
}

// Everything but the value of logit_scale.
inline void check_infonce(const at::Tensor& query, const at::Tensor& key, const at::Tensor& logit_scale,
                          bool symmetric) {
  check_embeddings(query, "pyssl.infonce", "query");
  check_embeddings(key, "pyssl.infonce", "key");
  TORCH_CHECK(query.device() == key.device(), "pyssl.infonce: query and key must be on one device, got ",
              query.device(), " and ", key.device());
  TORCH_CHECK(query.size(1) == key.size(1), "pyssl.infonce: query and key must have the same dim, got ",
              query.sizes(), " and ", key.sizes());
  if (symmetric) {
    TORCH_CHECK(query.size(0) == key.size(0),
                "pyssl.infonce: the symmetric (CLIP) loss needs as many keys as queries, got ",
                query.size(0), " and ", key.size(0));
  } else {
    TORCH_CHECK(key.size(0) >= query.size(0), "pyssl.infonce: need at least one key per query, got ",
                key.size(0), " keys for ", query.size(0), " queries");
  }
  TORCH_CHECK(logit_scale.numel() == 1, "pyssl.infonce: logit_scale must hold one value, got shape ",
              logit_scale.sizes());
}

// logit_scale's value, which must be > 0; reads it on the host.
inline double checked_logit_scale(const at::Tensor& logit_scale) {
  const double scale = logit_scale.item<double>();
  TORCH_CHECK(scale > 0, "pyssl.infonce: logit_scale must be > 0, got ", scale);
  return scale;
}

}  // namespace pyssl::infonce
