"""Tolerances of the fused loss kernels against their float64 references, shared by their tests."""

import torch

# Per input dtype: the kernels accumulate in float32 (float64 for float64), so the error is
# set by rounding the inputs and the output to the input dtype.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.float16: dict(rtol=2e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=1e-2),
}


def assert_close(actual, expected, dtype, scale=1.0):
    """``actual`` within the ``dtype`` tolerance of ``expected``; ``scale`` widens the absolute
    part for values of that magnitude."""
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale))


def leaf(shape, dtype=torch.float32, scale=1.0):
    """A fresh random input that requires grad, drawn in float64 then rounded to ``dtype``."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()
