"""MoCo queue loss: fused op against a float64 reference, the module's queue against lightly."""

import copy
import io
import math
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pyssl
from pyssl import reference
from pyssl.losses import MoCoLoss
from tolerances import assert_close, leaf  # noqa: E402

# ---- float64 reference -----------------------------------------------------------------------


def ref_moco(query, key, queue, temperature):
    """Materialised (N, K+1) logits (pyssl.reference) in float64, positive in column 0."""
    return reference.moco(query.double(), key.double(), queue.double(), temperature)


def unit_queue(k, d, dtype=torch.float32):
    return F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1).to(dtype)


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


# (N, K, d): K = 0 (only the positive), K < N, K not a multiple of the 1024-column tile,
# several tiles, odd dims.
SHAPES = [(1, 0, 3), (1, 1, 1), (5, 3, 7), (64, 1000, 16), (33, 2500, 9), (300, 2049, 128)]


@pytest.mark.parametrize("n,k,d", SHAPES)
@pytest.mark.parametrize("temperature", [0.01, 0.07, 0.2, 1.0])
def test_moco_op_matches_reference(n, k, d, temperature):
    query, key, queue = leaf((n, d)), leaf((n, d)), unit_queue(k, d)
    loss = pyssl.ops.moco(query, key, queue, temperature)
    expected = ref_moco(query, key, queue, temperature)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, expected, torch.float32, scale=1 / temperature)
    for g, w in zip(grads(loss, query, key), grads(expected, query, key)):
        assert_close(g, w, torch.float32, scale=1 / temperature)


@pytest.mark.parametrize("temperature", [0.2, 0.005])
def test_moco_unnormalised_queue(temperature):
    # An explicit queue is used as given: large row norms push the logit bound past the
    # unshifted limit and take the running-max path; small ones the unshifted path.
    query, key = leaf((40, 12)), leaf((40, 12))
    for queue in (torch.randn(3000, 12) * 5, torch.randn(3000, 12) * 0.01):
        loss = pyssl.ops.moco(query, key, queue, temperature)
        expected = ref_moco(query, key, queue, temperature)
        assert_close(loss, expected, torch.float32, scale=1 / temperature)
        for g, w in zip(grads(loss, query, key), grads(expected, query, key)):
            assert_close(g, w, torch.float32, scale=5 / temperature)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_moco_dtypes(dtype, queue_dtype):
    query, key, queue = leaf((50, 32), dtype), leaf((50, 32), dtype), unit_queue(1500, 32, queue_dtype)
    loss = pyssl.ops.moco(query, key, queue, 0.1)
    expected = ref_moco(query, key, queue, 0.1)
    assert loss.dtype == dtype
    tol_dtype = dtype if dtype != torch.float64 or queue_dtype == torch.float64 else torch.float32
    assert_close(loss, expected, tol_dtype, scale=10)
    for g, w, t in zip(grads(loss, query, key), grads(expected, query, key), (query, key)):
        assert g.dtype == t.dtype
        assert_close(g, w, tol_dtype, scale=10)


def test_moco_gradcheck():
    query = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    key = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    queue = unit_queue(9, 5, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k: pyssl.ops.moco(q, k, queue, 0.3), (query, key))
    # the running-max path (logit bound 1/T = 400 > the unshifted limit)
    assert torch.autograd.gradcheck(lambda q, k: pyssl.ops.moco(q, k, queue, 0.0025), (query, key))


