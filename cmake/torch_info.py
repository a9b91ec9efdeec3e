"""Print CMake `set()` lines describing the torch installation this Python sees.

find_package(Torch) is avoided on purpose: with the CUDA wheels it looks for nvrtc/cuBLAS
libraries that a plain CUDA toolkit install may lack; the extension needs only headers and
the c10/torch libraries.
"""

import os
import sys

import torch


def cmake_list(paths):
    return ";".join(p.replace("\\", "/") for p in paths)


torch_dir = os.path.dirname(torch.__file__)
include_dirs = [
    os.path.join(torch_dir, "include"),
    os.path.join(torch_dir, "include", "torch", "csrc", "api", "include"),
]
# Headers of the pip CUDA packages (cusparse.h, cublas.h, ...) that some torch CUDA headers include.
for entry in sys.path:
    for sub in ("cu13", "cu12"):
        candidate = os.path.join(entry, "nvidia", sub, "include")
        if os.path.isdir(candidate):
            include_dirs.append(candidate)

print(f'set(TORCH_INCLUDE_DIRS "{cmake_list(include_dirs)}")')
print(f'set(TORCH_LIBRARY_DIR "{os.path.join(torch_dir, "lib")}")')
print(f'set(TORCH_VERSION_STRING "{torch.__version__}")')
print(f'set(TORCH_CUDA_VERSION "{torch.version.cuda or ""}")')
print(f"set(TORCH_CXX11_ABI {int(torch._C._GLIBCXX_USE_CXX11_ABI)})")
