#pragma once
// Row normalisation of the CPU loss kernels (InfoNCE family, MoCo): rows are L2-normalised in
// the accumulation type, float64 for float64 inputs (gradcheck needs it), float32 otherwise.
#include <ATen/ATen.h>

#include "common.h"

namespace pyssl::cpu {

inline at::ScalarType accumulate_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct Normalized {
  at::Tensor unit;  // z / max(||z||, eps) in the accumulation dtype, contiguous
  at::Tensor norm;  // ||z|| per row
};

inline Normalized normalize_rows(const at::Tensor& z, at::ScalarType acc) {
  at::Tensor z_acc = z.to(acc).contiguous();
  at::Tensor norm = at::linalg_vector_norm(z_acc, 2, {1});
  return {z_acc / norm.clamp_min(kNormEps).unsqueeze(1), norm};
}

}  // namespace pyssl::cpu