def test_moco_small_temperature_bf16_finite():
    query, key, queue = (
        leaf((20, 16), torch.bfloat16),
        leaf((20, 16), torch.bfloat16),
        unit_queue(700, 16, torch.bfloat16),
    )
    loss = pyssl.ops.moco(query, key, queue, 0.01)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads(loss, query, key))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(0, 1300),
    d=st.integers(1, 20),
    temperature=st.sampled_from([0.004, 0.05, 0.2, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_moco_property(n, k, d, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(n, d, dtype=torch.float64, generator=g).requires_grad_()
    key = torch.randn(n, d, dtype=torch.float64, generator=g).requires_grad_()
    queue = F.normalize(torch.randn(k, d, dtype=torch.float64, generator=g), dim=1)
    loss = pyssl.ops.moco(query, key, queue, temperature)
    expected = ref_moco(query, key, queue, temperature)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads(loss, query, key), grads(expected, query, key)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_moco_opcheck():
    query, key, queue = torch.randn(7, 5), torch.randn(7, 5), unit_queue(11, 5)
    torch.library.opcheck(torch.ops.pyssl.moco_forward.default, (query, key, queue, 0.2))
    _, lse, expected_queue = torch.ops.pyssl.moco_forward(query, key, queue, 0.2)
    backward_args = (torch.tensor(1.0), query, key, lse, expected_queue, 0.2)
    torch.library.opcheck(torch.ops.pyssl.moco_backward.default, backward_args)
    torch.library.opcheck(torch.ops.pyssl.moco_backward.default, (*backward_args, [True, False]))
    # The key's gradient left out (MoCo's momentum key): the query's is unchanged, the key's None.
    full = torch.ops.pyssl.moco_backward(*backward_args)
    query_only = torch.ops.pyssl.moco_backward(*backward_args, [True, False])
    assert torch.equal(query_only[0], full[0]) and query_only[1] is None
    query64 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        torch.ops.pyssl.moco_forward.default, (query64, torch.randn(4, 3, dtype=torch.float64), unit_queue(5, 3), 0.5)
    )


# ---- the module: queue as ring buffer --------------------------------------------------------


class RefQueue:
    """lightly's MemoryBankModule write rule: cut at the end, restart at 0."""

    def __init__(self, queue, ptr=0, filled=None):
        self.queue, self.ptr = queue.clone(), ptr
        self.filled = queue.shape[0] if filled is None else filled

    def negatives(self):
        return self.queue[: self.filled].clone()

    def push(self, key):
        size = self.queue.shape[0]
        count = min(key.shape[0], size - self.ptr)
        self.queue[self.ptr : self.ptr + count] = F.normalize(key[:count].detach().double(), dim=1).to(self.queue.dtype)
        self.ptr = (self.ptr + count) % size
        self.filled = min(self.filled + count, size)


@pytest.mark.parametrize("queue_size,batch", [(10, 3), (12, 4), (5, 8), (7, 7), (1, 2)])
@pytest.mark.parametrize("queue_init", ["random", "empty"])
def test_moco_module_queue(queue_size, batch, queue_init):
    d, temperature = 6, 0.3
    loss_fn = MoCoLoss(temperature, queue_size, d, queue_init=queue_init)
    ref = RefQueue(loss_fn.queue, filled=queue_size if queue_init == "random" else 0)
    for _ in range(5):
        query, key = leaf((batch, d)), torch.randn(batch, d)
        expected = ref_moco(query, key, ref.negatives(), temperature)
        loss = loss_fn(query, key)
        ref.push(key)
        # backward after the enqueue overwrote the queue still sees the old negatives
        assert_close(loss, expected, torch.float32)
        assert_close(grads(loss, query)[0], grads(expected, query)[0], torch.float32)
        torch.testing.assert_close(loss_fn.queue, ref.queue.float(), rtol=1e-6, atol=1e-7)
        assert int(loss_fn.queue_ptr) == ref.ptr and int(loss_fn.queue_len) == ref.filled


def test_moco_module_no_update_in_eval():
    loss_fn = MoCoLoss(0.2, 16, 4)
    before = loss_fn.queue.clone()
    with torch.no_grad():
        loss_fn(torch.randn(5, 4), torch.randn(5, 4))
    loss_fn(torch.randn(5, 4, requires_grad=True), torch.randn(5, 4), update=False)
    assert torch.equal(loss_fn.queue, before) and int(loss_fn.queue_ptr) == 0
    loss_fn(torch.randn(5, 4), torch.randn(5, 4), update=True)
    assert not torch.equal(loss_fn.queue, before) and int(loss_fn.queue_ptr) == 5


def test_moco_module_explicit_queue():
    loss_fn = MoCoLoss(0.2, 16, 4)
    before = loss_fn.queue.clone()
    query, key, queue = leaf((5, 4)), torch.randn(5, 4), unit_queue(9, 4)
    loss = loss_fn(query, key, queue=queue)
    assert_close(loss, ref_moco(query, key, queue, 0.2), torch.float32)
    assert torch.equal(loss_fn.queue, before)


def test_moco_module_bf16_queue():
    loss_fn = MoCoLoss(0.2, 100, 8, queue_dtype=torch.bfloat16)
    ref = RefQueue(loss_fn.queue)
    query, key = leaf((30, 8)), torch.randn(30, 8)
    expected = ref_moco(query, key, ref.negatives(), 0.2)
    loss = loss_fn(query, key)
    ref.push(key)
    assert_close(loss, expected, torch.float32)
    assert loss_fn.queue.dtype == torch.bfloat16 and torch.equal(loss_fn.queue, ref.queue)


def test_moco_state_dict_round_trip_and_resume():
    d = 8
    trained = MoCoLoss(0.1, 50, d)
    batches = [(torch.randn(12, d), torch.randn(12, d)) for _ in range(9)]
    for q, k in batches[:4]:
        trained(q.requires_grad_(), k)
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    state = trained.state_dict()
    assert set(state) == {"queue", "queue_ptr", "queue_len"}
    resumed = MoCoLoss(0.1, 50, d)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    assert torch.equal(resumed.queue, trained.queue)
    assert int(resumed.queue_ptr) == int(trained.queue_ptr) == 48
    for q, k in batches[4:]:
        a, b = trained(q.requires_grad_(), k), resumed(q.requires_grad_(), k)
        assert torch.equal(a, b)
    assert torch.equal(resumed.queue, trained.queue) and int(resumed.queue_ptr) == int(trained.queue_ptr)


def test_moco_module_to_dtype():
    loss_fn = MoCoLoss(0.2, 20, 4).to(torch.float64)
    assert loss_fn.queue.dtype == torch.float64 and loss_fn.queue_ptr.dtype == torch.long
    query = leaf((3, 4), torch.float64)
    assert loss_fn(query, torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64


def test_moco_matches_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    d, size, temperature = 16, 100, 0.2
    theirs = lightly_loss.NTXentLoss(temperature=temperature, memory_bank_size=(size, d))
    ours = MoCoLoss(temperature, size, d)
    ours.queue.copy_(theirs.memory_bank.bank)
    for batch in (32, 32, 32, 32, 7, 130):  # 3 full steps, a step cut at the end, batch > queue
        q0 = torch.randn(batch, d)
        k0 = torch.randn(batch, d)
        q1, k1 = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        q2, k2 = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        expected = theirs(q1, k1)
        loss = ours(q2, k2)
        torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-6)
        (expected * 3).backward()
        (loss * 3).backward()
        torch.testing.assert_close(q2.grad, q1.grad, rtol=2e-4, atol=2e-6)
        torch.testing.assert_close(k2.grad, k1.grad, rtol=2e-4, atol=2e-6)
        torch.testing.assert_close(ours.queue, theirs.memory_bank.bank, rtol=1e-6, atol=1e-7)
        assert int(ours.queue_ptr) == int(theirs.memory_bank.bank_ptr)


# ---- bad input -------------------------------------------------------------------------------


def test_moco_bad_input():
    q = torch.randn(4, 8)
    queue = unit_queue(10, 8)
    with pytest.raises(ValueError, match="query and key"):
        pyssl.ops.moco(q, torch.randn(5, 8), queue)
    with pytest.raises(ValueError, match="queue"):
        pyssl.ops.moco(q, q, unit_queue(10, 7))
    with pytest.raises(TypeError, match="queue"):
        pyssl.ops.moco(q, q, torch.zeros(10, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="query"):
        pyssl.ops.moco(q.long(), q, queue)
    with pytest.raises(ValueError, match="temperature"):
        pyssl.ops.moco(q, q, queue, 0.0)
    with pytest.raises(ValueError, match="device"):
        pyssl.ops.moco(q, q, queue.to("meta"))
    with pytest.raises(ValueError, match="NaN"):
        pyssl.ops.moco(q, q, queue.clone().fill_(float("nan")), check_inputs_finite=True)
    with pytest.raises(ValueError, match="queue_size"):
        MoCoLoss(queue_size=0)
    with pytest.raises(TypeError, match="dim"):
        MoCoLoss(dim=1.5)
    with pytest.raises(ValueError, match="queue_init"):
        MoCoLoss(queue_init="zeros")
    with pytest.raises(ValueError, match="features"):
        MoCoLoss(0.2, 10, 4).enqueue(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="pyssl.moco"):
        torch.ops.pyssl.moco_forward(q, q, unit_queue(3, 5), 0.2)


# ---- CUDA against the CPU kernel ---------------------------------------------------------------


# On each backend (conftest.py): a GPU, or the same CUDA kernel sources on the CPU emulator. Sizes:
# partial row blocks and queue tiles, a queue that is not a multiple of the batch, d = 1100 (its
# accumulators in global memory, d <= 377 in shared memory). The largest GPU case (K = 65,536) is
# too slow to emulate; K = 5,000 covers the same column splits.
MOCO_CASES = [(1, 0, 3), (5, 3, 7), (256, 65536, 128), (300, 5000, 200), (70, 999, 1100), (97, 4100, 1)]


@pytest.mark.parametrize("n,k,d", MOCO_CASES)
@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.bfloat16])
def test_moco_cuda_matches_cpu(backend, n, k, d, queue_dtype):
    if backend.emulated and k > 10_000:
        pytest.skip("emulated: K = 65,536 takes minutes; K = 5,000 covers the same splits")
    for temperature in (0.2, 0.01):
        query, key, queue = leaf((n, d)), leaf((n, d)), unit_queue(k, d, queue_dtype)
        qc, kc = backend.to(query.detach()).requires_grad_(), backend.to(key.detach()).requires_grad_()
        loss_cpu = pyssl.ops.moco(query, key, queue, temperature)
        with backend:
            loss_gpu = pyssl.ops.moco(qc, kc, backend.to(queue), temperature)
            device_grads = grads(loss_gpu, qc, kc)
        assert_close(loss_gpu.cpu(), loss_cpu, torch.float32, scale=1 / temperature)
        for g, w in zip(device_grads, grads(loss_cpu, query, key)):
            assert_close(g.cpu(), w, torch.float32, scale=1 / temperature)


# Feature dims past what one row block's query rows and accumulators once held in shared memory
# (1653 fp32 / 745 fp64 features): the CUDA sweep tiles the features, so any dim runs, as on the
# CPU. Small batches and queues (a partial row block, a partial second queue tile) keep the
# emulated cases to seconds.
@pytest.mark.parametrize(
    "d,dtype", [(1100, torch.float32), (2048, torch.float32), (3000, torch.float32), (800, torch.float64)]
)
def test_moco_cuda_large_feature_dims(backend, d, dtype):
    n, k, temperature = 5, 70, 0.2
    query, key, queue = leaf((n, d), dtype), leaf((n, d), dtype), unit_queue(k, d, dtype)
    qc, kc = backend.to(query.detach()).requires_grad_(), backend.to(key.detach()).requires_grad_()
    loss_cpu = pyssl.ops.moco(query, key, queue, temperature)
    with backend:
        loss_dev = pyssl.ops.moco(qc, kc, backend.to(queue), temperature)
        device_grads = grads(loss_dev, qc, kc)
    expected = ref_moco(query, key, queue, temperature)
    assert_close(loss_dev.cpu(), loss_cpu, dtype, scale=1 / temperature)
    assert_close(loss_dev.cpu(), expected, dtype, scale=1 / temperature)
    for g, w, r in zip(device_grads, grads(loss_cpu, query, key), grads(expected, query, key)):
        assert_close(g.cpu(), w, dtype, scale=1 / temperature)
        assert_close(g.cpu(), r, dtype, scale=1 / temperature)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_moco_cuda_dtypes_against_reference(backend, dtype):
    query, key = backend.to(leaf((33, 64), dtype)), backend.to(leaf((33, 64), dtype))
    queue = backend.to(unit_queue(3000, 64, torch.float64 if dtype == torch.float64 else torch.float32))
    with backend:
        loss = pyssl.ops.moco(query, key, queue, 0.07)
    expected = ref_moco(query, key, queue, 0.07)
    assert loss.dtype == dtype
    assert_close(loss, expected, dtype, scale=1 / 0.07)


def test_moco_cuda_module_matches_cpu_module(backend):
    cpu = MoCoLoss(0.2, 1000, 32)
    gpu = MoCoLoss(0.2, 1000, 32).to(backend.device)
    gpu.load_state_dict(cpu.state_dict())
    for batch in (256, 256, 256, 256, 100):
        q, k = torch.randn(batch, 32), torch.randn(batch, 32)
        a = cpu(q.clone().requires_grad_(), k)
        with backend:
            b = gpu(backend.to(q).requires_grad_(), backend.to(k))
        assert_close(b.cpu(), a, torch.float32, scale=5)
        torch.testing.assert_close(gpu.queue.cpu(), cpu.queue, rtol=1e-5, atol=1e-6)
        assert int(gpu.queue_ptr) == int(cpu.queue_ptr)


def test_moco_cuda_backward_of_a_detached_key(backend):
    # MoCo's key comes from the momentum encoder: autograd asks for the query's gradient only
    # (output_mask [True, False]), which must reach the device's backward as it does the CPU's.
    query, key, queue = leaf((9, 16)), leaf((9, 16)).detach(), unit_queue(50, 16)
    expected = grads(pyssl.ops.moco(query, key, queue, 0.2), query)[0]
    on_device = backend.to(query.detach()).requires_grad_()
    with backend:
        loss = pyssl.ops.moco(on_device, backend.to(key), backend.to(queue), 0.2)
        (grad_query,) = grads(loss, on_device)
    assert_close(grad_query.cpu(), expected, torch.float32, scale=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.2, 0.01, 0.001])
