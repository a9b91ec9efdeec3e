#pragma once
// Constants shared by the MoCo CPU and CUDA kernels (see pyssl/losses/moco.py for the math).
#include "common.h"

namespace pyssl::moco {

// Largest logit bound B (|logit| <= B) for which exp(logit) needs no shift at all: with
// B <= 40, exp stays within [4e-18, 2.4e17] and a sum over 2^31 queue entries stays far below
// the float32 maximum, so the sweep keeps plain sums (no running max, no rescaling).
// The bound is 1/T times the largest queue row norm (unit rows: 1/T), so any T >= 0.025
// takes the unshifted path; smaller temperatures fall back to the online running max.
template <typename acc_t>
PYSSL_HOST_DEVICE acc_t unshifted_logit_limit();
template <>
PYSSL_HOST_DEVICE float unshifted_logit_limit<float>() { return 40.0f; }
template <>
PYSSL_HOST_DEVICE double unshifted_logit_limit<double>() { return 300.0; }

}  // namespace pyssl::moco
