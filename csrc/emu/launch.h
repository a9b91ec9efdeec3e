#pragma once
// Host side of the CUDA emulator: kernel launches, dynamic shared memory, the guarded
// allocator and the run settings (seed). The launchers reach it through csrc/device.h.
#include <cstddef>
#include <cstdint>
#include <string>

#include "emu/runtime.h"

namespace pyssl::emu {

// H200 (sm_90) limits the emulated device reports and enforces.
struct DeviceLimits {
  int sm_count = 132;
  int max_threads_per_block = 1024;
  int max_block_dim_z = 64;
  int max_grid_dim_x = 2147483647;
  int max_grid_dim_yz = 65535;
  int shared_per_block = 48 * 1024;           // without an opt-in
  int shared_per_block_optin = 227 * 1024;    // cudaFuncAttributeMaxDynamicSharedMemorySize
  int shared_per_sm = 228 * 1024;
  int regs_per_block = 65536;
  int l2_bytes = 50 * 1024 * 1024;
  int major = 9, minor = 0;
};
const DeviceLimits& limits();

// A type-erased kernel body: calls the kernel with the launch's arguments, once per thread.
struct KernelBody {
  void (*run)(void* ctx);
  void* ctx;
};

// Runs every block of the grid (in a seeded random order) to completion before it returns.
// Throws c10::Error naming the kernel for a bad configuration and for every fault the
// emulator detects while the kernel runs.
void launch(const char* kernel_name, const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem,
            KernelBody body);

template <typename F>
void launch_fn(const char* kernel_name, const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem,
               F&& fn) {
  launch(kernel_name, kernel_id, grid, block, dynamic_smem,
         KernelBody{[](void* ctx) { (*static_cast<std::remove_reference_t<F>*>(ctx))(); }, &fn});
}

// The running block's dynamic shared memory (its size is the launch's; past it: a guard page).
unsigned char* dynamic_shared_memory();

void set_max_dynamic_shared_memory(const void* kernel_id, int bytes);

// The seed of the thread and block orders (each launch draws from it and a launch counter).
void set_seed(uint64_t seed);
uint64_t seed();

// While enabled, CPU tensors are allocated so that each ends at an inaccessible page and start
// out filled with 0xFF bytes (NaN in every float format): a kernel reading past a buffer or
// reading memory no one wrote is caught. Returns the previous state.
bool set_guarded_allocation(bool enabled);

// Launches and emulated threads run so far (for tests that a path really ran).
int64_t launch_count();

// The runtime calls of the launchers that involve the host and so cannot be captured in a CUDA
// graph, or make the host wait for the device (what torch.cuda.set_sync_debug_mode flags),
// counted by the shadow <cuda_runtime.h>: tests check that a path makes none.
enum class HostCall : int {
  kHostToDeviceCopy,  // pageable source: the host may wait until the copy is staged
  kDeviceToHostCopy,  // the host waits for the device's stream to reach the copy
  kSynchronize,       // cudaStreamSynchronize, cudaDeviceSynchronize, cudaMemcpy
  kCount,
};
void record_host_call(HostCall call);
int64_t host_call_count(HostCall call);

}  // namespace pyssl::emu
