"""CUDA kernels of the fused InfoNCE family against the CPU kernels and a float64 reference.

Every test runs on each `backend` (conftest.py): on a GPU ("cuda", skipped without one) and on
the CPU emulator of the CUDA model ("emu": the same kernel sources, run on CPU tensors). The
reference materialises the full logit matrix in float64; the fused ops must not.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyssl
from pyssl import reference

cpu_ops = torch.ops.pyssl
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TEMPERATURES = [0.01, 0.07, 0.5, 1.0]
# (N, d): batch sizes 1, 3, 97, 1000 against dims 1, 7, 128, 300 (partial tiles on both axes).
SHAPES = [(1, 1), (1, 300), (3, 7), (3, 1), (97, 128), (97, 7), (97, 300), (1000, 1), (1000, 128), (1000, 300)]


def _emulate_only_the_covering_cases(backend, n, d, temperature):
    # The emulator runs a few million thread switches a second: at N = 1000 it runs one
    # temperature of the fixed-shift path and skips d = 300 (partial feature tiles and the
    # running-max path are covered at N = 97, the partial row tiles of N = 1000 at d = 1, 128).
    if backend.emulated and n >= 1000 and (temperature != 0.07 or d > 128):
        pytest.skip("emulated: N = 1000 runs at T = 0.07 and d <= 128 only")


def _randn(backend, *shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(backend.device, dtype)


# ---- float64 references on the materialised logits ---------------------------------------------


def ref_ntxent(z, temperature, dtype=torch.float64):
    """(loss, lse) of NT-Xent over z = cat(view0, view1) (pyssl.reference), in float64 unless told."""
    return reference.ntxent_stats(z.to(dtype), temperature)


def ref_infonce(query, key, scale, symmetric):
    """(loss, lse_row, lse_col) of InfoNCE / CLIP (pyssl.reference) in float64; scale may be a tensor."""
    scale = scale.double() if isinstance(scale, torch.Tensor) else scale
    return reference.infonce_stats(query.double(), key.double(), scale, symmetric)


def _grads_ref(fn, *inputs):
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    loss = out[0] if isinstance(out, tuple) else out
    return loss.detach(), torch.autograd.grad(loss, leaves)


# ---- tolerances -----------------------------------------------------------------------------------


HALF_TYPES = (torch.float16, torch.bfloat16)


def _loss_atol(dtype, scale):
    # float32 logits carry ~1e-6 relative error of |S| <= scale; float64 is near exact. fp16/bf16
    # input takes the tensor cores; the older WMMA kernels (PYSSL_INFONCE_KERNELS=wmma) round the
    # unit rows to fp16: |cos error| <= 2 * 2^-11, so every logit, hence every lse, is within
    # 1e-3 * scale. (The mma.sync kernels do better: test_mma_kernels_form_logits_in_float32.)
    scale = max(scale, 1.0)
    if dtype == torch.float64:
        return 1e-10 * scale
    return (2e-5 + (1e-3 if dtype in HALF_TYPES else 0.0)) * scale


def _grad_rtol(dtype, scale):
    # Relative to the largest gradient entry. Gradients are written in the input dtype, whose
    # rounding dominates for fp16/bf16 at small scales; the fp16 logits (see _loss_atol) move
    # probabilities by ~1e-4 * scale relative, typically.
    if dtype == torch.float64:
        return 1e-9
    base = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    return base + (5e-4 if dtype in HALF_TYPES else 2e-5) * max(scale, 1.0)


def _grad_floor(dtype, scale, rows, min_norm):
    # Where the exact gradient is 0 (N = 1: every row's only column is its positive; d = 1: a unit
    # vector cannot turn), kernels and the float64 reference alike form it from rounded terms: P - 1
    # with P = exp(S - lse), (g - (g.u) u) / ||z||. So a few ulps of the gradient's natural size
    # scale / (rows ||z||) remain, not 0.
    ulps = 2**-40 if dtype == torch.float64 else 2**-20
    return ulps * max(scale, 1.0) / (rows * max(min_norm, 1e-6))


def assert_grad_close(actual, expected, dtype, scale=1.0, min_norm=1.0):
    """``min_norm``: the smallest row norm of the input (1 / ||z|| amplifies rounding)."""
    assert actual.dtype == dtype and actual.shape == expected.shape and actual.device == expected.device
    assert torch.isfinite(actual).all()
    peak = expected.abs().max().item()
    floor = _grad_floor(dtype, scale, expected.shape[0], float(min_norm))
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=_grad_rtol(dtype, scale) * peak + floor)


# ---- NT-Xent --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ntxent_matches_reference_and_cpu(backend, shape, temperature, dtype):
    n, d = shape
    _emulate_only_the_covering_cases(backend, n, d, temperature)
    z = _randn(backend, 2 * n, d, dtype=dtype)
    loss, lse = backend.ops.ntxent_forward(z, temperature)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == dtype and loss.shape == () and loss.device == z.device
    assert lse.dtype == acc and lse.shape == (2 * n,)

    ref_loss, ref_grads = _grads_ref(lambda t: ref_ntxent(t, temperature), z)
    _, ref_lse = ref_ntxent(z, temperature)
    atol = _loss_atol(dtype, 1.0 / temperature)
    loss_tol = atol if dtype in (torch.float32, torch.float64) else atol + 8e-3 * abs(ref_loss.item())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=loss_tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=atol)

    grad_out = torch.rand((), device=backend.device, dtype=dtype) + 0.5
    grad_z = backend.ops.ntxent_backward(grad_out, z, lse, temperature)
    min_norm = z.double().norm(dim=1).min()
    assert_grad_close(grad_z, ref_grads[0] * grad_out.double(), dtype, 1.0 / temperature, min_norm)

    # The CPU kernel on the same inputs.
    cpu_loss, cpu_lse = cpu_ops.ntxent_forward(z.cpu(), temperature)
    torch.testing.assert_close(lse.cpu().double(), cpu_lse.double(), rtol=0, atol=atol)
    torch.testing.assert_close(loss.cpu().double(), cpu_loss.double(), rtol=0, atol=loss_tol)
    cpu_grad = cpu_ops.ntxent_backward(grad_out.cpu(), z.cpu(), cpu_lse, temperature)
    assert_grad_close(grad_z.cpu(), cpu_grad, dtype, 1.0 / temperature, min_norm)


def test_ntxent_one_pair_has_zero_loss(backend):
    # N = 1: each row's only allowed column is its positive, so the loss is exactly log(1) = 0.
    z = _randn(backend, 2, 5)
    loss, lse = backend.ops.ntxent_forward(z, 0.1)
    assert abs(loss.item()) < 1e-5
    grad = backend.ops.ntxent_backward(torch.ones((), device=backend.device), z, lse, 0.1)
    assert grad.abs().max().item() < 1e-4


def test_ntxent_non_contiguous_input(backend):
    z = _randn(backend, 64, 2 * 33).T  # (66, 64) with strides (1, 66)
    loss, lse = backend.ops.ntxent_forward(z, 0.2)
    ref_loss, ref_lse = ref_ntxent(z, 0.2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=1e-5)
    grad = backend.ops.ntxent_backward(torch.ones((), device=backend.device), z, lse, 0.2)
    _, (ref_grad,) = _grads_ref(lambda t: ref_ntxent(t, 0.2), z)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("temperature", [0.07, 0.01])
def test_bf16_tensor_cores_beat_eager_bf16(backend, temperature):
    # The tensor-core path rounds unit rows to fp16 but keeps logits, statistics and G in
    # float32: it must be closer to the float64 truth than eager PyTorch in bf16.
    z = _randn(backend, 600 if backend.emulated else 2000, 128, dtype=torch.bfloat16)
    loss, lse = backend.ops.ntxent_forward(z, temperature)
    grad = backend.ops.ntxent_backward(torch.ones((), device=backend.device, dtype=torch.bfloat16), z, lse, temperature)
    ref_loss, (ref_grad,) = _grads_ref(lambda t: ref_ntxent(t, temperature), z)
    eager_loss, (eager_grad,) = _grads_eager_bf16(z, temperature)
    # Both outputs are rounded to bf16 (2^-9 relative): allow that much on top.
    assert abs(loss.double() - ref_loss) <= abs(eager_loss.double() - ref_loss) + 2**-8 * abs(ref_loss)
    peak = ref_grad.abs().max()
    assert (grad.double() - ref_grad).abs().max() <= (eager_grad.double() - ref_grad).abs().max() + 2**-8 * peak


def _tensor_core_run(backend, dtype, symmetric, n, d, scale):
    """(lse, loss, grads) of NT-Xent (symmetric=None) or InfoNCE / CLIP on the tensor cores, and
    the float64 reference on the same rounded inputs."""
    one = torch.ones((), device=backend.device, dtype=dtype)
    if symmetric is None:
        z = _randn(backend, 2 * n, d, dtype=dtype)
        loss, lse = backend.ops.ntxent_forward(z, 1.0 / scale, True)
        grads = (backend.ops.ntxent_backward(one, z, lse, 1.0 / scale, True),)
        ref_loss, ref_grads = _grads_ref(lambda t: ref_ntxent(t, 1.0 / scale), z)
        return [lse], loss, grads, [ref_ntxent(z, 1.0 / scale)[1]], ref_loss, ref_grads
    query, key = _randn(backend, n, d, dtype=dtype), _randn(backend, n + 5, d, dtype=dtype)
    if symmetric:
        key = key[:n]
    logit_scale = torch.tensor(scale, device=backend.device)
    loss, lse_row, lse_col = backend.ops.infonce_forward(query, key, logit_scale, symmetric, True)
    grads = backend.ops.infonce_backward(one, query, key, logit_scale, lse_row, lse_col, symmetric, True)[:2]
    ref = ref_infonce(query, key, scale, symmetric)
    ref_loss, ref_grads = _grads_ref(lambda q, k: ref_infonce(q, k, scale, symmetric), query, key)
    lse, ref_lse = [lse_row], [ref[1]]
    if symmetric:
        lse.append(lse_col)
        ref_lse.append(ref[2])
    return lse, loss, grads, ref_lse, ref_loss, ref_grads


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("symmetric", [None, False, True], ids=["ntxent", "infonce", "clip"])
@pytest.mark.parametrize("d", [70, 200])
def test_mma_kernels_form_logits_in_float32(backend, dtype, symmetric, d, monkeypatch):
    # The mma.sync kernels multiply the input values themselves (exact products, float32 sums)
    # and apply the inverse norms in float32: every lse is within float32 accuracy of the float64
    # truth on the same rounded inputs, far inside the WMMA kernels' fp16-unit-row error, which
    # this test also measures (partial tiles: 97 rows, 70 or 200 features, i.e. the row block's
    # fragments held in registers or streamed; running-max path: scale 50).
    n, scale = 97, 50.0
    errors = {}
    for kernels in ("mma", "wmma"):
        monkeypatch.setenv("PYSSL_INFONCE_KERNELS", kernels)
        torch.manual_seed(3)
        lse, loss, grads, ref_lse, ref_loss, ref_grads = _tensor_core_run(backend, dtype, symmetric, n, d, scale)
        errors[kernels] = max((a.double() - b).abs().max().item() for a, b in zip(lse, ref_lse))
        atol = _loss_atol(dtype, scale)
        for a, b in zip(lse, ref_lse):
            torch.testing.assert_close(a.double(), b, rtol=0, atol=atol)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=atol + 8e-3 * abs(ref_loss.item()))
        for a, b in zip(grads, ref_grads):
            assert_grad_close(a, b, dtype, scale)
    assert errors["mma"] <= 4e-6 * scale, errors
    assert errors["wmma"] > 10 * errors["mma"], errors  # else the two kernel paths were not both taken


def _grads_eager_bf16(z, temperature):
    leaf = z.detach().clone().requires_grad_()
    loss, _ = ref_ntxent(leaf, temperature, dtype=torch.bfloat16)
    return loss.detach(), torch.autograd.grad(loss, [leaf])


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_simt_path_for_half_input_matches_float32(backend, dtype, monkeypatch):
    # PYSSL_INFONCE_TENSOR_CORES=0: fp16/bf16 input takes the float32 SIMT kernels, which must
    # then agree with the float32 op on the same (rounded) values.
    z = _randn(backend, 2 * 150, 70, dtype=dtype)
    query, key = _randn(backend, 150, 70, dtype=dtype), _randn(backend, 150, 70, dtype=dtype)
    scale = torch.tensor(30.0, device=backend.device)
    monkeypatch.setenv("PYSSL_INFONCE_TENSOR_CORES", "0")
    loss, lse = backend.ops.ntxent_forward(z, 0.05)
    grad = backend.ops.ntxent_backward(torch.ones((), device=backend.device, dtype=dtype), z, lse, 0.05)
    out = backend.ops.infonce_forward(query, key, scale, True)
    grads = backend.ops.infonce_backward(
        torch.ones((), device=backend.device, dtype=dtype), query, key, scale, out[1], out[2], True
    )
    monkeypatch.delenv("PYSSL_INFONCE_TENSOR_CORES")
    loss32, lse32 = backend.ops.ntxent_forward(z.float(), 0.05)
    grad32 = backend.ops.ntxent_backward(torch.ones((), device=backend.device), z.float(), lse32, 0.05)
    out32 = backend.ops.infonce_forward(query.float(), key.float(), scale, True)
    grads32 = backend.ops.infonce_backward(
        torch.ones((), device=backend.device), query.float(), key.float(), scale, out32[1], out32[2], True
    )
    torch.testing.assert_close(lse, lse32, rtol=0, atol=1e-5 * 20)
    torch.testing.assert_close(loss, loss32.to(dtype))
    assert_grad_close(grad, grad32.to(dtype).double(), dtype)
    for a, b in zip(out[1:], out32[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * 30)
    assert_grad_close(grads[0], grads32[0].to(dtype).double(), dtype)
    assert_grad_close(grads[1], grads32[1].to(dtype).double(), dtype)
    torch.testing.assert_close(grads[2], grads32[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_name", ["ntxent", "clip"])
def test_the_forward_kernel_choice_carries_to_the_backward(backend, loss_name, monkeypatch):
    # PYSSL_INFONCE_TENSOR_CORES is read once per forward: set between forward and backward, it
    # must not switch the backward to the other kernels (which give other gradients here).
    z0, z1 = _randn(backend, 150, 70, dtype=torch.float16), _randn(backend, 150, 70, dtype=torch.float16)

    def grads(forward_env, backward_env):
        a, b = z0.clone().requires_grad_(), z1.clone().requires_grad_()
        monkeypatch.setenv("PYSSL_INFONCE_TENSOR_CORES", forward_env)
        with backend:
            if loss_name == "ntxent":
                loss = pyssl.ops.ntxent(a, b, 0.1)
            else:
                loss = pyssl.ops.infonce(a, b, 10.0, symmetric=True)
            monkeypatch.setenv("PYSSL_INFONCE_TENSOR_CORES", backward_env)
            loss.backward()
        return torch.cat([a.grad, b.grad])

    tensor_cores, simt = grads("1", "1"), grads("0", "0")
    assert not torch.equal(tensor_cores, simt)  # else this test could not tell the paths apart
    assert torch.equal(grads("1", "0"), tensor_cores)
    assert torch.equal(grads("0", "1"), simt)


# ---- InfoNCE / CLIP -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True], ids=["infonce", "clip"])
def test_infonce_matches_reference_and_cpu(backend, symmetric, shape, temperature, dtype):
    n, d = shape
    _emulate_only_the_covering_cases(backend, n, d, temperature)
    keys = n if symmetric else n + (n * 3) // 7 + 1  # extra negatives for the asymmetric loss
    query, key = _randn(backend, n, d, dtype=dtype), _randn(backend, keys, d, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / temperature, device=backend.device, dtype=acc)

    loss, lse_row, lse_col = backend.ops.infonce_forward(query, key, scale, symmetric)
    assert loss.dtype == dtype and loss.shape == ()
    assert lse_row.dtype == acc and lse_row.shape == (n,)
    assert lse_col.dtype == acc and lse_col.shape == ((keys,) if symmetric else (0,))

    ref_loss, ref_grads = _grads_ref(lambda q, k, s: ref_infonce(q, k, s, symmetric), query, key, scale)
    _, ref_lse_row, ref_lse_col = ref_infonce(query, key, 1.0 / temperature, symmetric)
    atol = _loss_atol(dtype, 1.0 / temperature)
    loss_tol = atol if dtype in (torch.float32, torch.float64) else atol + 8e-3 * abs(ref_loss.item())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=loss_tol)
    torch.testing.assert_close(lse_row.double(), ref_lse_row, rtol=0, atol=atol)
    if symmetric:
        torch.testing.assert_close(lse_col.double(), ref_lse_col, rtol=0, atol=atol)

    grad_out = torch.rand((), device=backend.device, dtype=dtype) + 0.5
    gq, gk, gs = backend.ops.infonce_backward(grad_out, query, key, scale, lse_row, lse_col, symmetric)
    g = grad_out.double()
    q_norm, k_norm = query.double().norm(dim=1).min(), key.double().norm(dim=1).min()
    assert_grad_close(gq, ref_grads[0] * g, dtype, 1.0 / temperature, q_norm)
    assert_grad_close(gk, ref_grads[1] * g, dtype, 1.0 / temperature, k_norm)
    assert gs.dtype == scale.dtype and gs.shape == scale.shape and gs.device == scale.device
    scale_tol = (1e-9 if dtype == torch.float64 else (3e-3 if dtype in HALF_TYPES else 1e-4) / temperature) * (
        1 + ref_grads[2].abs().item() + abs(ref_loss.item())
    )
    torch.testing.assert_close(gs.double(), ref_grads[2] * g, rtol=0, atol=scale_tol)

    cpu = cpu_ops.infonce_forward(query.cpu(), key.cpu(), scale.cpu(), symmetric)
    torch.testing.assert_close(loss.cpu().double(), cpu[0].double(), rtol=0, atol=loss_tol)
    torch.testing.assert_close(lse_row.cpu().double(), cpu[1].double(), rtol=0, atol=atol)
    torch.testing.assert_close(lse_col.cpu().double(), cpu[2].double(), rtol=0, atol=atol)
    cpu_grads = cpu_ops.infonce_backward(grad_out.cpu(), query.cpu(), key.cpu(), scale.cpu(), cpu[1], cpu[2], symmetric)
    assert_grad_close(gq.cpu(), cpu_grads[0], dtype, 1.0 / temperature, q_norm)
    assert_grad_close(gk.cpu(), cpu_grads[1], dtype, 1.0 / temperature, k_norm)
    torch.testing.assert_close(gs.cpu().double(), cpu_grads[2].double(), rtol=0, atol=scale_tol)


@pytest.mark.parametrize(
    "mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
@pytest.mark.parametrize("symmetric", [False, True], ids=["infonce", "clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_infonce_backward_output_mask(backend, symmetric, mask, dtype):
    # The gradients asked for are those of the full backward, to the bit (the same sweeps, the
    # scale's sum taken from the key-side sweep when the query side is skipped: the same terms);
    # the others are None. A partial tile on both axes (N = 70, keys = 83).
    query = _randn(backend, 70, 24, dtype=dtype)
    key = _randn(backend, 70 if symmetric else 83, 24, dtype=dtype)
    scale = torch.tensor(9.0, device=backend.device)
    _, lse_row, lse_col = backend.ops.infonce_forward(query, key, scale, symmetric)
    args = (torch.ones((), device=backend.device), query, key, scale, lse_row, lse_col, symmetric, None)
    full = backend.ops.infonce_backward(*args)
    part = backend.ops.infonce_backward(*args, list(mask))
    for wanted, whole, got in zip(mask, full, part):
        if wanted:
            if whole.dim() == 0 and not mask[0]:  # summed in the other sweep: another order
                torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(got, whole)
        else:
            assert got is None


def test_infonce_cpu_logit_scale_and_shapes(backend):
    if backend.emulated:
        pytest.skip("emulated: every tensor is a CPU tensor, so a CPU logit_scale is a device one")
    # A CPU logit_scale of another dtype and shape (1,) with CUDA embeddings: the gradient
    # comes back on the CPU, shaped and typed like logit_scale, as the CPU kernel returns it.
    query, key = _randn(backend, 40, 24), _randn(backend, 70, 24)
    scale = torch.tensor([12.5], dtype=torch.float64)
    loss, lse_row, lse_col = backend.ops.infonce_forward(query, key, scale, False)
    ref_loss, _, _ = ref_infonce(query, key, 12.5, False)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=1e-5)
    _, _, gs = backend.ops.infonce_backward(
        torch.ones((), device=backend.device), query, key, scale, lse_row, lse_col, False
    )
    assert gs.device.type == "cpu" and gs.dtype == torch.float64 and gs.shape == (1,)
    with pytest.raises(RuntimeError, match="logit_scale must be > 0"):
        backend.ops.infonce_forward(query, key, torch.tensor(-1.0), False)


def test_infonce_non_positive_device_scale_is_nan(backend):
    # A device logit_scale is never read on the host (no sync): a bad value poisons the loss.
    query, key = _randn(backend, 10, 8), _randn(backend, 10, 8)
    loss, _, _ = backend.ops.infonce_forward(query, key, torch.tensor(-1.0, device=backend.device), True)
    assert torch.isnan(loss)


def test_no_host_sync(backend):
    # Forward and backward of every fused loss, through the ops and through the wrappers, never
    # make the host wait for the device: on a GPU CUDA's sync debug mode raises on any such call;
    # emulated, pyssl.emulation.count_host_calls counts the launchers' copies and synchronisations
    # (the emulator's runtime) and every syncing ATen op (.item(), bool(), data-dependent sizes).
    query, key = _randn(backend, 300, 64), _randn(backend, 300, 64)
    scale = torch.tensor(14.0, device=backend.device)
    grad_out = torch.ones((), device=backend.device)
    z = _randn(backend, 256, 64)
    queue = backend.to(F.normalize(torch.randn(200, 64), dim=1))
    moco_module = pyssl.losses.MoCoLoss(0.2, 512, 64).to(backend.device)

    def losses_forward_and_backward():
        loss, lse_row, lse_col = backend.ops.infonce_forward(query, key, scale, True)
        backend.ops.infonce_backward(grad_out, query, key, scale, lse_row, lse_col, True)
        loss, lse = backend.ops.ntxent_forward(z, 0.3)
        backend.ops.ntxent_backward(grad_out, z, lse, 0.3)
        # The wrappers with a Python-float logit scale and temperature, forward and backward.
        q, k = query.detach().requires_grad_(), key.detach().requires_grad_()
        with backend:
            pyssl.ops.infonce(q, k, 14.0, symmetric=True).backward()
            pyssl.ops.infonce(q, k, 14.0).backward()
            pyssl.losses.NTXentLoss(0.3)(q, k).backward()
            pyssl.ops.moco(q, k, queue, 0.2).backward()
            moco_module(q, k).backward()  # the module's queue: loss, then enqueue

    if backend.emulated:
        with pyssl.emulation.count_host_calls() as calls:
            losses_forward_and_backward()
        assert calls.syncs == 0 and calls.host_to_device == 0, calls
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses_forward_and_backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_emulated_sync_count_sees_syncs(backend):
    # The counter of test_no_host_sync is not blind: a value read back, from Python or by a
    # launcher, counts.
    if not backend.emulated:
        pytest.skip("the emulator's counter")
    z = _randn(backend, 8, 4)
    with pyssl.emulation.count_host_calls() as calls:
        loss, _ = backend.ops.ntxent_forward(z, 0.3)
        loss.item()
        bool(loss > 0)
    assert calls.aten == ("aten::_local_scalar_dense", "aten::_local_scalar_dense") and calls.syncs == 2, calls


# ---- autograd through the Python wrappers ----------------------------------------------------------


def test_gradcheck_ntxent_cuda_float64(backend):
    z0 = _randn(backend, 5, 7, dtype=torch.float64).requires_grad_()
    z1 = _randn(backend, 5, 7, dtype=torch.float64).requires_grad_()
    with backend:
        assert torch.autograd.gradcheck(lambda a, b: pyssl.ops.ntxent(a, b, 0.3), (z0, z1))


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_infonce_cuda_float64(backend, symmetric):
    query = _randn(backend, 6, 9, dtype=torch.float64).requires_grad_()
    key = _randn(backend, 6 if symmetric else 11, 9, dtype=torch.float64).requires_grad_()
    scale = torch.tensor(3.0, device=backend.device, dtype=torch.float64, requires_grad=True)
    with backend:
        assert torch.autograd.gradcheck(
            lambda q, k, s: pyssl.ops.infonce(q, k, s, symmetric=symmetric), (query, key, scale)
        )


def test_gradcheck_large_grid_float64(backend):
    # Several row tiles, column splits and 128-feature chunks (d = 130 spans two chunks).
    z0 = _randn(backend, 70, 130, dtype=torch.float64).requires_grad_()
    z1 = _randn(backend, 70, 130, dtype=torch.float64).requires_grad_()
    with backend:
        loss = pyssl.ops.ntxent(z0, z1, 0.05)
        g = torch.autograd.grad(loss, (z0, z1), retain_graph=True)
    ref, _ = ref_ntxent(torch.cat([z0, z1]), 0.05)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    g_ref = torch.autograd.grad(ref, (z0, z1))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


# ---- opcheck --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_cuda(backend, dtype):
    z = _randn(backend, 2 * 9, 13, dtype=dtype).requires_grad_()
    torch.library.opcheck(backend.ops.ntxent_forward.default, (z, 0.4))
    loss, lse = backend.ops.ntxent_forward(z.detach(), 0.4)
    torch.library.opcheck(
        backend.ops.ntxent_backward.default, (torch.ones((), device=backend.device, dtype=dtype), z.detach(), lse, 0.4)
    )
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for symmetric in (False, True):
        query = _randn(backend, 9, 13, dtype=dtype).requires_grad_()
        key = _randn(backend, 9 if symmetric else 20, 13, dtype=dtype).requires_grad_()
        scale = torch.tensor(5.0, device=backend.device, dtype=acc, requires_grad=True)
        torch.library.opcheck(backend.ops.infonce_forward.default, (query, key, scale, symmetric))
        _, lse_row, lse_col = backend.ops.infonce_forward(query.detach(), key.detach(), scale.detach(), symmetric)
        torch.library.opcheck(
            backend.ops.infonce_backward.default,
            (
                torch.ones((), device=backend.device, dtype=dtype),
                query.detach(),
                key.detach(),
                scale.detach(),
                lse_row,
                lse_col,
                symmetric,
            ),
        )


# ---- numerics and errors --------------------------------------------------------------------------


def test_bf16_temperature_001_stays_finite(backend):
    n = 300 if backend.emulated else 1000
    z0 = _randn(backend, n, 128, dtype=torch.bfloat16).requires_grad_()
    z1 = _randn(backend, n, 128, dtype=torch.bfloat16).requires_grad_()
    with backend:
        loss = pyssl.ops.ntxent(z0, z1, 0.01)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z0.grad).all() and torch.isfinite(z1.grad).all()
    ref, _ = ref_ntxent(torch.cat([z0, z1]).detach(), 0.01)
    assert abs(loss.item() - ref.item()) < 0.02 * max(1.0, abs(ref.item()))
    # CLIP at the logit-scale cap of 100 (the running-max path: 2 * 100 > 80).
    img = _randn(backend, n, 128, dtype=torch.bfloat16).requires_grad_()
    txt = _randn(backend, n, 128, dtype=torch.bfloat16).requires_grad_()
    with backend:
        loss = pyssl.ops.infonce(img, txt, 100.0, symmetric=True)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()


def test_aligned_views_at_low_temperature(backend):
    # Near-identical views: huge positive logits next to tiny negatives; lse must not overflow.
    z0 = _randn(backend, 200, 32)
    z1 = z0 + 1e-3 * _randn(backend, 200, 32)
    with backend:
        loss = pyssl.ops.ntxent(z0, z1, 0.01)
    ref, _ = ref_ntxent(torch.cat([z0, z1]), 0.01)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=1e-3)


def test_bad_inputs_raise(backend):
    with pytest.raises(RuntimeError, match="2N rows"):
        backend.ops.ntxent_forward(_randn(backend, 5, 4), 0.5)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        backend.ops.ntxent_backward(
            torch.ones((), device=backend.device), _randn(backend, 6, 4), torch.zeros(5, device=backend.device), 0.5
        )
    with pytest.raises(RuntimeError, match="need at least one key per query"):
        backend.ops.infonce_forward(
            _randn(backend, 5, 4), _randn(backend, 4, 4), torch.tensor(2.0, device=backend.device), False
        )
    with pytest.raises(RuntimeError, match="same dim"):
        backend.ops.infonce_forward(
            _randn(backend, 5, 4), _randn(backend, 5, 3), torch.tensor(2.0, device=backend.device), True
        )
    with pytest.raises(ValueError, match="z1"):
        pyssl.ops.ntxent(_randn(backend, 4, 3), _randn(backend, 4, 5), 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_loss_is_never_negative_and_nan_stays_nan(backend, dtype):
    # One pair (each row's only column is its positive) and aligned query/key: the exact loss is 0
    # or tiny, and rounding lse against the positive logit must not take it below 0.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for temperature in TEMPERATURES:
        for _ in range(10):
            z = _randn(backend, 2, 7, dtype=dtype)
            q = _randn(backend, 3, 7, dtype=dtype)
            scale = torch.full((), 1.0 / temperature, device=backend.device, dtype=acc)
            losses = [backend.ops.ntxent_forward(z, temperature)[0], cpu_ops.ntxent_forward(z.cpu(), temperature)[0]]
            for symmetric in (False, True):
                losses.append(backend.ops.infonce_forward(q, q, scale, symmetric)[0])
                losses.append(cpu_ops.infonce_forward(q.cpu(), q.cpu(), scale.cpu(), symmetric)[0])
            values = torch.stack([loss.double().cpu() for loss in losses])
            assert (values >= 0).all(), (temperature, values)
    z = _randn(backend, 6, 5, dtype=dtype)
    z[1, 2] = float("nan")
    assert torch.isnan(backend.ops.ntxent_forward(z, 0.5)[0])
    assert torch.isnan(backend.ops.infonce_forward(z, z, scale, True)[0])


# ---- memory: O(N d), never N x N -------------------------------------------------------------------


def _peak_extra_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_memory_is_linear_in_batch(backend):
    if backend.emulated:
        pytest.skip("measures CUDA allocator statistics")
    rows, d = 16384, 64  # the logit matrix alone would be rows^2 * 4 B = 1 GiB
    z0 = _randn(backend, rows // 2, d).requires_grad_()
    z1 = _randn(backend, rows // 2, d).requires_grad_()

    def fused():
        pyssl.ops.ntxent(z0, z1, 0.1).backward()
        z0.grad = z1.grad = None

    def eager():
        ref, _ = ref_ntxent(torch.cat([z0, z1]), 0.1, dtype=torch.float32)
        ref.backward()
        z0.grad = z1.grad = None

    fused()  # warm-up (allocator caches, cudaFuncSetAttribute)
    fused_peak = _peak_extra_bytes(fused)
    embed_bytes = rows * d * 4
    assert fused_peak < 32 * embed_bytes, f"fused peak {fused_peak / 2**20:.1f} MiB"
    assert fused_peak < rows * rows * 4 / 8
    eager_peak = _peak_extra_bytes(eager)
    assert eager_peak > 4 * fused_peak, (eager_peak, fused_peak)


# ---- property test --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 150),
    extra=st.integers(0, 80),
    d=st.integers(1, 160),
    log_scale=st.floats(math.log(1.0), math.log(100.0)),
    symmetric=st.booleans(),
)
def test_property_infonce_matches_cpu(backend, n, extra, d, log_scale, symmetric):
    keys = n if symmetric else n + extra
    query, key = _randn(backend, n, d), _randn(backend, keys, d)
    scale = torch.tensor(math.exp(log_scale), device=backend.device)
    out = backend.ops.infonce_forward(query, key, scale, symmetric)
    cpu = cpu_ops.infonce_forward(query.cpu(), key.cpu(), scale.cpu(), symmetric)
    atol = _loss_atol(torch.float32, scale.item())
    for a, b in zip(out, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=atol)
    grads = backend.ops.infonce_backward(
        torch.ones((), device=backend.device), query, key, scale, out[1], out[2], symmetric
    )
    cpu_grads = cpu_ops.infonce_backward(torch.ones(()), query.cpu(), key.cpu(), scale.cpu(), cpu[1], cpu[2], symmetric)
    for a, b in zip(grads[:2], cpu_grads[:2]):
        assert_grad_close(a.cpu(), b, torch.float32, scale.item())
    torch.testing.assert_close(grads[2].cpu(), cpu_grads[2], rtol=1e-4, atol=1e-4)


# ---- a loss that is exactly 0 is 0 ------------------------------------------------------------------


def test_aligned_single_pair_gives_exactly_zero(backend):
    # Parallel views, one pair: each row's only logit is its positive, so the loss is exactly 0
    # (lightly's value). The normalised views' dot product is 1 - 2^-24 here, so a fixed shift of
    # 1/T rounds exp(S - 1/T) to 1 and lse - S loses one ulp of 1/T (1.5e-8) unless the positive
    # is kept out of the sum.
    a, b = torch.tensor([[0.3, 0.6]]), torch.tensor([[0.7, 1.4]])
    assert pyssl.losses.NTXentLoss(7.0)(a, b).item() == 0.0
    assert pyssl.ops.infonce(a, b, 1 / 7.0).item() == 0.0
    assert pyssl.ops.infonce(a, b, 1 / 7.0, symmetric=True).item() == 0.0
    assert pyssl.ops.moco(a, b, torch.empty(0, 2), 7.0).item() == 0.0
    with backend:
        da, db = backend.to(a), backend.to(b)
        assert pyssl.losses.NTXentLoss(7.0)(da, db).item() == 0.0
        assert pyssl.ops.infonce(da, db, 1 / 7.0).item() == 0.0
        assert pyssl.ops.infonce(da, db, 1 / 7.0, symmetric=True).item() == 0.0
        assert pyssl.ops.moco(da, db, backend.to(torch.empty(0, 2)), 7.0).item() == 0.0


def _far_apart_pairs(pairs, d, seed):
    """Two views of `pairs` directions, each pair the same direction at other lengths, the
    directions orthonormal (other pairs far away), plus orthonormal queue rows."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    directions = basis[:pairs]
    view0 = (directions * (0.5 + torch.rand(pairs, 1, dtype=torch.float64, generator=g))).float()
    view1 = (directions * (0.5 + torch.rand(pairs, 1, dtype=torch.float64, generator=g))).float()
    return view0, view1, basis[pairs:].float()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pairs=st.integers(1, 6),
    extra=st.integers(0, 20),
    temperature=st.floats(0.02, 0.05),
    kind=st.sampled_from(["ntxent", "infonce", "clip", "moco"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_identical_views_far_from_others_give_a_tiny_loss(backend, pairs, extra, temperature, kind, seed):
    # Every positive has cosine 1 and every negative cosine ~0: the exact loss is about
    # (negatives) * exp(-1/T) < 1e-7, and the kernels must give it to float32's relative precision
    # (never below 0), not to an ulp of the shift 1/T (~1e-6).
    view0, view1, queue = _far_apart_pairs(pairs, pairs + 1 + extra, seed)
    if kind == "ntxent":
        expected = ref_ntxent(torch.cat([view0, view1]), temperature)[0]
        run = lambda a, b, q: pyssl.losses.NTXentLoss(temperature)(a, b)  # noqa: E731
    elif kind in ("infonce", "clip"):
        expected = ref_infonce(view0, view1, 1 / temperature, kind == "clip")[0]
        run = lambda a, b, q: pyssl.ops.infonce(a, b, 1 / temperature, symmetric=kind == "clip")  # noqa: E731
    else:
        u, v, w = (F.normalize(t.double(), dim=1) for t in (view0, view1, queue))
        logits = torch.cat([(u * v).sum(1, keepdim=True), u @ w.T], dim=1) / temperature
        expected = F.cross_entropy(logits, torch.zeros(pairs, dtype=torch.long))
        run = lambda a, b, q: pyssl.ops.moco(a, b, q, temperature)  # noqa: E731
    expected = expected.item()
    losses = {"cpu": run(view0, view1, queue).item()}
    with backend:
        losses[backend.name] = run(backend.to(view0), backend.to(view1), backend.to(queue)).item()
    for where, loss in losses.items():
        assert loss >= 0, (where, loss)
        assert abs(loss - expected) <= 1e-5 * expected + 1e-12, (where, loss, expected)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("kind", ["ntxent", "infonce", "clip"])
def test_tensor_core_gradient_of_a_near_zero_loss_is_relatively_accurate(backend, kind, dtype):
    # Parallel views far from the others at T = 0.05: the loss and every gradient entry are
    # ~1e-8, the sum of P - [j = p(i)] over each row, where P_pos = exp(S_pos - lse) ~ 1 - 1e-8.
    # The backward must see the very S_pos (row and column side) and lse the forward formed:
    # a logit one ulp off (2e-6 at |S| = 20) moves P_pos - 1 a hundred times the exact value.
    temperature = 0.05
    view0, view1, _ = _far_apart_pairs(5, 40, seed=7)
    view0, view1 = view0.to(dtype), view1.to(dtype)
    grad_scale = 2.0**14  # the fp16 gradients of ~1e-8 would be subnormal or 0

    def loss_of(a, b):
        if kind == "ntxent":
            return pyssl.losses.NTXentLoss(temperature)(a, b)
        return pyssl.ops.infonce(a, b, 1 / temperature, symmetric=kind == "clip")

    a, b = view0.double().requires_grad_(), view1.double().requires_grad_()
    if kind == "ntxent":
        ref = ref_ntxent(torch.cat([a, b]), temperature)[0]
    else:
        ref = ref_infonce(a, b, 1 / temperature, kind == "clip")[0]
    (ref * grad_scale).backward()
    with backend:
        x, y = backend.to(view0).requires_grad_(), backend.to(view1).requires_grad_()
        (loss_of(x, y) * grad_scale).backward()
    peak = max(a.grad.abs().max().item(), b.grad.abs().max().item())
    assert 1e-5 < peak < 1e-3  # the case is as described
    for actual, expected in ((x.grad, a.grad), (y.grad, b.grad)):
        torch.testing.assert_close(actual.cpu().double(), expected, rtol=0, atol=0.03 * peak)


@pytest.mark.parametrize("dim", [129, 200, 300, 512], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("symmetric", [False, True], ids=["infonce", "clip"])
def test_wide_backward_matches_reference_and_chunked_kernel(backend, symmetric, dim, monkeypatch):
    # bf16 rows of 129..512 features take wide_grad_kernel (8 warps up to 256 features, 16 up to
    # 512; d = 300 leaves the last feature group partly empty); N = 70 and 83 keys leave partial
    # row and column tiles. Against float64 and against the 128-feature chunked kernel.
    n, keys = 70, 70 if symmetric else 83
    query, key = _randn(backend, n, dim, dtype=torch.bfloat16), _randn(backend, keys, dim, dtype=torch.bfloat16)
    scale = torch.tensor(12.0, device=backend.device)
    _, lse_row, lse_col = backend.ops.infonce_forward(query, key, scale, symmetric)
    args = (torch.ones((), device=backend.device), query, key, scale, lse_row, lse_col, symmetric)
    wide = backend.ops.infonce_backward(*args)
    monkeypatch.setenv("PYSSL_INFONCE_KERNELS", "chunked")
    chunked = backend.ops.infonce_backward(*args)
    _, ref_grads = _grads_ref(lambda q, k, s: ref_infonce(q, k, s, symmetric), query, key, scale)
    q_norm, k_norm = query.double().norm(dim=1).min(), key.double().norm(dim=1).min()
    for got, old, ref, norm in zip(wide[:2], chunked[:2], ref_grads[:2], (q_norm, k_norm)):
        assert_grad_close(got, ref, torch.bfloat16, 12.0, norm)
        assert_grad_close(got, old.double(), torch.bfloat16, 12.0, norm)
    torch.testing.assert_close(wide[2], chunked[2], rtol=1e-4, atol=1e-5)
