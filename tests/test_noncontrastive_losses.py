"""Negative cosine similarity, Barlow Twins and VICReg against float64 references written the
direct d x d way and against lightly's modules of the same names, through both routes (the
d x d matrix for d <= N, the N x N Gram matrices for d > N), with gradients, in fp16/bf16, on
bad input, across two Gloo ranks, and a check that the Gram route never allocates d x d."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import pyssl.losses.noncontrastive as nc
from pyssl import distributed
from pyssl.losses import BarlowTwinsLoss, NegativeCosineSimilarity, VICRegLoss
from pyssl.losses.noncontrastive import (
    barlow_twins_loss_reference,
    negative_cosine_similarity_reference,
    vicreg_loss_reference,
)

lightly_loss = pytest.importorskip("lightly.loss")

F64 = dict(rtol=1e-9, atol=1e-10)
# float32 against float64 (or lightly's float32): the losses are sums of O(d) and O(d^2 / N)
# terms, each rounded once, so a relative tolerance carries the scale.
F32 = dict(rtol=2e-5, atol=1e-5)
SEEDS = [0, 1, 2]
# (N, d): d < N takes the d x d route, d > N the Gram route; d == N is the boundary (d x d).
SHAPES = [(32, 8), (8, 48), (12, 12), (2, 5), (5, 1)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: a second OpenMP thread only adds a wait at every op for a
    # thread the shared CPU may have descheduled (it made this file several times slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def views(n, d, *, seed, dtype=torch.float64, scale=1.0, shift=0.0, correlated=True):
    """Two views of one batch: the second a noisy copy of the first, so the cross-correlation
    is far from 0 (the regime the losses train towards), plus a per-feature shift."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if correlated:
        b = a + 0.5 * b
    offset = shift * torch.randn(d, generator=gen, dtype=torch.float64)
    a, b = scale * a + offset, scale * b + offset
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


def standardised(z):
    return F.batch_norm(z, None, None, training=True)


def barlow_route(z_a, z_b, lambda_param, gram):
    return nc._barlow_twins(standardised(z_a), standardised(z_b), lambda_param, gram=gram)


def vicreg_route(z_a, z_b, gram, lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4):
    var_a, cov_a = nc._variance_covariance(z_a[:, None], eps, gram=gram)
    var_b, cov_b = nc._variance_covariance(z_b[:, None], eps, gram=gram)
    invariance = F.mse_loss(z_a, z_b)
    return lambda_param * invariance + mu_param * 0.5 * (var_a + var_b) + nu_param * (cov_a + cov_b)


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def assert_all_close(actual, expected, **tol):
    for x, y in zip(actual, expected, strict=True):
        torch.testing.assert_close(x.double(), y.double(), **tol)


# ---- float64 references, both routes ------------------------------------------------------------


