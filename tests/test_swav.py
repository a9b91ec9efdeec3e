"""SwAV: SwaVLoss against a float64 pair-by-pair reference and lightly's module (values and
gradients, with and without a queue), gradcheck, the Sinkhorn codes' normalisation, bad input,
two Gloo ranks; SwaVPrototypes; the method (registry, config, queue, frozen prototypes, exact
resume, features that beat random init)."""

from __future__ import annotations

import copy
import csv
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from probing import trained_and_random  # noqa: E402
from pyssl import distributed, reference
from pyssl.config import build_trainer, resolve
from pyssl.data import load_digits
from pyssl.losses import SwaVLoss
from pyssl.losses.swav import sinkhorn, swav_loss_reference
from pyssl.methods import SwAV, available_methods, build_method
from pyssl.models import SwaVPrototypes
from pyssl.train import StopTraining, TrainConfig, Trainer, load_checkpoint

F64 = dict(rtol=1e-9, atol=1e-11)
# float32 against float64 (or lightly's float32): a few log-softmaxes and Sinkhorn's handful of
# normalisations, each rounded once.
F32 = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: a second OpenMP thread only waits for the shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lightly_swav():
    return pytest.importorskip("lightly.loss.swav_loss")


def scores(n_views, rows, k, *, seed, dtype=torch.float64, grad=True):
    """Cosine scores of unit projections against unit prototypes, as SwAV's prototypes give."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(k, 6, generator=gen, dtype=torch.float64), dim=1)
    out = []
    for _ in range(n_views):
        z = F.normalize(torch.randn(rows, 6, generator=gen, dtype=torch.float64), dim=1)
        out.append((z @ prototypes.T).to(dtype).requires_grad_(grad))
    return out


def crops(n_high, n_low, rows, k, queue_rows=0, *, seed, dtype=torch.float64):
    views = scores(n_high + n_low, rows, k, seed=seed, dtype=dtype)
    queue = scores(n_high, queue_rows, k, seed=seed + 1000, dtype=dtype, grad=False) if queue_rows else None
    return views[:n_high], views[n_high:], queue


def grads(loss, inputs):
    # a lone high-resolution crop only gives codes: no gradient (zeros here)
    return torch.autograd.grad(loss, inputs, materialize_grads=True)


# (high-res crops, low-res crops, batch, prototypes, queue rows)
CASES = [(2, 0, 8, 5, 0), (2, 4, 8, 12, 0), (1, 1, 6, 3, 0), (3, 2, 5, 7, 0), (2, 3, 8, 16, 24), (1, 2, 4, 6, 10)]


# ---- the loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_high,n_low,rows,k,queue_rows", CASES)
def test_loss_and_gradients_match_the_float64_reference(n_high, n_low, rows, k, queue_rows):
    high, low, queue = crops(n_high, n_low, rows, k, queue_rows, seed=rows + k)
    for kwargs in ({}, dict(temperature=0.3, sinkhorn_iterations=5, sinkhorn_epsilon=0.2)):
        got = SwaVLoss(**kwargs)(high, low, queue)
        expected = swav_loss_reference(high, low, queue, **kwargs)
        torch.testing.assert_close(got, expected, **F64)
        expected_grads = grads(expected, high + low)
        for g, e in zip(grads(got, high + low), expected_grads):
            torch.testing.assert_close(g, e, **F64)
        # float32 input: computed in float32, within rounding of the float64 answer
        high32 = [z.detach().float().requires_grad_() for z in high]
        low32 = [z.detach().float().requires_grad_() for z in low]
        queue32 = None if queue is None else [q.float() for q in queue]
        got32 = SwaVLoss(**kwargs)(high32, low32, queue32)
        assert got32.dtype == torch.float32 and got32.shape == ()
        torch.testing.assert_close(got32.double(), expected, **F32)
        for g, e in zip(grads(got32, high32 + low32), expected_grads):
            torch.testing.assert_close(g.double(), e, **F32)


@pytest.mark.parametrize("n_high,n_low,rows,k,queue_rows", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_lightly_with_and_without_a_queue(n_high, n_low, rows, k, queue_rows, dtype):
    theirs = lightly_swav().SwaVLoss
    high, low, queue = crops(n_high, n_low, rows, k, queue_rows, seed=7 * rows + k, dtype=dtype)
    tol = F64 if dtype == torch.float64 else F32
    for kwargs in ({}, dict(temperature=0.2, sinkhorn_iterations=1, sinkhorn_epsilon=0.1)):
        got, expected = SwaVLoss(**kwargs)(high, low, queue), theirs(**kwargs)(high, low, queue)
        assert expected.shape == (1,) and got.shape == ()  # lightly's is a 1-element vector
        torch.testing.assert_close(got, expected.reshape(()), **tol)
        for g, e in zip(grads(got, high + low), grads(expected.sum(), high + low)):
            torch.testing.assert_close(g, e, **tol)


def test_gradcheck_of_the_predicting_crops():
    # the codes are a stop-gradient of the high-resolution scores, so only the crops that merely
    # predict (low resolution) have a gradient that finite differences can see
    high, low, queue = crops(2, 3, 4, 5, 6, seed=3)
    high = [z.detach() for z in high]
    for q in (None, queue):

        def loss(*views, q=q):
            return SwaVLoss(temperature=0.5)(high, list(views), q)

        assert torch.autograd.gradcheck(loss, tuple(low))


def test_the_codes_get_no_gradient_and_each_crop_predicts_the_others_codes():
    high, low, _ = crops(2, 1, 6, 4, seed=5)
    q0, q1 = (sinkhorn(z) for z in high)
    logp = [F.log_softmax(z / 0.1, dim=1) for z in (*high, *low)]
    # crop 0 predicts q1, crop 1 q0, the low-res crop both; two pairs per code
    expected = -((q1 * logp[0]).sum(1).mean() + (q0 * logp[1]).sum(1).mean()) / 2
    expected = expected - ((q0 + q1) * logp[2]).sum(1).mean() / 2
    got = SwaVLoss()(high, low)
    torch.testing.assert_close(got, expected / 2, **F64)
    # the gradient is that of the cross-entropies with the codes held fixed
    for g, e in zip(grads(got, high + low), grads(expected / 2, high + low)):
        torch.testing.assert_close(g, e, **F64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32_and_returned_in_the_input_dtype(dtype):
    high, low, queue = crops(2, 2, 8, 10, 8, seed=11, dtype=dtype)
    got = SwaVLoss()(high, low, queue)
    assert got.dtype == dtype
    expected = swav_loss_reference(high, low, queue)  # the half inputs, in float64
    torch.testing.assert_close(got.double(), expected, rtol=1e-2 if dtype == torch.float16 else 2e-2, atol=0)
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads(got, high + low))
    # lightly's Sinkhorn takes exp(scores / 0.05) in the input dtype: float16 overflows past 11
    ours, theirs = sinkhorn(high[0]), lightly_swav().sinkhorn(high[0].detach())
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    if dtype == torch.float16:
        assert not torch.isfinite(theirs).all()


def test_autocast_leaves_the_loss_in_float32():
    high, low, _ = crops(2, 2, 6, 5, seed=2, dtype=torch.float32)
    plain = SwaVLoss()(high, low)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = SwaVLoss()(high, low)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain)


def test_bad_input_names_the_argument():
    (a, b), (c,), (q0, q1) = crops(2, 1, 4, 3, 5, seed=0)
    loss = SwaVLoss()
    cases = [
        ((a, [c]), TypeError, "high_resolution_outputs must be a list"),
        (([], [c]), ValueError, "high_resolution_outputs must hold at least 1"),
        (([a], []), ValueError, "at least two crops"),
        (([a, b], [c[:, :2]]), ValueError, r"low_resolution_outputs\[0\] has shape \(4, 2\)"),
        (([a, b[:3]], []), ValueError, r"high_resolution_outputs\[1\] has shape \(3, 3\)"),
        (([a, b.long()], []), TypeError, r"high_resolution_outputs\[1\] must be a floating tensor"),
        (([a, b], [c[0]]), ValueError, r"low_resolution_outputs\[0\] must be 2-D"),
        (([a, b], ["c"]), TypeError, r"low_resolution_outputs\[0\] must be a torch.Tensor"),
        (([a, b], [c], [q0]), ValueError, "queue_outputs must hold one tensor per high-resolution crop"),
        (([a, b], [c], [q0, q1[:, :2]]), ValueError, r"queue_outputs\[1\] has 2 prototypes"),
        (([a, b], [c], q0), TypeError, "queue_outputs must be a list"),
        (([a[:0], b[:0]], []), ValueError, "empty batch"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            loss(*args)
    for kwargs, error, match in [
        (dict(temperature=0), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(sinkhorn_epsilon=-1.0), ValueError, "sinkhorn_epsilon"),
        (dict(sinkhorn_iterations=-1), ValueError, "sinkhorn_iterations"),
        (dict(sinkhorn_iterations=2.5), TypeError, "sinkhorn_iterations"),
        (dict(sinkhorn_gather_distributed="yes"), TypeError, "sinkhorn_gather_distributed"),
    ]:
        with pytest.raises(error, match=match):
            SwaVLoss(**kwargs)


def test_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(dist, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sinkhorn_gather_distributed is True but torch.distributed is not available"):
        SwaVLoss(sinkhorn_gather_distributed=True)
    # without a process group it is inert: the single-process loss
    monkeypatch.undo()
    high, low, _ = crops(2, 1, 5, 4, seed=9)
    torch.testing.assert_close(SwaVLoss(sinkhorn_gather_distributed=True)(high, low), SwaVLoss()(high, low), **F64)


# ---- Sinkhorn-Knopp -----------------------------------------------------------------------------


@pytest.mark.parametrize("rows,k", [(8, 5), (5, 12), (32, 32), (1, 4)])
def test_sinkhorn_codes_are_distributions_that_spread_the_prototypes(rows, k):
    (s,) = scores(1, rows, k, seed=rows * k, grad=True)
    q = sinkhorn(s)
    assert not q.requires_grad and q.dtype == torch.float64
    torch.testing.assert_close(q, reference.sinkhorn(s.detach()), **F64)
    # each sample's codes sum to 1 (the last normalisation is the samples')
    torch.testing.assert_close(q.sum(1), torch.ones(rows, dtype=torch.float64), **F64)
    assert (q >= 0).all()
    # each prototype's share of the batch tends to B / K: closer with every iteration
    errors = [(sinkhorn(s, n).sum(0) - rows / k).abs().max().item() for n in (1, 3, 10, 300)]
    assert all(a >= b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-9
    # 0 iterations: the normalised exponential times B, as lightly's
    torch.testing.assert_close(sinkhorn(s, 0), rows * F.softmax(s.detach().flatten() / 0.05, 0).view(rows, k), **F64)


@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_sinkhorn_matches_lightly(iterations):
    (s,) = scores(1, 9, 7, seed=iterations, dtype=torch.float32, grad=False)
    torch.testing.assert_close(sinkhorn(s, iterations, 0.1), lightly_swav().sinkhorn(s, iterations, 0.1), **F32)


def test_sinkhorn_survives_scores_whose_exponential_overflows_float32():
    (s,) = scores(1, 6, 5, seed=1, grad=False)
    s = 6.0 * s  # exp(6 / 0.05) = e^120 > float32's e^88
    got = sinkhorn(s.float())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference.sinkhorn(s), **F32)
    assert not torch.isfinite(lightly_swav().sinkhorn(s.float())).all()


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


def _gathered_sinkhorn_worker(rank, inputs_path, out_dir):
    theirs = None
    try:
        theirs = __import__("lightly.loss.swav_loss", fromlist=["SwaVLoss"]).SwaVLoss
    except ImportError:
        pass
    (s,), high, low, queue = torch.load(inputs_path)
    own = slice(rank * ROWS, (rank + 1) * ROWS)
    codes = sinkhorn(s[own], 3, 0.05, gather_distributed=True)
    mine = [z[own].clone().requires_grad_() for z in high + low]
    my_queue = [q[rank * 2 * ROWS : (rank + 1) * 2 * ROWS] for q in queue]
    loss = SwaVLoss(sinkhorn_gather_distributed=True)(mine[:2], mine[2:], my_queue)
    result = {"codes": codes, "loss": loss.detach(), "grads": grads(loss, mine)}
    if theirs is not None:
        expected = theirs(sinkhorn_gather_distributed=True)(mine[:2], mine[2:], my_queue)
        result["lightly"] = (expected.detach().reshape(()), grads(expected.sum(), mine))
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs Gloo")
def test_gathered_sinkhorn_is_the_single_process_sinkhorn_of_the_whole_batch(tmp_path):
    from pyssl.launch import free_port

    s = scores(1, WORLD * ROWS, 6, seed=4, grad=False)
    high, low, queue = crops(2, 1, WORLD * ROWS, 6, WORLD * 2 * ROWS, seed=8)
    torch.save((s, [z.detach() for z in high], [z.detach() for z in low], queue), tmp_path / "inputs.pt")
    mp.start_processes(
        _entry,
        args=(_gathered_sinkhorn_worker, free_port(), (str(tmp_path / "inputs.pt"), str(tmp_path))),
        nprocs=WORLD,
    )
    whole = sinkhorn(s[0])
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    torch.testing.assert_close(torch.cat([r["codes"] for r in results]), whole, **F64)
    # the loss with gathered codes: each rank's cross-entropies over its own rows, with the codes
    # of the whole batch (and both ranks' queues); the mean over ranks is the one-process loss
    # over the whole batch with the concatenated queue
    expected = swav_loss_reference(high, low, queue)
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, expected, **F64)
    for r in results:
        if "lightly" in r:
            torch.testing.assert_close(r["loss"], r["lightly"][0], **F64)
            for g, e in zip(r["grads"], r["lightly"][1]):
                torch.testing.assert_close(g, e, **F64)


# ---- prototypes ---------------------------------------------------------------------------------


def test_prototypes_are_renormalised_scores_and_frozen_for_the_first_steps():
    p = SwaVPrototypes(6, 10, n_steps_frozen_prototypes=2)
    with torch.no_grad():
        p.heads[0].weight.mul_(3.0)
    p.normalize()
    torch.testing.assert_close(p.heads[0].weight.norm(dim=1), torch.ones(10))
    z = F.normalize(torch.randn(4, 6), dim=1)
    out = p(z, step=0)
    assert out.shape == (4, 10) and p.heads[0].bias is None
    torch.testing.assert_close(out, z @ p.heads[0].weight.T)
    assert out.abs().max() <= 1 + 1e-6  # cosine similarities
    for step, trains in ((0, False), (1, False), (2, True), (5, True)):
        p(z, step=step).sum().backward() if trains else p(z, step=step)
        assert p.heads[0].weight.requires_grad is trains, step
    with pytest.raises(ValueError, match="needs the training step"):
        p(z)
    several = SwaVPrototypes(6, [10, 3])
    assert [s.shape[1] for s in several(z)] == [10, 3]
    with pytest.raises(ValueError, match="n_prototypes"):
        SwaVPrototypes(6, 0)
    with pytest.raises(ValueError, match="n_steps_frozen_prototypes"):
        SwaVPrototypes(6, 3, n_steps_frozen_prototypes=-1)


# ---- the method ---------------------------------------------------------------------------------


def images(n=8, size=16):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _identity_views(x):
    return (x.float() / 255 - 0.5) / 0.5  # the default mean and std: the views are the images


def _small_views(x):
    return F.interpolate(_identity_views(x), size=8, mode="bilinear", align_corners=False)


@torch.no_grad()
def step_projections(m, x, n_low):
    """A step's normalised projections of the identity views: the backbone encodes each
    resolution as a batch, the head all crops at once (its BatchNorm statistics over all)."""
    f_high = m.backbone(torch.cat([_identity_views(x)] * 2))
    f_low = m.backbone(torch.cat([_small_views(x)] * n_low))
    return F.normalize(m.projection_head(torch.cat([f_high, f_low])), dim=1)


def small_swav(**kw):
    base = dict(backbone="convnet-small", image_size=16, hidden_dim=32, out_dim=16, n_prototypes=20)
    return build_method("swav", **{**base, **kw})


def test_registered_and_built_through_the_config():
    assert "swav" in available_methods()
    run = resolve("swav", device="cpu", epochs=1)
    assert run.method_cfg["backbone"] == "convnet-small" and run.method_cfg["hidden_dim"] == 512
    # the paper freezes the prototypes for the first epoch: one epoch of steps on the digits
    assert run.method_cfg["freeze_prototypes_steps"] == len(run.train_set) // run.train.batch_size
    # 1,258 digits: one prototype per 4 images; 16 px: no low-resolution crops
    assert run.method_cfg["n_prototypes"] == 314 and run.method_cfg["n_low_res"] == 0
    assert build_trainer(run).method.low_res_augment is None
    run = resolve("swav", device="cpu", epochs=1, n_low_res=4)  # the user's setting wins
    m = build_trainer(run).method
    assert isinstance(m, SwAV) and m.prototypes.n_steps_frozen_prototypes == m.freeze_prototypes_steps
    assert m.augment.size == (16, 16) and m.low_res_augment.size == (7, 7)  # 16 * 96 / 224
    # the small crops take the areas just below the large ones', in the paper's 0.05 / 0.14
    assert m.augment.scale == (0.3, 1.0) and m.low_res_augment.scale == pytest.approx((0.3 * 0.05 / 0.14, 0.3))
    assert m.low_res_augment.jitter == m.augment.jitter and m.low_res_augment.p_flip == m.augment.p_flip == 0.0
    with pytest.raises(ValueError, match="n_low_res"):
        small_swav(n_low_res=-1)
    with pytest.raises(ValueError, match="at least two crops"):
        small_swav(n_high_res=1, n_low_res=0)
    with pytest.raises(ValueError, match="queue_size"):
        small_swav(queue_size=-4)


def test_the_loss_is_swav_of_the_crops_normalised_projections_and_both_resolutions_are_one_call_each():
    torch.manual_seed(0)
    m = small_swav(n_low_res=3, augment=_identity_views, low_res_augment=_small_views)
    out = m.training_step(images())
    x = images()
    z = step_projections(m, x, 3)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(40))
    high = list(m.prototypes(z[:16], 0).chunk(2))
    low = list(m.prototypes(z[16:], 0).chunk(3))
    torch.testing.assert_close(out.loss, SwaVLoss()(high, low), rtol=1e-5, atol=1e-5)
    assert set(out.metrics) == {"loss", "prototypes_used"} and 0 < out.metrics["prototypes_used"] <= 1
    out.loss.backward()
    assert all(p.grad is not None for p in (*m.backbone.parameters(), *m.prototypes.parameters()))

    # the default augmentation: one fused call per resolution, n views each
    m = small_swav(n_low_res=3)
    calls = []
    for aug in (m.augment, m.low_res_augment):
        real = aug.views
        aug.views = lambda x, n, real=real: calls.append(n) or real(x, n)
    m.training_step(images())
    assert calls == [2, 3]


def test_prototypes_are_renormalised_each_step_and_frozen_for_the_first_steps():
    m = small_swav(freeze_prototypes_steps=2)
    with torch.no_grad():
        m.prototypes.heads[0].weight.mul_(2.0)
    for step in range(3):
        m.zero_grad(set_to_none=True)
        m.set_progress(step, 10)
        m.training_step(images()).loss.backward()
        torch.testing.assert_close(m.prototypes.heads[0].weight.norm(dim=1), torch.ones(20))
        assert (m.prototypes.heads[0].weight.grad is None) == (step < 2), step
        assert all(p.grad is not None for p in m.projection_head.parameters())


def test_the_queue_holds_past_projections_and_joins_sinkhorn_once_full_and_started(monkeypatch):
    torch.manual_seed(0)
    m = small_swav(
        queue_size=12, queue_start_step=3, n_low_res=1, augment=_identity_views, low_res_augment=_small_views
    )
    seen = []
    real = m.criterion.forward
    monkeypatch.setattr(
        m.criterion,
        "forward",
        lambda h, lo, q=None: seen.append(None if q is None else [t.clone() for t in q]) or real(h, lo, q),
    )
    x = images()
    for step in range(5):
        m.set_progress(step, 10)
        m.training_step(x)
        assert int(m.queue_filled) == min(12, 8 * (step + 1))
        torch.testing.assert_close(m.queue[:, :8], step_projections(m, x, 1)[:16].view(2, 8, -1))  # newest first
    # full after 2 steps, used from step 3 on; its scores are the current prototypes'
    assert [q is not None for q in seen] == [False, False, False, True, True]
    assert seen[4][0].shape == (12, 20) and not seen[4][0].requires_grad
    # a checkpoint carries the queue and its count
    fresh = small_swav(queue_size=12, queue_start_step=3, n_low_res=1)
    fresh.load_state_dict(m.state_dict())
    fresh.set_progress(3, 10)
    assert fresh.queue_in_use() and torch.equal(fresh.queue, m.queue)


@pytest.mark.parametrize("queue_size", [0, 32])
def test_resume_mid_epoch_reproduces_losses_exactly(tmp_path, queue_size):
    # as tests/test_train.py: 3 steps per epoch, 2 epochs; checkpoints every 2 steps, stopped at 5
    data = load_digits("train", size=8).subset(torch.arange(96))

    def method(seed=0):
        torch.manual_seed(seed)
        return build_method(
            "swav",
            backbone="convnet-small",
            image_size=8,
            hidden_dim=16,
            out_dim=8,
            n_prototypes=10,
            n_low_res=2,
            freeze_prototypes_steps=3,  # frozen until step 3, after the first checkpoint
            queue_size=queue_size,
            queue_start_step=3,
        )

    def cfg(out, **kw):
        base = dict(epochs=2, batch_size=32, lr=0.05, out_dir=str(out), progress=False, tensorboard=False)
        return TrainConfig(**{**base, "warmup_epochs": 1, "seed": 3, "checkpoint_every": 2, **kw})

    def stop_at(n):
        def cb(trainer, step, loss):
            if step == n:
                raise StopTraining

        return cb

    full = Trainer(method(), data, cfg(tmp_path / "full")).fit()
    assert full.steps == 6
    part = Trainer(method(), data, cfg(tmp_path / "cut"), callbacks=[stop_at(5)]).fit()
    assert part.stopped and part.losses == full.losses[:5]
    resumed_trainer = Trainer(method(seed=99), data, cfg(tmp_path / "cut"))
    resumed = resumed_trainer.fit(resume=True)
    assert resumed.losses == full.losses[4:]
    with open(tmp_path / "cut" / "metrics.csv") as f:
        assert [float(r["loss"]) for r in csv.DictReader(f)] == full.losses
    for (n, p), (_, q) in zip(
        load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))["model"].items(),
        resumed_trainer.method.state_dict().items(),
    ):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_features_beat_the_random_init_encoder_on_the_digits(tmp_path):
    run = resolve("swav", "digits", device="cpu", epochs=40, out=str(tmp_path), knn_every=0, progress=False)
    trainer = build_trainer(run)
    random_init = copy.deepcopy(trainer.method)
    result = trainer.fit()
    assert result.losses[-1] < result.losses[0] - 0.5
    scores = trained_and_random(trainer, random_init)
    assert scores["trained"][1] > scores["random"][1] + 0.02, scores
    assert scores["trained"][0] > scores["random"][0], scores
