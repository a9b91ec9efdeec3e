"""Run by `make check-cpu-build`: the CPU-only build installed in .venv-cpu loads and computes.

PYSSL_SMOKE_TORCH=cpu-only (the default): built against a CPU-only torch. =borrowed: no CPU-only
torch could be installed, so it was built with PYSSL_CUDA=OFF against .venv's torch.
"""

import os

import torch
import torch.nn.functional as F

import pyssl

if os.environ.get("PYSSL_SMOKE_TORCH", "cpu-only") == "cpu-only":
    assert torch.version.cuda is None, f"expected a CPU-only torch, got CUDA {torch.version.cuda}"
else:
    print(f"no CPU-only torch: checking the PYSSL_CUDA=OFF build against torch {torch.__version__}")
# The installed build, not the source tree or an editable install of it.
assert "site-packages" in pyssl.__file__, f"pyssl imported from {pyssl.__file__}"
assert pyssl.extension_loaded, f"the CPU-only build did not load: {pyssl._extension.missing_reason}"
assert not pyssl.cuda_kernels_built, "a CPU-only build must not get CUDA kernels"

z0 = torch.randn(33, 16, dtype=torch.float64, requires_grad=True)
z1 = torch.randn(33, 16, dtype=torch.float64, requires_grad=True)
loss = pyssl.losses.NTXentLoss(temperature=0.3)(z0, z1)
loss.backward()

z = F.normalize(torch.cat([z0, z1]).detach(), dim=1)
logits = (z @ z.T / 0.3).fill_diagonal_(float("-inf"))
target = torch.cat([torch.arange(33, 66), torch.arange(0, 33)])
reference = F.cross_entropy(logits, target)
assert torch.allclose(loss.detach(), reference, rtol=1e-10, atol=1e-12), (loss, reference)
assert torch.isfinite(z0.grad).all()
print(f"CPU-only build OK: torch {torch.__version__}, NT-Xent {loss.item():.6f} == reference")
