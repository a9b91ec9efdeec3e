"""MoCo's tensor-core sweep (csrc/moco/cuda/moco_mma.cuh) against float64 and the CPU kernel.

fp16/bf16 query and queue of one dtype, rows of a multiple of 8 features up to 256, take the
mma.sync sweep; everything else (and PYSSL_MOCO_KERNELS=simt) the SIMT sweep. Every test runs on
each `backend` (conftest.py): a GPU, or the same kernel sources on the CPU emulator, which is slow,
so the sizes stay small: N = 70 leaves a partial row block (of 128 rows up to 128 features, 64
above), K = 150 a partial last tile and fewer tiles than the column splits (one tile per split);
N = 1000 or 300 against K = 5000 gives splits of several tiles (the online softmax's rescale
inside a split).
"""

import pytest
import torch
import torch.nn.functional as F

import pyssl
from tolerances import assert_close

HALF_TYPES = (torch.float16, torch.bfloat16)


def _inputs(n, k, d, dtype, queue_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(n, d, dtype=torch.float64, generator=g).to(dtype)
    key = torch.randn(n, d, dtype=torch.float64, generator=g).to(dtype)
    queue = (F.normalize(torch.randn(k, d, dtype=torch.float64, generator=g), dim=1) * queue_scale).to(dtype)
    return query, key, queue


def _reference(query, key, queue, temperature):
    """(loss, lse, expected_queue, grad_query, grad_key) in float64 on the rounded inputs."""
    q = query.double().requires_grad_()
    k = key.double().requires_grad_()
    u, v = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(u * v).sum(1, keepdim=True), u @ queue.double().T], dim=1) / temperature
    lse = torch.logsumexp(logits, dim=1)
    loss = (lse - logits[:, 0]).mean()
    expected_queue = torch.softmax(logits, dim=1)[:, 1:] @ queue.double()
    grad_query, grad_key = torch.autograd.grad(loss, (q, k))
    return loss.detach(), lse.detach(), expected_queue.detach(), grad_query, grad_key


def _forward(backend, query, key, queue, temperature):
    """The op's three outputs and the gradients of pyssl.ops.moco, on the backend's kernels."""
    qc = backend.to(query).requires_grad_()
    kc = backend.to(key).requires_grad_()
    with backend:
        outputs = backend.ops.moco_forward(qc.detach(), kc.detach(), backend.to(queue), temperature)
        loss = pyssl.ops.moco(qc, kc, backend.to(queue), temperature)
        grads = torch.autograd.grad(loss, (qc, kc))
    return [t.cpu() for t in outputs], [g.cpu() for g in grads], loss.detach().cpu()


def _check_against_reference(outputs, grads, loss, ref, dtype, temperature):
    ref_loss, ref_lse, ref_expected, ref_grad_query, ref_grad_key = ref
    scale = 1 / temperature
    # The products are exact and summed in float32, the norms applied in float32: lse is as good
    # as float32 logits of the rounded inputs, not merely as good as the input dtype.
    assert_close(outputs[1], ref_lse, torch.float32, scale=scale)
    assert_close(outputs[0], ref_loss, dtype, scale=scale)
    assert_close(loss, ref_loss, dtype, scale=scale)
    # expected_queue carries P rounded to the input dtype (the second MMA's operand).
    assert_close(outputs[2], ref_expected, dtype)
    for g, w in zip(grads, (ref_grad_query, ref_grad_key)):
        assert g.dtype == dtype
        assert_close(g, w, dtype, scale=scale)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("d", [8, 64, 128, 136, 256], ids=lambda d: f"d{d}")
def test_mma_sweep_matches_reference_and_cpu(backend, dtype, d):
    # d = 8 and 136 leave half of the last 16-feature MMA step as zero padding; 8 and 64 take
    # 32-row warps with the query fragments in registers, 128 32-row warps reading them from
    # shared memory, 136 and 256 16-row warps reading them from shared memory.
    n, k, temperature = 70, 150, 0.07
    query, key, queue = _inputs(n, k, d, dtype, seed=d)
    outputs, grads, loss = _forward(backend, query, key, queue, temperature)
    _check_against_reference(outputs, grads, loss, _reference(query, key, queue, temperature), dtype, temperature)
    cpu = torch.ops.pyssl.moco_forward(query, key, queue, temperature)
    assert_close(outputs[0], cpu[0], dtype, scale=1 / temperature)
    assert_close(outputs[1], cpu[1], torch.float32, scale=1 / temperature)
    assert_close(outputs[2], cpu[2], dtype)


