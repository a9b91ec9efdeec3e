// The Python module pyssl._C. Loading it runs the static TORCH_LIBRARY registrations; the
// attributes let pyssl check that the build matches the torch it is imported with.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyssl's compiled operators, registered as torch.ops.pyssl.*";
  m.attr("torch_version") = PYSSL_TORCH_VERSION;
#ifdef PYSSL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
