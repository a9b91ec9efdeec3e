#pragma once
// The block's dynamic shared memory, for kernels of both builds: on the GPU the extern shared
// array, in the emulation build the emulator's per-block buffer (which ends at a guard page).
#include <cuda_runtime.h>

namespace pyssl {

template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#ifdef PYSSL_CUDA_EMULATION
  return reinterpret_cast<T*>(::pyssl::emu::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char pyssl_dynamic_smem[];
  return reinterpret_cast<T*>(pyssl_dynamic_smem);
#endif
}

}  // namespace pyssl