def test_empty_queue_gives_zero_loss_and_gradient(dtype, temperature):
    # Only the positive logit (MoCo's first step): every row's cross-entropy is log 1 = 0, whatever
    # the query and key (independent here, so many positive logits are strongly negative).
    query, key = leaf((64, 16), dtype), leaf((64, 16), dtype)
    loss = pyssl.ops.moco(query, key, torch.empty(0, 16, dtype=dtype), temperature)
    grad_query, grad_key = grads(loss, query, key)
    assert loss.item() == 0.0
    assert grad_query.abs().max().item() <= 1e-6 and grad_key.abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_moco_loss_is_never_negative_and_nan_stays_nan(backend, dtype):
    # Aligned query and key against an empty or tiny queue: the exact loss is 0 or tiny, and
    # rounding lse against the positive logit must not take it below 0, on either kernel.
    for temperature in (0.2, 0.01, 0.001):
        for k in (0, 3):
            q = leaf((5, 16), dtype).detach()
            queue = unit_queue(k, 16, torch.float64 if dtype == torch.float64 else torch.float32)
            cpu = torch.ops.pyssl.moco_forward(q, q, queue, temperature)[0]
            device = backend.ops.moco_forward(backend.to(q), backend.to(q), backend.to(queue), temperature)[0]
            assert cpu.item() >= 0 and device.item() >= 0, (temperature, k, cpu.item(), device.item())
    q = leaf((5, 16), dtype).detach()
    q[2, 3] = float("nan")
    queue = backend.to(unit_queue(3, 16, torch.float64 if dtype == torch.float64 else torch.float32))
    assert torch.isnan(backend.ops.moco_forward(backend.to(q), backend.to(q), queue, 0.2)[0])
    assert torch.isnan(torch.ops.pyssl.moco_forward(q, q, queue.cpu(), 0.2)[0])


