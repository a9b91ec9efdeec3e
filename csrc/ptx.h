#pragma once
// The inline-PTX instructions pyssl's kernels use, behind one interface. The CUDA build emits
// the instruction itself; the emulation build (PYSSL_CUDA_EMULATION) follows the PTX ISA:
// warp-wide operations wait for all 32 lanes and place every element in the register and lane
// the ISA's fragment figures give ("Matrix Fragments for mma.m16n8k16", "ldmatrix"), and
// cp.async copies land only at the cp.async.wait_group that covers them (the destination reads
// as 0xFF bytes until then), so a missing wait is a wrong result, not a lucky one.
//
// Fragment layouts (groupID = lane / 4, tig = lane % 4; a register holds two 16-bit values, the
// lower column in the lower half):
//   A (16 x 16, row):  a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
//                      a[2] = A[g][2t+8..+9]    a[3] = A[g+8][2t+8..+9]
//   B (16 x 8, col):   b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..+9][g]
//   C, D (16 x 8):     c[0..1] = C[g][2t..2t+1] c[2..3] = C[g+8][2t..2t+1]
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace pyssl::ptx {

#ifdef PYSSL_CUDA_EMULATION

namespace emulated {

inline float low_value(uint32_t r, bool bf16) {
  const auto bits = static_cast<unsigned short>(r & 0xffffu);
  return bf16 ? c10::detail::f32_from_bits(bits) : c10::detail::fp16_ieee_to_fp32_value(bits);
}
inline float high_value(uint32_t r, bool bf16) {
  const auto bits = static_cast<unsigned short>(r >> 16);
  return bf16 ? c10::detail::f32_from_bits(bits) : c10::detail::fp16_ieee_to_fp32_value(bits);
}

struct MmaLane {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

template <bool kBf16>
const char* mma_m16n8k16_complete(void* const* lanes, unsigned arrived) {
  if (arrived != 0xffffffffu) return "mma.sync.m16n8k16 reached by fewer than 32 lanes";
  float a[16][16], b[16][8], c[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto* in = static_cast<const MmaLane*>(lanes[l]);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
      a[row][col] = low_value(in->a[i], kBf16);
      a[row][col + 1] = high_value(in->a[i], kBf16);
    }
    for (int i = 0; i < 2; ++i) {
      b[2 * t + 8 * i][g] = low_value(in->b[i], kBf16);
      b[2 * t + 8 * i + 1][g] = high_value(in->b[i], kBf16);
    }
    for (int i = 0; i < 4; ++i) c[g + 8 * (i >> 1)][2 * t + (i & 1)] = in->c[i];
  }
  for (int l = 0; l < 32; ++l) {
    const auto* out = static_cast<const MmaLane*>(lanes[l]);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      float s = c[row][col];
      for (int k = 0; k < 16; ++k) s += a[row][k] * b[k][col];  // products are exact in float
      out->d[i] = s;
    }
  }
  return nullptr;
}

struct LdmatrixLane {
  const void* row;  // the address this lane supplies (lanes 8i..8i+7: rows of matrix i)
  uint32_t* out;
  int count;
  bool transpose;
};

inline const char* ldmatrix_complete(void* const* lanes, unsigned arrived) {
  if (arrived != 0xffffffffu) return "ldmatrix reached by fewer than 32 lanes";
  const auto* first = static_cast<const LdmatrixLane*>(lanes[0]);
  uint16_t m[4][8][8];
  for (int i = 0; i < first->count; ++i) {
    for (int r = 0; r < 8; ++r) {
      const auto* src = static_cast<const LdmatrixLane*>(lanes[8 * i + r]);
      if (src->count != first->count || src->transpose != first->transpose) {
        return "the lanes of an ldmatrix disagree on its shape";
      }
      std::memcpy(m[i][r], src->row, 16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    const auto* dst = static_cast<const LdmatrixLane*>(lanes[l]);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < first->count; ++i) {
      const uint16_t lo = first->transpose ? m[i][2 * t][g] : m[i][g][2 * t];
      const uint16_t hi = first->transpose ? m[i][2 * t + 1][g] : m[i][g][2 * t + 1];
      dst->out[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
  return nullptr;
}

}  // namespace emulated

// D = A B + C, m16n8k16, fp32 accumulators; T = __half or __nv_bfloat16 operands.
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                         const std::source_location& where = std::source_location::current()) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "fp16 or bf16 operands");
  float result[4];
  emulated::MmaLane lane{result, a, b, c};
  ::pyssl::emu::warp_collective(::pyssl::emu::Collective::kCustom, 0xffffffffu, 0, 0, 32,
                                &emulated::mma_m16n8k16_complete<std::is_same_v<T, __nv_bfloat16>>, &lane, where);
  for (int i = 0; i < 4; ++i) d[i] = result[i];
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lane 8i + r supplies the address of row
// r of matrix i (16 bytes); register i of lane l receives row l / 4, columns 2 (l % 4) and
// 2 (l % 4) + 1 of matrix i (transposed: rows 2 (l % 4), 2 (l % 4) + 1 of column l / 4).
template <int kCount, bool kTranspose = false>
inline void ldmatrix(uint32_t (&out)[kCount], const void* shared_row,
                     const std::source_location& where = std::source_location::current()) {
  static_assert(kCount == 1 || kCount == 2 || kCount == 4, "ldmatrix loads 1, 2 or 4 matrices");
  if (reinterpret_cast<uintptr_t>(shared_row) % 16 != 0) {
    ::pyssl::emu::kernel_error("ldmatrix: a row address that is not 16-byte aligned", where, true);
  }
  emulated::LdmatrixLane lane{shared_row, out, kCount, kTranspose};
  ::pyssl::emu::warp_collective(::pyssl::emu::Collective::kCustom, 0xffffffffu, 0, 0, 32,
                                &emulated::ldmatrix_complete, &lane, where);
}

// ex2.approx.ftz.f32: 2^x, subnormal results flushed to zero; ex2(-inf) = 0.
inline float ex2_approx(float x) {
  const float v = exp2f(x);
  return std::fabs(v) < 1.17549435e-38f ? 0.0f : v;
}

// cp.async.cg.shared.global (16 bytes), cp.async.commit_group, cp.async.wait_group N.
void cp_async_16(void* shared_dst, const void* global_src, const std::source_location& where = std::source_location::current());
void cp_async_commit();
void cp_async_wait(int pending_groups);

#else  // the CUDA build: the instructions themselves

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
}

template <int kCount, bool kTranspose = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&out)[kCount], const void* shared_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(shared_row));
  if constexpr (kCount == 4 && !kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3]) : "r"(addr));
  } else if constexpr (kCount == 4) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3]) : "r"(addr));
  } else if constexpr (kCount == 2 && !kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(out[0]), "=r"(out[1]) : "r"(addr));
  } else if constexpr (kCount == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(out[0]), "=r"(out[1]) : "r"(addr));
  } else if constexpr (!kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(out[0]) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(out[0]) : "r"(addr));
  }
}

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(global_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// The count must be a compile-time constant in PTX: the switch covers the depths pyssl uses.
__device__ __forceinline__ void cp_async_wait(int pending_groups) {
  switch (pending_groups) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::); break;
    default: asm volatile("cp.async.wait_group 3;\n" ::); break;
  }
}

#endif

// Two 16-bit values in one register, `low` in the lower half (the fragment element order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(T low, T high) {
  uint16_t lo, hi;
  static_assert(sizeof(T) == 2, "16-bit values");
  std::memcpy(&lo, &low, 2);
  std::memcpy(&hi, &high, 2);
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// log2(e): the kernels' exponentials are ex2_approx(x * kLog2e).
constexpr float kLog2e = 1.4426950408889634f;

// A float rounded to the MMA operand type (fp16 or bf16), round to nearest even.
template <typename op_t>
__device__ __forceinline__ op_t to_op(float v) {
  if constexpr (std::is_same_v<op_t, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// Two floats rounded to op_t in one register: how an accumulator fragment's pair (C[g][2t],
// C[g][2t + 1]) becomes a 16-bit A fragment register of the next MMA.
template <typename op_t>
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  return pack2(to_op<op_t>(low), to_op<op_t>(high));
}

}  // namespace pyssl::ptx
