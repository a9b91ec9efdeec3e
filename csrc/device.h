#pragma once
// What the CUDA launchers (csrc/*/cuda/*.cu) need from the CUDA runtime and c10's CUDA layer,
// behind one thin interface: kernel launches, the device guard, the current stream, device
// checks and the registration of the CUDA implementations. The CUDA build maps each onto the
// real thing; the emulation build (PYSSL_CUDA_EMULATION, csrc/emu) onto the CPU emulator, where
// "device" tensors are CPU tensors and the ops register as torch.ops.pyssl_emu.*. With this, the
// launchers compile unchanged in both builds.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string_view>
#include <type_traits>
#include <utility>

#ifdef PYSSL_CUDA_EMULATION
#include "emu/launch.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace pyssl::device {

// The kernel's qualified name with its template arguments, from the compiler's signature of
// this function (e.g. "pyssl::infonce::cuda::lse_partial_kernel<float>").
template <auto Kernel>
const char* kernel_name() {
  static constexpr std::string_view sig = __PRETTY_FUNCTION__;
  static const std::string name = [] {
    const std::string_view key = "Kernel = ";
    const size_t begin = sig.find(key);
    if (begin == std::string_view::npos) return std::string(sig);
    const size_t from = begin + key.size();
    const size_t end = sig.find_first_of(";]", from);
    return std::string(sig.substr(from, end - from));
  }();
  return name.c_str();
}

#ifdef PYSSL_CUDA_EMULATION

#define PYSSL_CUDA_CHECK(expr)                                                                       \
  do {                                                                                               \
    const cudaError_t pyssl_status_ = (expr);                                                        \
    TORCH_CHECK(pyssl_status_ == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorString(pyssl_status_)); \
  } while (0)

// The ops of the emulated device: CPU tensors, torch.ops.pyssl_emu.
#define PYSSL_DEVICE_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pyssl_emu, CPU, m)
constexpr const char* kDeviceKind = "emulated CUDA (CPU)";

struct Guard {
  explicit Guard(const c10::Device&) {}
};

inline cudaStream_t current_stream() { return nullptr; }

inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }

// What nvcc checks of a kernel's parameters: copyable bytes (a struct passed by value is
// fine) within the 4 KiB that every CUDA release accepts.
template <typename... Params>
constexpr bool valid_kernel_params(void (*)(Params...)) {
  static_assert((std::is_trivially_copyable_v<std::remove_cv_t<Params>> && ...),
                "a kernel parameter must be trivially copyable");
  static_assert((sizeof(Params) + ... + 0) <= 4096, "kernel parameters above 4 KiB");
  return true;
}

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t, Args&&... args) {
  static_assert(valid_kernel_params(Kernel));
  emu::launch_fn(kernel_name<Kernel>(), reinterpret_cast<const void*>(Kernel), grid, block, dynamic_smem,
                 [&] { Kernel(args...); });
}

template <auto Kernel>
void set_max_dynamic_shared_memory(int bytes) {
  emu::set_max_dynamic_shared_memory(reinterpret_cast<const void*>(Kernel), bytes);
}

#else

#define PYSSL_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#define PYSSL_DEVICE_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pyssl, CUDA, m)
constexpr const char* kDeviceKind = "CUDA";

using Guard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream, Args&&... args) {
  Kernel<<<grid, block, dynamic_smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <auto Kernel>
void set_max_dynamic_shared_memory(int bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

#endif

inline void check_on_device(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(on_device(t), op, ": ", name, " must be a ", kDeviceKind, " tensor, got one on ", t.device());
}

}  // namespace pyssl::device