@pytest.mark.parametrize("gram", [False, True], ids=["dxd", "gram"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_barlow_twins_routes_match_the_reference(n, d, gram):
    z_a, z_b = views(n, d, seed=n * 100 + d)
    got = barlow_route(z_a, z_b, 5e-3, gram)
    expected = barlow_twins_loss_reference(z_a, z_b, 5e-3)
    torch.testing.assert_close(got, expected, **F64)
    assert_all_close(grads(got, z_a, z_b), grads(expected, z_a, z_b), **F64)


@pytest.mark.parametrize("gram", [False, True], ids=["dxd", "gram"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_vicreg_routes_match_the_reference(n, d, gram):
    z_a, z_b = views(n, d, seed=n * 100 + d, scale=0.7, shift=3.0)
    got = vicreg_route(z_a, z_b, gram)
    expected = vicreg_loss_reference(z_a, z_b)
    torch.testing.assert_close(got, expected, **F64)
    assert_all_close(grads(got, z_a, z_b), grads(expected, z_a, z_b), **F64)


@pytest.mark.parametrize("n,d", SHAPES)
def test_modules_match_the_references_in_float64(n, d):
    z_a, z_b = views(n, d, seed=7 + n + d)
    torch.testing.assert_close(BarlowTwinsLoss(0.01)(z_a, z_b), barlow_twins_loss_reference(z_a, z_b, 0.01), **F64)
    torch.testing.assert_close(
        VICRegLoss(2.0, 3.0, 0.5, eps=1e-3)(z_a, z_b), vicreg_loss_reference(z_a, z_b, 2.0, 3.0, 0.5, 1e-3), **F64
    )
    torch.testing.assert_close(NegativeCosineSimilarity()(z_a, z_b), negative_cosine_similarity_reference(z_a, z_b))


def test_the_route_is_chosen_by_d_against_n(monkeypatch):
    taken = []
    real = nc._barlow_twins

    def spy(a, b, lambda_param, gram=None):
        taken.append(a.shape[1] > a.shape[0] if gram is None else gram)
        return real(a, b, lambda_param, gram)

    monkeypatch.setattr(nc, "_barlow_twins", spy)
    for n, d in [(16, 15), (16, 16), (16, 17)]:
        BarlowTwinsLoss()(*views(n, d, seed=0))
    assert taken == [False, False, True]


# ---- parity with lightly --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,d", [(64, 16), (16, 64), (24, 24), (8, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_barlow_twins_matches_lightly(n, d, seed, dtype):
    z_a, z_b = views(n, d, seed=seed, dtype=dtype, scale=2.0, shift=1.0)
    for lambda_param in (5e-3, 0.1):
        got = BarlowTwinsLoss(lambda_param)(z_a, z_b)
        expected = lightly_loss.BarlowTwinsLoss(lambda_param)(z_a, z_b)
        assert got.dtype == expected.dtype == dtype
        tol = F64 if dtype == torch.float64 else F32
        torch.testing.assert_close(got, expected, **tol)
        assert_all_close(grads(got, z_a, z_b), grads(expected, z_a, z_b), **tol)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (24, 24), (8, 256), (6, 3, 20), (10, 2, 2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vicreg_matches_lightly(shape, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    z_a = (torch.randn(shape, generator=gen, dtype=dtype) * 0.8 + 0.3).requires_grad_()
    z_b = (z_a.detach() + 0.5 * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
    for args in [(), (10.0, 5.0, 2.0, False, 1e-3)]:
        got = VICRegLoss(*args)(z_a, z_b)
        expected = lightly_loss.VICRegLoss(*args)(z_a, z_b)
        assert got.dtype == expected.dtype == dtype
        tol = F64 if dtype == torch.float64 else F32
        torch.testing.assert_close(got, expected, **tol)
        assert_all_close(grads(got, z_a, z_b), grads(expected, z_a, z_b), **tol)


@pytest.mark.parametrize(
    "shape0,shape1,dim",
    [((16, 32), (16, 32), 1), ((16, 32), (16, 32), 0), ((16, 32), (1, 32), 1), ((4, 8, 5),) * 2 + (1,)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negative_cosine_similarity_matches_lightly(shape0, shape1, dim, dtype):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape0, generator=gen, dtype=dtype).requires_grad_()
    x1 = torch.randn(shape1, generator=gen, dtype=dtype).requires_grad_()
    for eps in (1e-8, 0.5):
        got = NegativeCosineSimilarity(dim, eps)(x0, x1)
        expected = lightly_loss.NegativeCosineSimilarity(dim, eps)(x0, x1)
        assert got.dtype == expected.dtype == dtype
        torch.testing.assert_close(got, expected)
        assert_all_close(grads(got, x0, x1), grads(expected, x0, x1))


def test_negative_cosine_similarity_of_a_detached_target():
    x0, x1 = views(8, 16, seed=4)
    NegativeCosineSimilarity()(x0, x1.detach()).backward()
    assert x0.grad is not None and x1.grad is None


# ---- gradcheck --------------------------------------------------------------------------------


@pytest.mark.parametrize("gram", [False, True], ids=["dxd", "gram"])
@pytest.mark.parametrize("n,d", [(6, 3), (3, 7), (4, 4)])
def test_gradcheck_both_routes(n, d, gram):
    z_a, z_b = views(n, d, seed=n + d)
    assert torch.autograd.gradcheck(lambda a, b: barlow_route(a, b, 0.3, gram), (z_a, z_b))
    # scale 0.5: every standard deviation is below 1, clear of the variance hinge's kink
    z_a, z_b = views(n, d, seed=n + d, scale=0.5, correlated=False)
    assert torch.autograd.gradcheck(lambda a, b: vicreg_route(a, b, gram, 2.0, 3.0, 0.5), (z_a, z_b))


def test_gradcheck_modules():
    for n, d in [(6, 3), (3, 7)]:
        z_a, z_b = views(n, d, seed=n * d, scale=0.5, correlated=False)
        assert torch.autograd.gradcheck(BarlowTwinsLoss(0.2), (z_a, z_b))
        assert torch.autograd.gradcheck(VICRegLoss(), (z_a, z_b))
        assert torch.autograd.gradcheck(NegativeCosineSimilarity(), (z_a, z_b))
    z_a = torch.randn(4, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    z_b = torch.randn(4, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.5
    assert torch.autograd.gradcheck(VICRegLoss(), (z_a.requires_grad_(), z_b.requires_grad_()))


# ---- property test -------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 20),
    d=st.integers(1, 40),
    log_scale=st.floats(-2, 2),
    shift=st.sampled_from([0.0, 1.0, 100.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_routes_agree_with_the_references(n, d, log_scale, shift, seed):
    z_a, z_b = views(n, d, seed=seed, scale=10.0**log_scale, shift=shift)
    bt = barlow_twins_loss_reference(z_a, z_b, 0.05)
    vic = vicreg_loss_reference(z_a, z_b)
    # the Gram route's off-diagonal sum is a difference: its error is relative to the whole
    # Frobenius norm, hence an absolute tolerance of the scale of the terms it is formed from
    bt_scale = d + d * d / n
    vic_scale = 25.0 + (10.0**log_scale) ** 4 * d * (1 + d / n)
    for gram in (False, True):
        torch.testing.assert_close(barlow_route(z_a, z_b, 0.05, gram), bt, rtol=1e-9, atol=1e-12 * bt_scale)
        torch.testing.assert_close(vicreg_route(z_a, z_b, gram), vic, rtol=1e-9, atol=1e-12 * vic_scale)
    torch.testing.assert_close(BarlowTwinsLoss(0.05)(z_a, z_b), bt, rtol=1e-9, atol=1e-12 * bt_scale)
    torch.testing.assert_close(VICRegLoss()(z_a, z_b), vic, rtol=1e-9, atol=1e-12 * vic_scale)
    # float32 inputs: computed in float32, close to the float64 loss of the rounded inputs
    a32, b32 = z_a.detach().float(), z_b.detach().float()
    bt32 = barlow_twins_loss_reference(a32, b32, 0.05)
    torch.testing.assert_close(BarlowTwinsLoss(0.05)(a32, b32).double(), bt32, rtol=1e-4, atol=1e-5 * bt_scale)
    vic32 = vicreg_loss_reference(a32, b32)
    torch.testing.assert_close(VICRegLoss()(a32, b32).double(), vic32, rtol=1e-4, atol=1e-5 * vic_scale)


# ---- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(32, 8), (8, 48)])
def test_half_precision_is_computed_in_float32_and_returned_in_the_input_dtype(dtype, n, d):
    z_a, z_b = views(n, d, seed=5, dtype=dtype)
    cases = [
        (BarlowTwinsLoss(), lightly_loss.BarlowTwinsLoss(), barlow_twins_loss_reference),
        (VICRegLoss(), lightly_loss.VICRegLoss(), vicreg_loss_reference),
        (NegativeCosineSimilarity(), lightly_loss.NegativeCosineSimilarity(), negative_cosine_similarity_reference),
    ]
    for ours, theirs, reference in cases:
        got = ours(z_a, z_b)
        assert got.dtype == theirs(z_a, z_b).dtype == dtype  # lightly returns the input dtype too
        # exact up to rounding the result to the input dtype (lightly's own rounding is coarser)
        expected = reference(z_a, z_b)
        torch.testing.assert_close(got.double(), expected, rtol=torch.finfo(dtype).eps, atol=1e-3)
        grad_a, grad_b = grads(got, z_a, z_b)
        assert grad_a.dtype == grad_b.dtype == dtype


def test_autocast_leaves_the_loss_in_float32():
    z_a, z_b = views(16, 64, seed=6, dtype=torch.float32)
    for loss_fn in (BarlowTwinsLoss(), VICRegLoss(), NegativeCosineSimilarity()):
        plain = loss_fn(z_a, z_b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = loss_fn(z_a, z_b)
        assert autocast.dtype == torch.float32
        torch.testing.assert_close(autocast, plain)


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [BarlowTwinsLoss(), VICRegLoss()], ids=["barlow", "vicreg"])
def test_bad_views(loss_fn):
    good = torch.randn(4, 8)
    with pytest.raises(ValueError, match="z_a and z_b must have the same shape"):
        loss_fn(good, torch.randn(4, 7))
    with pytest.raises(ValueError, match="z_a and z_b must have the same shape"):
        loss_fn(good, torch.randn(5, 8))
    with pytest.raises(ValueError, match="at least 2 rows"):
        loss_fn(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="at least 2 rows"):
        loss_fn(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="no features"):
        loss_fn(torch.randn(4, 0), torch.randn(4, 0))
    with pytest.raises(ValueError, match="z_a must"):
        loss_fn(torch.randn(8), good)
    with pytest.raises(TypeError, match="z_b must be a torch.Tensor"):
        loss_fn(good, good.numpy())
    with pytest.raises(TypeError, match="z_a must be a floating tensor"):
        loss_fn(torch.ones(4, 8, dtype=torch.long), good)


def test_barlow_twins_takes_two_dims_only():
    # lightly's batch norm and transpose do not give Barlow Twins' loss beyond 2-D either
    with pytest.raises(ValueError, match=r"z_a must be 2-D \(batch, dim\)"):
        BarlowTwinsLoss()(torch.randn(4, 2, 8), torch.randn(4, 2, 8))


def test_bad_arguments(monkeypatch):
    with pytest.raises(TypeError, match="lambda_param"):
        BarlowTwinsLoss(lambda_param="0.1")
    with pytest.raises(TypeError, match="mu_param"):
        VICRegLoss(mu_param=None)
    with pytest.raises(ValueError, match="eps"):
        VICRegLoss(eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        NegativeCosineSimilarity(eps=float("nan"))
    with pytest.raises(TypeError, match="dim"):
        NegativeCosineSimilarity(dim=1.0)
    with pytest.raises(ValueError, match="x0 and x1 must have broadcastable shapes"):
        NegativeCosineSimilarity()(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        NegativeCosineSimilarity(dim=2)(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(TypeError, match="x1 must be a floating tensor"):
        NegativeCosineSimilarity()(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.int32))
    monkeypatch.setattr(dist, "is_available", lambda: False)
    for cls in (BarlowTwinsLoss, VICRegLoss):
        with pytest.raises(ValueError, match="gather_distributed is True but torch.distributed is not available"):
            cls(gather_distributed=True)
        cls(gather_distributed=False)


# ---- memory: the Gram route allocates no d x d ---------------------------------------------------


def largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) while ``fn`` runs, from the profiler's
    allocation events (every allocator call, not the net of an op)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    largest, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            largest = max(largest, event.extra_fields.alloc_size)
    return largest


def test_gram_route_allocates_no_d_by_d_matrix():
    n, d = 16, 8192
    z_a, z_b = views(n, d, seed=8, dtype=torch.float32)
    for loss_fn in (BarlowTwinsLoss(), VICRegLoss()):
        largest = largest_allocation(lambda loss_fn=loss_fn: loss_fn(z_a, z_b).backward())
        # the largest are the (N, d) standardised or centred views and their gradients
        assert 0 < largest <= 4 * n * d < 4 * d * d, f"{type(loss_fn).__name__}: {largest} bytes"
    # the probe does see a d x d matrix: lightly's (at a smaller d, to stay quick)
    d = 1024
    z_a, z_b = views(n, d, seed=8, dtype=torch.float32)
    for loss_fn in (lightly_loss.BarlowTwinsLoss(), lightly_loss.VICRegLoss()):
        assert largest_allocation(lambda loss_fn=loss_fn: loss_fn(z_a, z_b).backward()) >= 4 * d * d


# ---- two ranks over Gloo ------------------------------------------------------------------------

WORLD, ROWS = 2, 5


def _entry(rank, fn, port, args):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    try:
        fn(rank, *args)
    finally:
        distributed.shutdown()


def _gathered_worker(rank, inputs_path, out_dir):
    results = []
    for z_a_all, z_b_all in torch.load(inputs_path):
        z_a = z_a_all[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_()
        z_b = z_b_all[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_()
        pairs = [
            (
                BarlowTwinsLoss(0.05, gather_distributed=True),
                lightly_loss.BarlowTwinsLoss(0.05, gather_distributed=True),
            ),
            (VICRegLoss(gather_distributed=True), lightly_loss.VICRegLoss(gather_distributed=True)),
        ]
        for ours, theirs in pairs:
            got, expected = ours(z_a, z_b), theirs(z_a, z_b)
            results.append((got.detach(), expected.detach(), grads(got, z_a, z_b), grads(expected, z_a, z_b)))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs Gloo")
def test_gather_distributed_matches_lightly_on_two_ranks(tmp_path):
    from pyssl.launch import free_port as _free_port

    # d = 4 < 2 x 5 rows: the d x d route; d = 32: the Gram route over the gathered rows
    inputs = [views(WORLD * ROWS, d, seed=d, scale=0.6) for d in (4, 32)]
    torch.save([(a.detach(), b.detach()) for a, b in inputs], tmp_path / "inputs.pt")
    mp.start_processes(
        _entry, args=(_gathered_worker, _free_port(), (str(tmp_path / "inputs.pt"), str(tmp_path))), nprocs=WORLD
    )
    for rank in range(WORLD):
        for got, expected, got_grads, expected_grads in torch.load(tmp_path / f"rank{rank}.pt"):
            torch.testing.assert_close(got, expected, **F64)
            assert_all_close(got_grads, expected_grads, **F64)