def test_moco_module_first_step_is_zero_at_every_temperature():
    # MoCo's first step with queue_init="empty": only the positive logit, so every row's
    # cross-entropy is log 1 = 0. It was 0.0169 at T = 0.01 (float32) and -inf at T = 0.001
    # (float64) while the merge took the empty queue's shift 0 as a maximum.
    for dtype, temperature in ((torch.float32, 0.01), (torch.float64, 0.001), (torch.float32, 1e-4)):
        loss_fn = MoCoLoss(temperature, 64, 16, queue_init="empty", queue_dtype=dtype)
        query, key = leaf((32, 16), dtype), leaf((32, 16), dtype).detach()
        loss = loss_fn(query, key)
        assert loss.item() == 0.0 and int(loss_fn.queue_len) == 32
        assert grads(loss, query)[0].abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 0.01), (torch.float64, 0.001)])
def test_moco_kernels_first_step_is_zero(backend, dtype, temperature):
    # The same on the CUDA kernels: their merge starts from the positive logit, so an empty
    # queue (no column split) leaves lse = S_i0 exactly.
    query, key = leaf((40, 16), dtype).detach(), leaf((40, 16), dtype).detach()
    empty = torch.empty(0, 16, dtype=dtype)
    loss, lse, _ = backend.ops.moco_forward(backend.to(query), backend.to(key), backend.to(empty), temperature)
    positive = (F.normalize(query.double(), dim=1) * F.normalize(key.double(), dim=1)).sum(1) / temperature
    assert loss.item() == 0.0
    assert_close(lse.cpu(), positive, dtype, scale=1 / temperature)


