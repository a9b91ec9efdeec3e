#pragma once
// Shadow <cuda_runtime.h> of the emulation build: the CUDA execution model (csrc/emu/runtime.h)
// and the few runtime API calls pyssl's launchers make, answered for an emulated H200.
#include <cstddef>
#include <cstring>

#include "emu/launch.h"
#include "emu/runtime.h"

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
} cudaError_t;

typedef struct CUstream_st* cudaStream_t;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxRegistersPerBlock = 12,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// Device index -1 is what at::Tensor::get_device() gives for the CPU tensors the emulated device
// holds: the emulated device 0.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0 && device != -1) return cudaErrorInvalidDevice;
  const pyssl::emu::DeviceLimits& l = pyssl::emu::limits();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = l.max_threads_per_block; break;
    case cudaDevAttrMaxBlockDimX: *value = l.max_threads_per_block; break;
    case cudaDevAttrMaxGridDimX: *value = l.max_grid_dim_x; break;
    case cudaDevAttrMaxGridDimY: *value = l.max_grid_dim_yz; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = l.shared_per_block; break;
    case cudaDevAttrWarpSize: *value = pyssl::emu::kWarpSize; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = l.regs_per_block; break;
    case cudaDevAttrMultiProcessorCount: *value = l.sm_count; break;
    case cudaDevAttrL2CacheSize: *value = l.l2_bytes; break;
    case cudaDevAttrComputeCapabilityMajor: *value = l.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = l.minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = l.shared_per_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = l.shared_per_block_optin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// Device and host memory are one: copies and fills happen at once (stream order is trivially kept,
// every emulated launch completes before it returns).
// Copies that involve the host are counted (pyssl::emu::host_call_count): on a GPU they make the
// host wait or cannot be captured in a CUDA graph. Every emulated tensor is a CPU tensor, so
// cudaMemcpyDefault counts as neither.
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
  using pyssl::emu::HostCall;
  if (kind == cudaMemcpyHostToDevice) pyssl::emu::record_host_call(HostCall::kHostToDeviceCopy);
  if (kind == cudaMemcpyDeviceToHost) pyssl::emu::record_host_call(HostCall::kDeviceToHostCopy);
  if (count > 0) std::memmove(dst, src, count);
  return cudaSuccess;
}

inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  pyssl::emu::record_host_call(pyssl::emu::HostCall::kSynchronize);
  return cudaMemcpyAsync(dst, src, count, kind);
}

inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t = nullptr) {
  if (count > 0) std::memset(dst, value, count);
  return cudaSuccess;
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  pyssl::emu::record_host_call(pyssl::emu::HostCall::kSynchronize);
  return cudaSuccess;
}

inline cudaError_t cudaDeviceSynchronize() {
  pyssl::emu::record_host_call(pyssl::emu::HostCall::kSynchronize);
  return cudaSuccess;
}
