// The operator library torch.ops.pyssl; its schemas are in schemas.h, its kernels register per
// device in csrc/<op>/{cpu,cuda}/.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(pyssl, m) { pyssl::define_schemas(m); }