@pytest.mark.parametrize(
    "n,d,dtype", [(1000, 64, torch.bfloat16), (1000, 64, torch.float16), (300, 200, torch.bfloat16)], ids=str
)
def test_mma_sweep_splits_of_several_tiles(backend, n, d, dtype):
    # K = 5000: 79 tiles. At d = 64, 8 row blocks of 128 (32-row warps; the last block 104 rows)
    # aim at 2 x 132 / 8 = 33 splits: 27 of 3 tiles; at d = 200, 5 row blocks of 64 (16-row
    # warps, the last 44 rows) aim at 53: 40 of 2. Each split's running max moves and rescales
    # its sum and A; a queue of norm 3 at T = 0.02 gives logits up to 150.
    k, temperature = 5000, 0.02
    query, key, queue = _inputs(n, k, d, dtype, queue_scale=3.0, seed=1)
    outputs, grads, loss = _forward(backend, query, key, queue, temperature)
    _check_against_reference(outputs, grads, loss, _reference(query, key, queue, temperature), dtype, temperature)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_mma_and_simt_sweeps_agree(backend, dtype, monkeypatch):
    # PYSSL_MOCO_KERNELS=simt selects the SIMT sweep for the same inputs: the same lse to float32
    # accuracy, expected_queue to the input dtype's (P is rounded to it on the tensor cores only,
    # so the two must differ there, else one kernel ran twice).
    n, k, d, temperature = 40, 200, 32, 0.1
    query, key, queue = _inputs(n, k, d, dtype, seed=2)
    mma, _, _ = _forward(backend, query, key, queue, temperature)
    monkeypatch.setenv("PYSSL_MOCO_KERNELS", "simt")
    simt, _, _ = _forward(backend, query, key, queue, temperature)
    assert_close(mma[1], simt[1], torch.float32, scale=1 / temperature)
    assert_close(mma[2], simt[2], dtype)
    assert not torch.equal(mma[2], simt[2])


def _unaligned(t, device):
    # The same values in a contiguous view whose data starts 2 bytes past a 16-byte boundary.
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("case", ["d12", "d300", "unaligned-query", "unaligned-queue", "mixed-dtypes"])
def test_simt_fallback(backend, case, monkeypatch):
    # Inputs the tensor-core sweep cannot take (d % 8 != 0, d > 256, data off a 16-byte boundary,
    # an fp16 query with a bf16 queue) run the SIMT sweep: the results are those of
    # PYSSL_MOCO_KERNELS=simt to the bit, and right against float64.
    d = {"d12": 12, "d300": 300}.get(case, 16)
    n, k, temperature = 20, 90, 0.1
    query, key, queue = _inputs(n, k, d, torch.bfloat16, seed=3)
    if case == "mixed-dtypes":
        query, key = query.half(), key.half()
    run_query = _unaligned(query, backend.device) if case == "unaligned-query" else backend.to(query)
    run_queue = _unaligned(queue, backend.device) if case == "unaligned-queue" else backend.to(queue)
    assert (run_query.data_ptr() % 16 != 0) == (case == "unaligned-query")
    default = [t.cpu() for t in backend.ops.moco_forward(run_query, backend.to(key), run_queue, temperature)]
    monkeypatch.setenv("PYSSL_MOCO_KERNELS", "simt")
    simt = [t.cpu() for t in backend.ops.moco_forward(run_query, backend.to(key), run_queue, temperature)]
    for a, b in zip(default, simt):
        assert torch.equal(a, b)
    _, ref_lse, ref_expected, _, _ = _reference(query, key, queue, temperature)
    assert_close(default[1], ref_lse, torch.float32, scale=1 / temperature)
    assert_close(default[2], ref_expected, torch.float32)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_mma_sweep_nan_stays_in_its_row(backend, dtype):
    # A NaN feature makes that row's lse and the loss NaN; the other rows' lse stay those of the
    # same inputs without the NaN row (rows do not mix).
    query, key, queue = _inputs(20, 90, 16, dtype, seed=4)
    bad = query.clone()
    bad[3, 5] = float("nan")
    loss, lse, _ = [t.cpu() for t in backend.ops.moco_forward(backend.to(bad), backend.to(key), backend.to(queue), 0.2)]
    clean = backend.ops.moco_forward(backend.to(query), backend.to(key), backend.to(queue), 0.2)[1].cpu()
    assert torch.isnan(loss) and torch.isnan(lse[3])
    others = torch.arange(20) != 3
    assert torch.equal(lse[others], clean[others])
