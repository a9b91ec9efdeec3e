#pragma once
// The CUDA execution model on the CPU: pyssl's emulation build compiles the very same kernel
// sources (csrc/*/cuda) as host C++ against this header, reached through the shadow
// <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and <mma.h> of csrc/emu/include.
//
// A block's threads run as fibers on one OS thread. They switch only where a GPU thread may
// wait for others (block barriers, warp collectives) and the order in which the runnable ones
// resume is drawn from a seed: code that relies on an order no barrier guarantees (a data race)
// gets a result that changes with the seed. What a GPU would hang, crash on or silently
// miscompute is reported as an error naming the kernel, the block, the thread and the source
// line: a barrier that part of the block skips, warp collectives that lanes reach with other
// masks or other intrinsics, deadlocks, out-of-bounds accesses (see runtime.cpp), launch
// configurations the H200 rejects.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

#define PYSSL_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A kernel argument read in place; here every argument is the launch's own copy.
#define __grid_constant__
// One instance per OS thread; blocks run one at a time on an OS thread, so each block sees its
// own shared arrays (poisoned by the scheduler before the block starts).
#define __shared__ static thread_local
#define __constant__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

namespace pyssl::emu {

constexpr int kWarpSize = 32;

// What the running emulated thread sees as its built-in variables.
struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int linear;  // threadIdx flattened, x fastest
  int lane, warp;
};

// The emulated threads' stacks: one region, kStackBytes a thread, kMaxThreadsPerWorker threads
// per block worker. The running thread is found from its stack pointer: no thread-local
// variable, since the library's thread-local block is the blocks' shared memory (runtime.cpp).
constexpr uintptr_t kStackBytes = 128 * 1024;
constexpr int kMaxThreadsPerWorker = 1024;
extern uintptr_t g_stack_begin, g_stack_end;
extern ThreadContext** g_slot_contexts;

inline uintptr_t stack_pointer() {
#if defined(__x86_64__)
  uintptr_t sp;
  asm("mov %%rsp, %0" : "=r"(sp));  // not volatile: a thread never changes stacks, so it may be reused
  return sp;
#else
  return reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
#endif
}

// The stack slot of the running emulated thread (worker * kMaxThreadsPerWorker + thread), or -1
// outside a kernel.
inline int64_t current_stack_slot() {
  const uintptr_t offset = stack_pointer() - g_stack_begin;
  return offset < g_stack_end - g_stack_begin ? static_cast<int64_t>(offset / kStackBytes) : -1;
}

// The running emulated thread, or null outside a kernel.
inline ThreadContext* current_thread() {
  const int64_t slot = current_stack_slot();
  return slot < 0 ? nullptr : g_slot_contexts[slot];
}

enum class Collective : uint8_t {
  kSyncwarp,
  kShflIdx,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kMatch,
  kCustom,  // a warp-wide operation completed by a callback (WMMA, mma.sync, ldmatrix)
};

// Called once all lanes of a completed custom collective have arrived: lane_args[l] is what
// lane l passed (null for lanes that are not there). Returns an error message, or null.
using CollectiveFn = const char* (*)(void* const* lane_args, unsigned arrived);

// Waits until every non-exited lane named in `mask` has reached a collective of the same kind
// with the same mask, then returns this lane's result (shuffles: the source lane's value bits;
// votes: the vote). Lanes outside the mask, an exited source lane or lanes of other
// intrinsics are reported as errors or poison values as the CUDA documentation leaves them.
uint64_t warp_collective(Collective op, unsigned mask, uint64_t value, int arg, int width,
                         CollectiveFn fn, void* fn_arg, const std::source_location& where);

void block_barrier(const std::source_location& where);

// Records an error of the running kernel (reported when the launch ends) and, when `fatal`,
// abandons the block: the thread never resumes.
void kernel_error(const char* what, const std::source_location& where, bool fatal);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace pyssl::emu

#define threadIdx (::pyssl::emu::current_thread()->thread_idx)
#define blockIdx (::pyssl::emu::current_thread()->block_idx)
#define blockDim (::pyssl::emu::current_thread()->block_dim)
#define gridDim (::pyssl::emu::current_thread()->grid_dim)
#define warpSize 32

// ---- synchronisation ----------------------------------------------------------------------------

inline void __syncthreads(const std::source_location& where = std::source_location::current()) {
  pyssl::emu::block_barrier(where);
}

inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const std::source_location& where = std::source_location::current()) {
  pyssl::emu::warp_collective(pyssl::emu::Collective::kSyncwarp, mask, 0, 0, 32, nullptr, nullptr, where);
}

