#pragma once
// Helpers shared by the CPU (.cpp) and CUDA (.cu) kernels. Keep this header light: .cu files
// include it, and heavy torch headers multiply nvcc compile time.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYSSL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYSSL_HOST_DEVICE inline
#endif

namespace pyssl {

// F.normalize's eps: rows with a smaller norm are divided by eps instead.
constexpr double kNormEps = 1e-12;

}  // namespace pyssl
