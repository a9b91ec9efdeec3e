#pragma once
// Shadow <cuda_fp16.h> of the emulation build: IEEE binary16 with round-to-nearest-even
// conversions (c10::Half's, which match the device's __float2half_rn bit for bit).
#include <c10/util/Half.h>

#include <cstdint>

#include "emu/runtime.h"

struct __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(c10::detail::fp16_ieee_from_fp32_value(f)) {}
  __half(double d) : __half(static_cast<float>(d)) {}
  operator float() const { return c10::detail::fp16_ieee_to_fp32_value(__x); }
};

struct __half2 {
  __half x, y;
};

inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __ushort_as_half(unsigned short bits) {
  __half h;
  h.__x = bits;
  return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline float __low2float(__half2 v) { return static_cast<float>(v.x); }
inline float __high2float(__half2 v) { return static_cast<float>(v.y); }
inline __half __hadd(__half a, __half b) { return __half(static_cast<float>(a) + static_cast<float>(b)); }
inline __half __hmul(__half a, __half b) { return __half(static_cast<float>(a) * static_cast<float>(b)); }
inline __half __hfma(__half a, __half b, __half c) {
  return __half(fmaf(static_cast<float>(a), static_cast<float>(b), static_cast<float>(c)));
}
