"""DINOLoss: lightly's values, gradients and centre updates, a float64 reference and gradcheck,
and no (views x batch x K) tensors; the centre is the mean over all ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightly.loss import DINOLoss as LightlyDINOLoss

from pyssl import distributed
from pyssl.losses import DINOLoss
from pyssl.losses.dino import dino_loss_reference


def _views(n, batch, k, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, k, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("teachers,students", [(2, 2), (2, 6), (1, 3), (2, 1), (3, 3)])
@pytest.mark.parametrize("kwargs", [{}, {"epoch": 3}, {"teacher_temp": 0.07}])
def test_values_gradients_and_centre_match_lightly(teachers, students, kwargs):
    k, batch = 64, 8
    ours, theirs = (
        DINOLoss(output_dim=k, warmup_teacher_temp_epochs=10),
        LightlyDINOLoss(k, warmup_teacher_temp_epochs=10),
    )
    for step in range(3):  # the centre moves between steps
        t = _views(teachers, batch, k, 10 * step)
        s_ours = [v.clone().requires_grad_() for v in _views(students, batch, k, 10 * step + 5)]
        s_theirs = [v.detach().clone().requires_grad_() for v in s_ours]
        a, b = ours(t, s_ours, **kwargs), theirs(t, s_theirs, **kwargs)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        a.backward(), b.backward()
        for x, y in zip(s_ours, s_theirs):  # both in float32, summed in other orders: a float32 tolerance
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6 * float(y.grad.abs().max()))
        torch.testing.assert_close(ours.center, theirs.center, rtol=1e-6, atol=1e-7)


def test_float64_reference_and_gradcheck():
    k, batch = 10, 3
    loss = DINOLoss(output_dim=k, student_temp=0.3, teacher_temp=0.2, center_momentum=0.5)
    loss.center.copy_(torch.randn(1, 1, k))
    center = loss.center.clone()
    t = _views(2, batch, k, 1, dtype=torch.float64)
    s = [v.requires_grad_() for v in _views(4, batch, k, 2, dtype=torch.float64)]
    got = loss(t, s)
    torch.testing.assert_close(got, dino_loss_reference(t, s, center, 0.2, 0.3), rtol=1e-12, atol=1e-12)
    loss.center_momentum = 1.0  # keep the centre fixed while gradcheck calls the loss again and again
    assert torch.autograd.gradcheck(lambda *xs: loss(t, list(xs)), tuple(s))


def test_half_precision_inputs_are_computed_in_float32():
    t = _views(2, 4, 32, 3, dtype=torch.bfloat16)
    s = _views(3, 4, 32, 4, dtype=torch.bfloat16)
    got = DINOLoss(output_dim=32)(t, s)
    expected = dino_loss_reference([v.double() for v in t], [v.double() for v in s], torch.zeros(1, 1, 32), 0.04, 0.1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2)


def test_no_tensor_of_all_views_is_allocated():
    k, batch, views = 4096, 16, 8
    loss = DINOLoss(output_dim=k)
    t = _views(2, batch, k, 5)
    s = [v.requires_grad_() for v in _views(views, batch, k, 6)]
    one = batch * k * 4
    with torch.profiler.profile(profile_memory=True) as prof:
        loss(t, s).backward()
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert biggest <= 3 * one, (biggest, one)  # a view's softmax, weights, gradient; lightly stacks 10 * one
    with torch.profiler.profile(profile_memory=True) as prof:
        LightlyDINOLoss(k)(t, [v.detach().requires_grad_() for v in s]).backward()
    assert max(e.cpu_memory_usage for e in prof.events()) >= views * one  # the check sees a stack when there is one


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: DINOLoss(8)([torch.zeros(2, 8)], [torch.zeros(2, 7)]), r"student_out\[0\]"),
        (lambda: DINOLoss(8)([torch.zeros(2, 7)], [torch.zeros(2, 7)]), "output_dim is 8"),
        (lambda: DINOLoss(8)([torch.zeros(2, 8)], [torch.zeros(2, 8)]), "at least two views"),
        (lambda: DINOLoss(8)([], [torch.zeros(2, 8)]), "at least one view"),
        (lambda: DINOLoss(8, center_mode="median"), "center_mode"),
        (lambda: DINOLoss(8, student_temp=0), "student_temp"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- two ranks over Gloo ------------------------------------------------------------------------

WORLD, ROWS = 2, 4


def _entry(rank, port, inputs_path, out_dir):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    try:
        loss, centres = DINOLoss(output_dim=16, center_momentum=0.7), []
        for teacher, student in torch.load(inputs_path):
            shard = slice(rank * ROWS, (rank + 1) * ROWS)
            loss([t[shard] for t in teacher], [s[shard] for s in student])
            centres.append(loss.center.clone())
        torch.save(centres, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs Gloo")
def test_the_centre_is_the_mean_over_all_ranks(tmp_path):
    from pyssl.launch import free_port

    # the ranks' shards differ (rank 1's are shifted), so a rank-local mean would differ too
    steps = []
    for step in range(3):
        teacher = [v + torch.arange(WORLD).repeat_interleave(ROWS)[:, None] for v in _views(2, WORLD * ROWS, 16, step)]
        steps.append((teacher, _views(4, WORLD * ROWS, 16, 100 + step)))
    torch.save(steps, tmp_path / "inputs.pt")
    mp.start_processes(_entry, args=(free_port(), str(tmp_path / "inputs.pt"), str(tmp_path)), nprocs=WORLD)
    whole = DINOLoss(output_dim=16, center_momentum=0.7)
    for step, (teacher, student) in enumerate(steps):
        whole(teacher, student)  # one process, the whole batch
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"rank{rank}.pt")[step]
            torch.testing.assert_close(got, whole.center, rtol=1e-6, atol=1e-6)
