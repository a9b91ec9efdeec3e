"""The fused InfoNCE family (NT-Xent, InfoNCE, CLIP) against float64 plain-PyTorch references."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pyssl
from pyssl import reference
from pyssl.losses import ClipLoss, InfoNCELoss, NTXentLoss
from tolerances import assert_close, leaf  # noqa: E402

# ---- float64 references --------------------------------------------------------------------


# pyssl.reference holds each op's eager formula; the tests run it in float64.
def ref_ntxent(z0, z1, temperature):
    return reference.ntxent(z0.double(), z1.double(), temperature)


def ref_infonce(query, key, logit_scale, symmetric):
    scale = logit_scale.double() if isinstance(logit_scale, torch.Tensor) else logit_scale
    return reference.infonce(query.double(), key.double(), scale, symmetric)


def grads_of(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


# N = 600 gives 1200 rows: several 512-row tiles, a partial last tile.
SHAPES = [(1, 1), (1, 7), (3, 7), (97, 128), (600, 16), (1000, 300)]
TEMPERATURES = [0.01, 0.07, 0.5, 1.0]


# ---- NT-Xent ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_ntxent_matches_reference(n, d, temperature):
    z0, z1 = leaf((n, d)), leaf((n, d))
    loss = NTXentLoss(temperature)(z0, z1)
    expected = ref_ntxent(z0, z1, temperature)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, expected, torch.float32, scale=1 / temperature)
    got = grads_of(loss, z0, z1)
    want = grads_of(expected, z0, z1)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32, scale=1 / temperature)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_ntxent_dtypes(dtype, temperature):
    z0, z1 = leaf((97, 33), dtype), leaf((97, 33), dtype)
    loss = NTXentLoss(temperature)(z0, z1)
    expected = ref_ntxent(z0, z1, temperature)
    assert loss.dtype == dtype
    assert torch.isfinite(loss)
    assert_close(loss, expected, dtype, scale=1 / temperature)
    for g, w in zip(grads_of(loss, z0, z1), grads_of(expected, z0, z1)):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert_close(g, w, dtype, scale=1 / temperature)


def test_ntxent_low_precision_at_low_temperature_stays_finite():
    # Nearly identical views at T = 0.01: logits near 100, where a fp16 logit matrix overflows exp.
    base = torch.randn(256, 64)
    for dtype in (torch.float16, torch.bfloat16):
        z0 = base.to(dtype).requires_grad_()
        z1 = (base + 1e-3 * torch.randn_like(base)).to(dtype).requires_grad_()
        loss = NTXentLoss(0.01)(z0, z1)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z0.grad).all() and torch.isfinite(z1.grad).all()
        assert_close(loss, ref_ntxent(z0, z1, 0.01), dtype, scale=100)


def test_ntxent_gradcheck():
    z0, z1 = leaf((4, 5), torch.float64), leaf((4, 5), torch.float64)
    for temperature in (0.1, 0.5):
        assert torch.autograd.gradcheck(
            lambda a, b, temperature=temperature: pyssl.ops.ntxent(a, b, temperature), (z0, z1)
        )


def test_ntxent_matches_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    z0, z1 = leaf((50, 32)), leaf((50, 32))
    ours = NTXentLoss(0.2)(z0, z1)
    theirs = lightly_loss.NTXentLoss(temperature=0.2)(z0, z1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads_of(ours, z0, z1), grads_of(theirs, z0, z1)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_ntxent_zero_norm_rows_behave_like_f_normalize():
    z0, z1 = leaf((6, 8), torch.float64), leaf((6, 8), torch.float64)
    with torch.no_grad():
        z0[2].zero_()
        z1[4].zero_()
    loss = NTXentLoss(0.3)(z0, z1)
    expected = ref_ntxent(z0, z1, 0.3)
    assert_close(loss, expected, torch.float64)
    for g, w in zip(grads_of(loss, z0, z1), grads_of(expected, z0, z1)):
        assert torch.isfinite(g).all()
        assert_close(g, w, torch.float64)


def test_ntxent_single_pair_has_one_negative():
    # N = 1: each row's only other row is its positive, so every softmax is 1 and the loss 0.
    z0, z1 = leaf((1, 4)), leaf((1, 4))
    loss = NTXentLoss(0.5)(z0, z1)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 20),
    temperature=st.floats(0.05, 2.0),
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_ntxent_properties(n, d, temperature, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    loss = pyssl.ops.ntxent(z0, z1, temperature)
    # equals the reference, is a mean of cross-entropies (>= 0), and is unchanged by a positive
    # rescaling of the embeddings, by swapping the views, and by reordering the pairs.
    assert_close(loss, ref_ntxent(z0, z1, temperature), torch.float64)
    assert loss.item() >= -1e-12
    perm = torch.randperm(n, generator=gen)
    for other in (
        pyssl.ops.ntxent(z0 * scale, z1 * scale, temperature),
        pyssl.ops.ntxent(z1, z0, temperature),
        pyssl.ops.ntxent(z0[perm], z1[perm], temperature),
    ):
        torch.testing.assert_close(other, loss, rtol=1e-9, atol=1e-12)


# ---- InfoNCE and CLIP ------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_infonce_matches_reference(n, d, temperature):
    query, key = leaf((n, d)), leaf((n, d))
    loss = InfoNCELoss(temperature)(query, key)
    expected = ref_infonce(query, key, 1 / temperature, symmetric=False)
    assert_close(loss, expected, torch.float32, scale=1 / temperature)
    for g, w in zip(grads_of(loss, query, key), grads_of(expected, query, key)):
        assert_close(g, w, torch.float32, scale=1 / temperature)


def test_infonce_extra_keys_are_negatives():
    query, key = leaf((40, 16), torch.float64), leaf((700, 16), torch.float64)
    loss = InfoNCELoss(0.2)(query, key)
    expected = ref_infonce(query, key, 5.0, symmetric=False)
    assert_close(loss, expected, torch.float64)
    for g, w in zip(grads_of(loss, query, key), grads_of(expected, query, key)):
        assert_close(g, w, torch.float64)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("logit_scale", [1.0, 14.3, 100.0])
def test_clip_matches_reference_with_learnable_scale(n, d, logit_scale):
    image, text = leaf((n, d)), leaf((n, d))
    scale = torch.tensor(logit_scale, requires_grad=True)
    loss = ClipLoss()(image, text, scale)
    expected = ref_infonce(image, text, scale.double(), symmetric=True)
    assert_close(loss, expected, torch.float32, scale=logit_scale)
    got = grads_of(loss, image, text, scale)
    want = grads_of(expected, image, text, scale)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32, scale=logit_scale)


def test_clip_matches_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = leaf((64, 32)), leaf((64, 32))
    scale = torch.tensor(math.exp(math.log(1 / 0.07)), requires_grad=True)
    ours = ClipLoss()(image, text, scale)
    theirs = open_clip_loss.ClipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads_of(ours, image, text, scale), grads_of(theirs, image, text, scale)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"cache_labels": True}, {"local_loss": True, "gather_with_grad": True}])
def test_clip_takes_open_clips_arguments(options):
    # One process: open_clip's arguments are accepted and change nothing, as in open_clip; a
    # logit_bias shifts every logit, which no softmax sees (its gradient is 0 in both).
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = leaf((24, 16), torch.float64), leaf((24, 16), torch.float64)
    scale, bias = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (14.0, -3.0))
    ours, theirs = ClipLoss(**options), open_clip_loss.ClipLoss(**options)
    for _ in range(2):  # the second call takes open_clip's cached labels
        image_n, text_n = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        got = ours(image, text, scale, bias, output_dict=True)
        want = theirs(image_n, text_n, scale, bias, output_dict=True)
        assert set(got) == set(want) == {"contrastive_loss"}
        torch.testing.assert_close(got["contrastive_loss"], want["contrastive_loss"], rtol=1e-12, atol=1e-12)
        for g, w in zip(
            grads_of(got["contrastive_loss"], image, text, scale, bias),
            grads_of(want["contrastive_loss"], image, text, scale, bias),
        ):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours(image, text, 14.0, 2.5), theirs(image_n, text_n, 14.0, 2.5), rtol=1e-12, atol=0)


def test_clip_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank must be an integer in"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="world_size=2 needs an initialised torch.distributed group"):
        ClipLoss(world_size=2)(leaf((4, 3)), leaf((4, 3)), 10.0)
    with pytest.raises(ValueError, match="logit_bias must hold one value"):
        ClipLoss()(leaf((4, 3)), leaf((4, 3)), 10.0, torch.zeros(2))


def test_ntxent_memory_bank_matches_lightly():
    # lightly's NTXentLoss(T, memory_bank_size=(K, D)): each first view against its second view
    # and a bank of earlier second views; the same positional arguments.
    lightly_loss = pytest.importorskip("lightly.loss")
    d, size, temperature = 16, 100, 0.2
    theirs = lightly_loss.NTXentLoss(temperature, (size, d), False)
    ours = NTXentLoss(temperature, (size, d), False)
    ours.memory_bank.queue.copy_(theirs.memory_bank.bank)
    for batch in (32, 32, 32, 32, 7):
        z0, z1 = torch.randn(batch, d), torch.randn(batch, d)
        a0, a1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
        b0, b1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
        expected, loss = theirs(a0, a1), ours(b0, b1)
        torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-6)
        expected.backward()
        loss.backward()
        torch.testing.assert_close(b0.grad, a0.grad, rtol=2e-4, atol=2e-6)
        torch.testing.assert_close(b1.grad, a1.grad, rtol=2e-4, atol=2e-6)
        torch.testing.assert_close(ours.memory_bank.queue, theirs.memory_bank.bank, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # inputs without grad (evaluation): the bank stays as it is, in both
        ours(torch.randn(5, d), torch.randn(5, d))
    torch.testing.assert_close(ours.memory_bank.queue, theirs.memory_bank.bank, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size", [5, (5,), (5, 0), (5, 4, 3), (-1, 4), (True, 4), "5"])
def test_ntxent_memory_bank_size_errors_name_the_argument(size):
    with pytest.raises(ValueError, match="memory_bank_size"):
        NTXentLoss(0.5, size)


@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_gradcheck(symmetric):
    query, key = leaf((5, 3), torch.float64), leaf((5 if symmetric else 7, 3), torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, s: pyssl.ops.infonce(q, k, s, symmetric=symmetric), (query, key, scale)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_low_precision_large_scale_finite(dtype):
    image, text = leaf((128, 64), dtype), leaf((128, 64), dtype)
    loss = ClipLoss()(image, text, 100.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    assert_close(loss, ref_infonce(image, text, 100.0, True), dtype, scale=100)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 30),
    extra=st.integers(0, 30),
    d=st.integers(1, 16),
    logit_scale=st.floats(0.5, 60.0),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_infonce_properties(n, extra, d, logit_scale, symmetric, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = n if symmetric else n + extra
    query = torch.randn(n, d, generator=gen, dtype=torch.float64)
    key = torch.randn(keys, d, generator=gen, dtype=torch.float64)
    loss = pyssl.ops.infonce(query, key, logit_scale, symmetric=symmetric)
    assert_close(loss, ref_infonce(query, key, logit_scale, symmetric), torch.float64)
    # CLIP is symmetric in its two inputs.
    if symmetric:
        swapped = pyssl.ops.infonce(key, query, logit_scale, symmetric=True)
        torch.testing.assert_close(swapped, loss, rtol=1e-9, atol=1e-12)


# ---- operator registration: opcheck and torch.compile ------------------------------------------


def test_opcheck_ntxent():
    z = torch.randn(10, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssl.ntxent_forward.default, (z, 0.5))
    lse = torch.ops.pyssl.ntxent_forward(z.detach(), 0.5)[1]
    torch.library.opcheck(torch.ops.pyssl.ntxent_backward.default, (torch.tensor(1.0), z.detach(), lse, 0.5))


@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_infonce(symmetric):
    query = torch.randn(6, 5, requires_grad=True)
    key = torch.randn(6 if symmetric else 9, 5, requires_grad=True)
    scale = torch.tensor(7.0, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssl.infonce_forward.default, (query, key, scale, symmetric))
    _, lse_row, lse_col = torch.ops.pyssl.infonce_forward(query.detach(), key.detach(), scale.detach(), symmetric)
    args = (torch.tensor(1.0), query.detach(), key.detach(), scale.detach(), lse_row, lse_col, symmetric)
    torch.library.opcheck(torch.ops.pyssl.infonce_backward.default, args)
    torch.library.opcheck(torch.ops.pyssl.infonce_backward.default, (*args, None, [True, False, False]))
    torch.library.opcheck(torch.ops.pyssl.infonce_backward.default, (*args, None, [False, True, True]))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    ntxent, clip = NTXentLoss(0.5), ClipLoss()
    scale = torch.tensor(10.0, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(z0, z1):
        return ntxent(z0, z1) + clip(z0 * 2, z1, scale)

    z0, z1 = leaf((12, 8)), leaf((12, 8))
    loss = step(z0, z1)
    loss.backward()
    expected = ref_ntxent(z0, z1, 0.5) + ref_infonce(z0 * 2, z1, scale.double(), True)
    assert_close(loss, expected, torch.float32)
    z0_eager, z1_eager = z0.detach().clone().requires_grad_(), z1.detach().clone().requires_grad_()
    (ntxent(z0_eager, z1_eager) + clip(z0_eager * 2, z1_eager, scale)).backward()
    assert_close(z0.grad, z0_eager.grad, torch.float32)


def test_autocast_cpu_bf16():
    linear = torch.nn.Linear(16, 8)
    x0, x1 = torch.randn(20, 16), torch.randn(20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = NTXentLoss(0.2)(linear(x0), linear(x1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(linear.weight.grad).all()


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: NTXentLoss(0.5)(torch.randn(4, 3), torch.randn(5, 3)), ValueError, "same shape"),
        (lambda: NTXentLoss(0.5)(torch.randn(4), torch.randn(4)), ValueError, "z0 must be 2-D"),
        (lambda: NTXentLoss(0.5)(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "z0 is an empty batch"),
        (
            lambda: NTXentLoss(0.5)(torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3)),
            TypeError,
            "z0 must be a floating",
        ),
        (lambda: NTXentLoss(0.5)(torch.randn(4, 3), [1, 2]), TypeError, "z1 must be a torch.Tensor"),
        (lambda: NTXentLoss(0.0), ValueError, "temperature must be a finite number > 0"),
        (lambda: NTXentLoss(-1.0), ValueError, "temperature"),
        (lambda: NTXentLoss(float("nan")), ValueError, "temperature"),
        (lambda: InfoNCELoss(0.1)(torch.randn(4, 3), torch.randn(4, 5)), ValueError, "same feature dim"),
        (lambda: InfoNCELoss(0.1)(torch.randn(4, 3), torch.randn(3, 3)), ValueError, "at least one row"),
        (lambda: ClipLoss()(torch.randn(4, 3), torch.randn(5, 3), 10.0), ValueError, "same batch size"),
        (lambda: ClipLoss()(torch.randn(4, 3), torch.randn(4, 3), 0.0), ValueError, "logit_scale"),
        (lambda: ClipLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.ones(2)), ValueError, "logit_scale"),
        (
            lambda: NTXentLoss(0.5, check_inputs_finite=True)(torch.full((3, 2), float("nan")), torch.randn(3, 2)),
            ValueError,
            "z0 contains NaN",
        ),
        (lambda: torch.ops.pyssl.ntxent_forward(torch.randn(3, 2), 0.5), RuntimeError, "two views"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_negative_learnable_logit_scale_is_a_clear_error():
    with pytest.raises(RuntimeError, match="logit_scale must be > 0"):
        ClipLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(-1.0))


def test_devices_must_match():
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="one device"):
        NTXentLoss(0.5)(torch.randn(4, 3), meta)


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ntxent_cuda_matches_cpu(backend, dtype):
    z0, z1 = leaf((300, 64), dtype), leaf((300, 64), dtype)
    expected = ref_ntxent(z0, z1, 0.1)
    a, b = backend.to(z0.detach()).requires_grad_(), backend.to(z1.detach()).requires_grad_()
    with backend:
        loss = NTXentLoss(0.1)(a, b)
        device_grads = grads_of(loss, a, b)
    assert_close(loss.cpu(), expected, dtype, scale=10)
    for g, w in zip(device_grads, grads_of(expected, z0, z1)):
        assert_close(g.cpu(), w, dtype, scale=10)


def test_backward_asks_only_for_the_gradients_autograd_needs():
    # A detached key (MoCo v3's momentum keys) must not cost the key-side sweep: the autograd
    # formula passes needs_input_grad on as the op's output_mask.
    masks = []

    class Spy:
        def infonce_backward(self, *args):
            masks.append(args[-1])
            return torch.ops.pyssl.infonce_backward(*args)

    class Context:
        def save_for_backward(self, *tensors):
            self.saved_tensors = tensors

    backward = pyssl.ops._infonce_backward(Spy())
    query, key, scale = torch.randn(8, 5), torch.randn(8, 5), torch.tensor(5.0)
    for needs in ((True, False, False, False, False), (False, True, True, False, False)):
        inputs = (query, key, scale, True, None)
        ctx = Context()
        ctx.needs_input_grad = needs
        output = torch.ops.pyssl.infonce_forward(*inputs)
        pyssl.ops._infonce_setup_context(ctx, inputs, output)
        grads = backward(ctx, torch.ones(()), None, None)
        assert [g is not None for g in grads[:3]] == list(needs[:3])
    assert masks == [[True, False, False], [False, True, True]]
