"""The fake kernels check shapes as the C++ kernels do: a traced program with a wrong shape fails
while it is traced, with the kernel's message, instead of producing a wrongly shaped graph."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pyssl  # noqa: F401 - registers the ops and their fakes

ops = torch.ops.pyssl


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: ops.ntxent_forward(torch.empty(3, 8), 0.5), "even number >= 2"),
        (lambda: ops.ntxent_forward(torch.empty(4), 0.5), "must be 2-D"),
        (
            lambda: ops.ntxent_backward(torch.empty(()), torch.empty(4, 8), torch.empty(3), 0.5),
            r"lse must have shape \(4,\)",
        ),
        (lambda: ops.infonce_forward(torch.empty(4, 8), torch.empty(4, 7), torch.empty(()), False), "same dim"),
        (
            lambda: ops.infonce_forward(torch.empty(4, 8), torch.empty(3, 8), torch.empty(()), False),
            "one key per query",
        ),
        (lambda: ops.infonce_forward(torch.empty(4, 8), torch.empty(5, 8), torch.empty(()), True), "same batch size"),
        (
            lambda: ops.moco_forward(torch.empty(4, 8), torch.empty(4, 8), torch.empty(16, 7), 0.2),
            r"queue must have shape",
        ),
        (lambda: ops.ema_update_([torch.empty(3)], [torch.empty(4)], 0.9), r"ema\[0\] and online\[0\] differ"),
        (lambda: ops.augment_draw_crops(torch.empty(4, 6), 8, 8, 0.2, 1.0, 0.75, 1.33), "4 \\* attempts"),
    ],
)
def test_a_fake_kernel_refuses_the_shapes_its_kernel_refuses(call, message):
    with FakeTensorMode(), pytest.raises(RuntimeError, match=message):
        call()


def test_a_fake_kernel_gives_the_kernels_output_shapes():
    with FakeTensorMode():
        loss, lse = ops.ntxent_forward(torch.empty(6, 8), 0.5)
        assert loss.shape == () and lse.shape == (6,)
        loss, row, col = ops.infonce_forward(torch.empty(4, 8), torch.empty(4, 8), torch.empty(()), True)
        assert row.shape == (4,) and col.shape == (4,)
        loss, lse, expected = ops.moco_forward(torch.empty(4, 8), torch.empty(4, 8), torch.empty(0, 8), 0.2)
        assert lse.shape == (4,) and expected.shape == (4, 8)
