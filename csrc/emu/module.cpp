// The library pyssl._C_emu: pyssl's CUDA kernels compiled as host C++ and run by the CPU emulator
// (runtime.cpp), registered on CPU tensors as torch.ops.pyssl_emu.* with the schemas of
// torch.ops.pyssl, and the emulator's settings as torch.ops.pyssl_emulator.*. Loaded with
// torch.ops.load_library (pyssl/emulation.py); no pybind11, whose thread-local state would share
// the thread-local block that the emulator poisons as shared memory. Built when
// PYSSL_CUDA_EMULATE=ON (make does).
#include <torch/library.h>

#include <vector>

#include "emu/launch.h"
#include "schemas.h"

TORCH_LIBRARY(pyssl_emu, m) { pyssl::define_schemas(m); }

TORCH_LIBRARY(pyssl_emulator, m) {
  // The order in which emulated threads and blocks run is drawn from this seed (and a launch
  // counter): a data race gives results that change with it.
  m.def("set_seed(int seed) -> ()", [](int64_t seed) { pyssl::emu::set_seed(static_cast<uint64_t>(seed)); });
  m.def("seed() -> int", [] { return static_cast<int64_t>(pyssl::emu::seed()); });
  // While on, CPU tensors end at an inaccessible page and start filled with 0xFF bytes (NaN in
  // every float format): emulated kernels that read past a buffer or read unwritten memory fail.
  m.def("set_guarded_allocation(bool enabled) -> bool", [](bool on) { return pyssl::emu::set_guarded_allocation(on); });
  m.def("launch_count() -> int", [] { return pyssl::emu::launch_count(); });
  // Runtime calls so far that a CUDA graph cannot capture or that make the host wait: host-to-
  // device copies, device-to-host copies, synchronisations (the shadow <cuda_runtime.h>).
  m.def("host_call_counts() -> int[]", [] {
    using pyssl::emu::HostCall;
    return std::vector<int64_t>{pyssl::emu::host_call_count(HostCall::kHostToDeviceCopy),
                                pyssl::emu::host_call_count(HostCall::kDeviceToHostCopy),
                                pyssl::emu::host_call_count(HostCall::kSynchronize)};
  });
  m.def("torch_version() -> str", [] { return std::string(PYSSL_TORCH_VERSION); });
  m.def("sm_count() -> int", [] { return static_cast<int64_t>(pyssl::emu::limits().sm_count); });
}