// Shared and global memory are one address space on the CPU, the fibers of a block run on one OS
// thread, and blocks on other workers see x86's ordered stores: fences have nothing to add.
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace pyssl::emu {
template <typename T>
T shuffle(Collective op, unsigned mask, T var, int arg, int width, const std::source_location& where) {
  return from_bits<T>(warp_collective(op, mask, to_bits(var), arg, width, nullptr, nullptr, where));
}
}  // namespace pyssl::emu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
              const std::source_location& where = std::source_location::current()) {
  return pyssl::emu::shuffle(pyssl::emu::Collective::kShflIdx, mask, var, src_lane, width, where);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 const std::source_location& where = std::source_location::current()) {
  return pyssl::emu::shuffle(pyssl::emu::Collective::kShflUp, mask, var, static_cast<int>(delta), width, where);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   const std::source_location& where = std::source_location::current()) {
  return pyssl::emu::shuffle(pyssl::emu::Collective::kShflDown, mask, var, static_cast<int>(delta), width, where);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  const std::source_location& where = std::source_location::current()) {
  return pyssl::emu::shuffle(pyssl::emu::Collective::kShflXor, mask, var, lane_mask, width, where);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              const std::source_location& where = std::source_location::current()) {
  using namespace pyssl::emu;
  return static_cast<unsigned>(warp_collective(Collective::kBallot, mask, predicate != 0, 0, 32, nullptr, nullptr, where));
}

inline int __any_sync(unsigned mask, int predicate, const std::source_location& where = std::source_location::current()) {
  using namespace pyssl::emu;
  return static_cast<int>(warp_collective(Collective::kAny, mask, predicate != 0, 0, 32, nullptr, nullptr, where));
}

inline int __all_sync(unsigned mask, int predicate, const std::source_location& where = std::source_location::current()) {
  using namespace pyssl::emu;
  return static_cast<int>(warp_collective(Collective::kAll, mask, predicate != 0, 0, 32, nullptr, nullptr, where));
}

// The lanes of the warp that have not exited (a GPU may report fewer: only converged lanes).
unsigned __activemask();

inline unsigned __lanemask_lt() { return (1u << pyssl::emu::current_thread()->lane) - 1u; }

// ---- atomics (real atomics: blocks may one day run on several OS threads) ------------------------

template <typename T>
T pyssl_emu_atomic_update(T* address, T (*update)(T, T), T operand) {
  if constexpr (std::is_integral_v<T>) {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(address, &old, update(old, operand), false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
    return old;
  } else {
    using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
    Bits* raw = reinterpret_cast<Bits*>(address);
    Bits old_bits = __atomic_load_n(raw, __ATOMIC_RELAXED);
    for (;;) {
      T old;
      std::memcpy(&old, &old_bits, sizeof(T));
      const T next = update(old, operand);
      Bits next_bits;
      std::memcpy(&next_bits, &next, sizeof(T));
      if (__atomic_compare_exchange_n(raw, &old_bits, next_bits, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return old;
    }
  }
}

template <typename T>
T atomicAdd(T* address, T value) {
  return pyssl_emu_atomic_update<T>(address, [](T a, T b) { return static_cast<T>(a + b); }, value);
}
template <typename T>
T atomicMax(T* address, T value) {
  return pyssl_emu_atomic_update<T>(address, [](T a, T b) { return a > b ? a : b; }, value);
}
template <typename T>
T atomicMin(T* address, T value) {
  return pyssl_emu_atomic_update<T>(address, [](T a, T b) { return a < b ? a : b; }, value);
}
template <typename T>
T atomicExch(T* address, T value) {
  return pyssl_emu_atomic_update<T>(address, [](T, T b) { return b; }, value);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
  return compare;
}

// ---- device math that host C++ lacks ----------------------------------------------------------------

#define PYSSL_EMU_MINMAX(T)                               \
  inline T min(T a, T b) { return a < b ? a : b; }       \
  inline T max(T a, T b) { return a > b ? a : b; }
PYSSL_EMU_MINMAX(int)
PYSSL_EMU_MINMAX(unsigned)
PYSSL_EMU_MINMAX(long)
PYSSL_EMU_MINMAX(unsigned long)
PYSSL_EMU_MINMAX(long long)
PYSSL_EMU_MINMAX(unsigned long long)
#undef PYSSL_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// The fast intrinsics as the hardware forms them (ex2.approx / lg2.approx on a scaled argument):
// the same algebra, with host rounding.
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float __logf(float x) { return log2f(x) * 0.6931471805599453f; }
inline float __log2f(float x) { return log2f(x); }
inline float __exp2f(float x) { return exp2f(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline int __float_as_int(float x) { return pyssl::emu::from_bits<int>(pyssl::emu::to_bits(x)); }
inline unsigned __float_as_uint(float x) { return pyssl::emu::from_bits<unsigned>(pyssl::emu::to_bits(x)); }
inline float __int_as_float(int x) { return pyssl::emu::from_bits<float>(pyssl::emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return pyssl::emu::from_bits<float>(pyssl::emu::to_bits(x)); }
inline long long __double_as_longlong(double x) { return pyssl::emu::from_bits<long long>(pyssl::emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return pyssl::emu::from_bits<double>(pyssl::emu::to_bits(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
