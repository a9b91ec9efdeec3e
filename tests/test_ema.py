"""Momentum EMA over tensor lists (one pass over all tensors) and the cosine momentum schedule."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyssl
from pyssl import reference
from pyssl.momentum import cosine_schedule, update_momentum


def ref_ema(ema, online, m):
    return reference.ema([e.double() for e in ema], [o.double() for o in online], m)


TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
}


def check(ema_after, expected):
    for e, w in zip(ema_after, expected):
        torch.testing.assert_close(e.double(), w, **TOL[e.dtype])


SHAPES = [(3,), (5, 7), (0,), (2, 0, 3), (), (40000,), (3, 65, 129)]  # incl. > one 32 Ki chunk


@pytest.mark.parametrize("m", [0.0, 0.5, 0.996, 1.0])
def test_ema_matches_reference(m):
    ema = [torch.randn(s) for s in SHAPES]
    online = [torch.randn(s) for s in SHAPES]
    expected = ref_ema(ema, online, m)
    pyssl.ops.ema_update_(ema, online, m)
    check(ema, expected)
    if m == 0.0:
        assert all(torch.equal(e, o) for e, o in zip(ema, online))


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("online_dtype", DTYPES)
def test_ema_mixed_dtypes(ema_dtype, online_dtype):
    ema = [torch.randn(s).to(ema_dtype) for s in SHAPES]
    online = [torch.randn(s).to(online_dtype) for s in SHAPES]
    expected = ref_ema(ema, online, 0.9)
    pyssl.ops.ema_update_(ema, online, 0.9)
    assert all(e.dtype == ema_dtype for e in ema)
    check(ema, expected)


def test_ema_mixed_dtypes_within_lists():
    ema = [torch.randn(100), torch.randn(50, dtype=torch.float64), torch.randn(70).bfloat16()]
    online = [torch.randn(100).bfloat16(), torch.randn(50).half(), torch.randn(70)]
    expected = ref_ema(ema, online, 0.7)
    pyssl.ops.ema_update_(ema, online, 0.7)
    check(ema, expected)


def test_ema_non_contiguous():
    base_e = torch.randn(30, 40)
    ema = [
        base_e.t(),  # transposed (non-contiguous), paired with a contiguous tensor
        torch.randn(20, 30)[::2],  # strided rows
        torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last),  # same dense permutation
        torch.randn(4, 5).t(),  # same transposed layout on both sides
    ]
    online = [
        torch.randn(40, 30),
        torch.randn(30, 10).t(),
        torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last),
        torch.randn(4, 5).t(),
    ]
    expected = ref_ema(ema, online, 0.8)
    untouched = base_e.clone()
    pyssl.ops.ema_update_(ema, online, 0.8)
    check(ema, expected)
    assert ema[0].data_ptr() == base_e.data_ptr() and not torch.equal(base_e, untouched)  # in place


def test_ema_many_small_tensors():
    ema = [torch.randn(i % 7 + 1) for i in range(1000)]
    online = [torch.randn(i % 7 + 1) for i in range(1000)]
    expected = ref_ema(ema, online, 0.99)
    pyssl.ops.ema_update_(ema, online, 0.99)
    check(ema, expected)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 70000), min_size=0, max_size=6),
    m=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_ema_property(sizes, m, seed):
    g = torch.Generator().manual_seed(seed)
    ema = [torch.randn(n, generator=g) for n in sizes]
    online = [torch.randn(n, generator=g) for n in sizes]
    expected = ref_ema(ema, online, m)
    pyssl.ops.ema_update_(ema, online, m)
    check(ema, expected)


def test_ema_opcheck():
    ema = [torch.randn(3, 4), torch.randn(5)]
    online = [torch.randn(3, 4), torch.randn(5)]
    torch.library.opcheck(torch.ops.pyssl.ema_update_.default, (ema, online, 0.9))


def test_ema_on_parameters_requiring_grad():
    model = nn.Linear(4, 3)
    ema_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    expected = ref_ema(list(ema_model.parameters()), list(model.parameters()), 0.5)
    update_momentum(ema_model, model, 0.5)
    check(list(ema_model.parameters()), expected)
    assert all(p.requires_grad for p in ema_model.parameters())


def test_ema_bad_input():
    a, b = [torch.randn(3)], [torch.randn(3)]
    with pytest.raises(ValueError, match="same length"):
        pyssl.ops.ema_update_(a, b + b, 0.5)
    with pytest.raises(ValueError, match="shape"):
        pyssl.ops.ema_update_(a, [torch.randn(4)], 0.5)
    with pytest.raises(ValueError, match="on meta"):
        pyssl.ops.ema_update_(a, [torch.randn(3, device="meta")], 0.5)
    for m in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="momentum"):
            pyssl.ops.ema_update_(a, b, m)
    with pytest.raises(TypeError, match="momentum"):
        pyssl.ops.ema_update_(a, b, "0.9")
    with pytest.raises(TypeError, match="floating"):
        pyssl.ops.ema_update_([torch.zeros(3, dtype=torch.long)], b, 0.5)
    with pytest.raises(TypeError, match="online\\[0\\]"):
        pyssl.ops.ema_update_(a, [[1.0, 2.0, 3.0]], 0.5)
    with pytest.raises(ValueError, match="parameters"):
        update_momentum(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)
    with pytest.raises(RuntimeError, match="momentum must be in"):
        torch.ops.pyssl.ema_update_(a, b, 2.0)
    pyssl.ops.ema_update_([], [], 0.5)  # empty lists: nothing to do


# ---- module helper against lightly -----------------------------------------------------------


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def test_update_momentum_matches_lightly():
    utils = pytest.importorskip("lightly.models.utils")
    model = small_net()
    ours, theirs = small_net(), small_net()
    theirs.load_state_dict(ours.state_dict())
    for m in (0.99, 0.5, 0.0):
        update_momentum(ours, model, m)
        utils.update_momentum(model, theirs, m)  # lightly: (model, model_ema, m)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_update_momentum_copy_buffers():
    model, ema_model = small_net(), small_net()
    model.train()(torch.randn(4, 3, 8, 8))  # moves BatchNorm statistics
    update_momentum(ema_model, model, 0.9)
    assert not torch.equal(ema_model[1].running_mean, model[1].running_mean)
    update_momentum(ema_model, model, 0.9, copy_buffers=True)
    for a, b in zip(ema_model.buffers(), model.buffers()):
        assert torch.equal(a, b)


def test_update_momentum_mixed_precision_model():
    model = small_net().to(torch.bfloat16)
    ema_model = small_net()  # float32 EMA of a bfloat16 model
    expected = ref_ema(list(ema_model.parameters()), list(model.parameters()), 0.999)
    update_momentum(ema_model, model, 0.999)
    check(list(ema_model.parameters()), expected)


def test_cosine_schedule_matches_lightly():
    scheduler = pytest.importorskip("lightly.utils.scheduler")
    for step, max_steps, period in [
        (0, 100, None),
        (37, 100, None),
        (99, 100, None),
        (5, 1, None),
        (0, 0, None),
        (13, 100, 40),
        (200, 100, 30),
    ]:
        ours = cosine_schedule(step, max_steps, 0.996, 1.0, period)
        theirs = scheduler.cosine_schedule(step, max_steps, 0.996, 1.0, period)
        assert ours == pytest.approx(theirs, rel=1e-15, abs=1e-15)
    assert cosine_schedule(0, 10, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_schedule(9, 10, 0.99, 1.0) == 1.0
    assert cosine_schedule(5, 11, 0.0, 1.0) == pytest.approx(0.5)
    assert math.isclose(cosine_schedule(3, 7, 2.0, 2.0), 2.0)
    with pytest.raises(ValueError, match="step"):
        cosine_schedule(-1, 10, 0.9, 1.0)
    with pytest.raises(ValueError, match="max_steps"):
        cosine_schedule(1, -10, 0.9, 1.0)
    with pytest.raises(ValueError, match="period"):
        cosine_schedule(1, 10, 0.9, 1.0, period=0)
    with pytest.warns(RuntimeWarning):
        cosine_schedule(11, 10, 0.9, 1.0)


# ---- CUDA against the CPU kernel ---------------------------------------------------------------


@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16])
def test_ema_cuda_matches_cpu(backend, ema_dtype, online_dtype):
    big = 1_000_003 if not backend.emulated else 100_003  # > 6 chunks of 16 Ki either way
    shapes = SHAPES + [(big,), (7, 1, 0)] + [(i % 13 + 1,) for i in range(3000)]
    ema = [torch.randn(s).to(ema_dtype) for s in shapes]
    online = [torch.randn(s).to(online_dtype) for s in shapes]
    ema_gpu = [backend.to(e.clone()) for e in ema]
    online_gpu = [backend.to(o) for o in online]
    pyssl.ops.ema_update_(ema, online, 0.99)
    with backend:
        pyssl.ops.ema_update_(ema_gpu, online_gpu, 0.99)
    for a, b in zip(ema_gpu, ema):
        torch.testing.assert_close(a.cpu(), b, **TOL[ema_dtype])


def test_ema_cuda_non_contiguous_and_models(backend):
    dev = backend.device
    ema = [
        torch.randn(30, 40, device=dev).t(),
        torch.randn(2, 3, 8, 8, device=dev).to(memory_format=torch.channels_last),
    ]
    online = [
        torch.randn(40, 30, device=dev),
        torch.randn(2, 3, 8, 8, device=dev).to(memory_format=torch.channels_last),
    ]
    expected = ref_ema(ema, online, 0.3)
    with backend:
        pyssl.ops.ema_update_(ema, online, 0.3)
    check(ema, expected)
    model, ema_model = small_net().to(dev), small_net().to(dev)
    expected = ref_ema(list(ema_model.parameters()), list(model.parameters()), 0.9)
    with backend:
        update_momentum(ema_model, model, 0.9)
    check(list(ema_model.parameters()), expected)


# The CUDA launcher passes its table of tensors by value, as a kernel argument (168 tensors a
# launch, csrc/ema/cuda/ema_cuda.cu): no host-to-device copy, so the update can be captured in a
# CUDA graph; longer lists take one launch per group of 168.
EMA_GROUP = 168


def ema_lists_over_groups(count):
    """`count` tensor pairs cycling through every (ema, online) dtype pair, with empty tensors,
    scalars and tensors on both sides of a 16 Ki-element chunk boundary among them."""
    sizes = [(3,), (0,), (16384,), (16385,), (), (2, 0), (32768 + 7,), (5, 7)]
    ema, online = [], []
    for i in range(count):
        shape = sizes[i % len(sizes)] if i % 3 == 0 else (i % 11 + 1,)
        ema.append(torch.randn(shape).to(DTYPES[i % 4]))
        online.append(torch.randn(shape).to(DTYPES[(i // 4) % 4]))
    return ema, online


@pytest.mark.parametrize("count", [1, EMA_GROUP, EMA_GROUP + 1, 3 * EMA_GROUP + 5])
def test_ema_cuda_groups_match_cpu(backend, count):
    ema, online = ema_lists_over_groups(count)
    expected = ref_ema(ema, online, 0.9)
    ema_dev = [backend.to(e.clone()) for e in ema]
    online_dev = [backend.to(o) for o in online]
    pyssl.ops.ema_update_(ema, online, 0.9)  # the CPU kernel
    with backend:
        pyssl.ops.ema_update_(ema_dev, online_dev, 0.9)
    check(ema_dev, expected)
    for a, b in zip(ema_dev, ema):
        assert a.dtype == b.dtype and a.shape == b.shape
        if backend.emulated:  # the same float operations in the same order (no FMA on either)
            assert torch.equal(a.cpu(), b), (a.dtype, a.shape)
        else:  # nvcc may contract keep * e + take * o into an FMA
            torch.testing.assert_close(a.cpu(), b, **TOL[a.dtype])


@pytest.mark.emulated
@pytest.mark.parametrize(
    "count,launches", [(1, 1), (150, 1), (EMA_GROUP, 1), (EMA_GROUP + 1, 2), (3 * EMA_GROUP + 5, 4)]
)
def test_ema_emulated_launches_without_host_copies(count, launches):
    emu = pytest.importorskip("pyssl.emulation")
    if not emu.available():
        pytest.skip("pyssl was built without its CUDA emulator")
    ema = [torch.randn(i % 5 + 1) for i in range(count)]
    online = [torch.randn(i % 5 + 1) for i in range(count)]
    expected = ref_ema(ema, online, 0.5)
    before = emu.launch_count()
    with emu.count_host_calls() as calls:
        emu.ops().ema_update_(ema, online, 0.5)
    assert emu.launch_count() - before == launches
    assert calls.host_to_device == 0 and calls.syncs == 0, calls
    check(ema, expected)


@pytest.mark.cuda
def test_ema_cuda_graph_capture():
    if not torch.cuda.is_available() or not pyssl.cuda_kernels_built:
        pytest.skip("needs a CUDA device and pyssl built with CUDA kernels")
    ema = [torch.randn(i % 7 + 1, device="cuda") for i in range(2 * EMA_GROUP + 3)]
    online = [torch.randn(i % 7 + 1, device="cuda") for i in range(2 * EMA_GROUP + 3)]
    start = [e.clone() for e in ema]
    pyssl.ops.ema_update_(ema, online, 0.9)  # warm-up outside the capture
    for e, s in zip(ema, start):
        e.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pyssl.ops.ema_update_(ema, online, 0.9)
    for e, s in zip(ema, start):
        e.copy_(s)
    expected = ref_ema(ema, online, 0.9)
    graph.replay()
    torch.cuda.synchronize()
    check(ema, expected)