def test_moco_enqueue_from_threads_loses_no_key():
    # 4 threads x 50 steps x 7 keys into one module: every key is written once, and the write
    # position is 1400 (without the enqueue lock, about 1370: positions read before another
    # thread moved them). Angles identify the keys.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches as often as possible, to expose a race
    threads, steps, batch = 4, 50, 7
    total = threads * steps * batch
    loss_fn = MoCoLoss(0.2, 2000, 2, queue_init="empty")
    start = threading.Barrier(threads)

    def keys(first):
        angle = torch.arange(first, first + batch, dtype=torch.float64) * (math.pi / total)
        return torch.stack([angle.cos(), angle.sin()], 1).float()

    def worker(t):
        start.wait()
        for i in range(steps):
            key = keys(batch * (steps * t + i))
            loss_fn(key.clone(), key, update=True)

    try:
        workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(previous)
    assert (int(loss_fn.queue_ptr), int(loss_fn.queue_len)) == (total, total)
    angles = torch.atan2(loss_fn.queue[:total, 1].double(), loss_fn.queue[:total, 0].double()).sort().values
    torch.testing.assert_close(angles, torch.arange(total, dtype=torch.float64) * (math.pi / total), rtol=0, atol=1e-5)


def test_moco_module_copies_get_their_own_lock():
    loss_fn = MoCoLoss(0.2, 10, 4)
    copied = copy.deepcopy(loss_fn)
    buffer = io.BytesIO()
    torch.save(loss_fn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        other.enqueue(torch.randn(3, 4))
        assert int(other.queue_ptr) == 3 and int(loss_fn.queue_ptr) == 0


def test_moco_non_contiguous_inputs():
    query, key = leaf((40, 24))[:, ::2], leaf((40, 24))[::1, 1::2]
    queue = F.normalize(torch.randn(12, 3000), dim=0).T  # (3000, 12), column-major
    loss = pyssl.ops.moco(query, key, queue, 0.2)
    expected = ref_moco(query, key, queue, 0.2)
    assert_close(loss, expected, torch.float32, scale=5)
    leaves = (query, key)
    for g, w in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        assert_close(g, w, torch.float32, scale=5)


def test_moco_torch_compile():
    torch._dynamo.reset()
    loss_fn = MoCoLoss(0.2, 50, 8)
    ref = RefQueue(loss_fn.queue)

    @torch.compile(backend="aot_eager")
    def step(query, key):
        return loss_fn(query, key)

    for _ in range(3):
        query, key = leaf((12, 8)), torch.randn(12, 8)
        expected = ref_moco(query, key, ref.negatives(), 0.2)
        loss = step(query, key)
        ref.push(key)
        assert_close(loss, expected, torch.float32)
        assert_close(grads(loss, query)[0], grads(expected, query)[0], torch.float32)
        torch.testing.assert_close(loss_fn.queue, ref.queue.float(), rtol=1e-6, atol=1e-7)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def op_only(query, key, queue):
        return pyssl.ops.moco(query, key, queue, 0.5)

    query, key, queue = leaf((6, 4)), leaf((6, 4)), unit_queue(9, 4)
    loss = op_only(query, key, queue)
    expected = ref_moco(query, key, queue, 0.5)
    assert_close(loss, expected, torch.float32)
    for g, w in zip(grads(loss, query, key), grads(expected, query, key)):
        assert_close(g, w, torch.float32)
