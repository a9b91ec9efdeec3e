"""MoCo's Shuffle-BN in one process: SplitBatchNorm and the key shuffle against float64
references, the divisibility check, the default that changes nothing, and the trainer's
SyncBatchNorm decision. The two-process (Gloo) checks are in test_distributed.py."""

import copy

import pytest
import torch
from torch import nn

from pyssl import distributed, train
from pyssl.data import ImageDataset
from pyssl.methods import MethodError, MoCo, build_method
from pyssl.models import SplitBatchNorm, build_backbone
from pyssl.momentum import update_momentum
from pyssl.train import TrainConfig, Trainer, use_sync_bn

CHANNELS, SIZE, OUT_DIM, EPS = 3, 4, 5, 1e-5
F64 = dict(rtol=1e-10, atol=1e-12)


# ---- float64 references (shared with test_distributed.py) -------------------------------------


def ref_group_bn(x, group_size, weight, bias, eps=EPS):
    """BatchNorm in training mode over consecutive groups of ``group_size`` rows of ``x``
    (N, C, ...), each with its own biased mean and variance, in float64."""
    x = x.double()
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = []
    for chunk in x.split(group_size):
        mean, var = chunk.mean(dims, keepdim=True), chunk.var(dims, unbiased=False, keepdim=True)
        out.append((chunk - mean) / torch.sqrt(var + eps) * weight.double().view(shape) + bias.double().view(shape))
    return torch.cat(out)


def bn_backbone(channels=CHANNELS):
    """A backbone that is only a BatchNorm (then flattened), with a random affine part: its
    output says exactly which samples a row was normalised with."""
    bn = nn.BatchNorm2d(channels, eps=EPS)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    return nn.Sequential(bn, nn.Flatten())


def bn_moco(bn_splits=1, **kw):
    """MoCo v1 (a linear head: no BatchNorm of its own) on :func:`bn_backbone`, in float64."""
    return MoCo(
        backbone=bn_backbone(),
        version=1,
        image_size=SIZE,
        in_channels=CHANNELS,
        out_dim=OUT_DIM,
        queue_size=8,
        momentum=0.5,
        bn_splits=bn_splits,
        **kw,
    ).double()


def ref_keys(method, views, permutation, group_size):
    """The keys of ``views`` (the whole global batch) when the key encoder normalises
    consecutive groups of ``group_size`` rows of ``views[permutation]``, put back in the order
    of ``views``, in float64."""
    bn, head = method.backbone_momentum[0], method.projection_head_momentum[0]
    shuffled = ref_group_bn(views[permutation], group_size, bn.weight, bn.bias).flatten(1)
    keys_shuffled = shuffled @ head.weight.double().T + head.bias.double()
    keys = torch.empty_like(keys_shuffled)
    keys[permutation] = keys_shuffled
    return keys


def ref_queries(method, views, group_size):
    bn, head = method.backbone[0], method.projection_head[0]
    features = ref_group_bn(views, group_size, bn.weight, bn.bias).flatten(1)
    return features @ head.weight.double().T + head.bias.double()


def keys_and_permutation(method, views):
    """``method._keys(views)`` and the permutation it shuffled with: the permutation is drawn
    from the global RNG (rank 0's when distributed), so it is drawn again from the same state."""
    state = torch.get_rng_state()
    keys = method._keys(views)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    permutation = distributed.shared_permutation(distributed.world_size() * views.shape[0], views.device)
    torch.set_rng_state(after)
    return keys, permutation


def crosses_groups(permutation, group_size):
    """True when some sample is normalised in another group for its key than for its query."""
    position = torch.argsort(permutation)
    return bool((position // group_size != torch.arange(len(permutation)) // group_size).any())


# ---- SplitBatchNorm -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 3), (12, 3, 5), (12, 3, 4, 4), (12, 3, 2, 3, 2)])
@pytest.mark.parametrize("splits", [1, 2, 3, 4])
def test_split_batchnorm_training_matches_reference(shape, splits):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    bn = SplitBatchNorm(shape[1], splits, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    out = bn.train()(x)
    weight, bias = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = ref_group_bn(x_ref, shape[0] // splits, weight, bias)
    torch.testing.assert_close(out, expected, **F64)
    # gradients through the chunks equal the reference's
    upstream = torch.randn(shape, dtype=torch.float64)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, **F64)
    torch.testing.assert_close(bn.weight.grad, weight.grad, **F64)
    torch.testing.assert_close(bn.bias.grad, bias.grad, **F64)
    # running statistics: the mean over the chunks of each chunk's own momentum update
    # (unbiased variance), as the MoCo demo's SplitBatchNorm does
    dims = [0, *range(2, x.dim())]
    chunks = x.detach().split(shape[0] // splits)
    chunk_means = torch.stack([c.mean(dims) for c in chunks])
    chunk_vars = torch.stack([c.var(dims, unbiased=True) for c in chunks])
    torch.testing.assert_close(bn.running_mean, (0.7 * mean0 + 0.3 * chunk_means).mean(0), **F64)
    torch.testing.assert_close(bn.running_var, (0.7 * var0 + 0.3 * chunk_vars).mean(0), **F64)
    assert int(bn.num_batches_tracked) == 1
    # eval mode is a plain BatchNorm on the running statistics
    plain = nn.BatchNorm1d(shape[1]).double()
    plain.load_state_dict(bn.state_dict())
    plain.eval()
    y = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(bn.eval()(y), plain(y.reshape(shape[0], shape[1], -1)).reshape(shape), **F64)


def test_split_batchnorm_cumulative_average_and_untracked():
    x = torch.randn(8, 4, dtype=torch.float64)
    bn = SplitBatchNorm(4, 2, momentum=None).double().train()
    bn(x)
    bn(x)
    chunks = x.split(4)
    # momentum=None: a cumulative average; two identical steps average to the chunks' statistics
    torch.testing.assert_close(bn.running_mean, torch.stack([c.mean(0) for c in chunks]).mean(0), **F64)
    assert int(bn.num_batches_tracked) == 2
    untracked = SplitBatchNorm(4, 2, track_running_stats=False).double().train()
    torch.testing.assert_close(untracked(x), ref_group_bn(x, 4, untracked.weight, untracked.bias), **F64)
    assert untracked.running_mean is None
    with pytest.raises(ValueError, match="not divisible"):
        bn(torch.randn(7, 4, dtype=torch.float64))


def test_convert_keeps_parameters_and_state_dict_names():
    net = build_backbone("convnet-small", 3, 8)
    plain_state = {k: v.clone() for k, v in net.state_dict().items()}
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    converted = SplitBatchNorm.convert(net, 4)
    assert converted is net
    splits = [m for m in net.modules() if isinstance(m, SplitBatchNorm)]
    assert len(splits) == len(bns) > 0 and not any(type(m) is nn.BatchNorm2d for m in net.modules())
    assert all(s.weight is b.weight and s.running_var is b.running_var for s, b in zip(splits, bns))
    assert net.state_dict().keys() == plain_state.keys()
    # a backbone trained with splits loads into a plain one (what pyssl eval does)
    build_backbone("convnet-small", 3, 8).load_state_dict(net.state_dict())
    root = nn.BatchNorm1d(3)
    assert isinstance(SplitBatchNorm.convert(root, 2), SplitBatchNorm)

    class BatchNormRelu(nn.BatchNorm1d):  # a subclass with a forward of its own stays as it is
        def forward(self, x):
            return torch.relu(super().forward(x))

    assert type(SplitBatchNorm.convert(BatchNormRelu(3), 2)) is BatchNormRelu


# ---- the key shuffle ----------------------------------------------------------------------------


def test_shuffle_and_unshuffle_batch_single_process():
    x = torch.randn(10, 3, 2, 2)
    shuffled, permutation = distributed.shuffle_batch(x)
    assert sorted(permutation.tolist()) == list(range(10))
    assert torch.equal(shuffled, x[permutation])
    assert torch.equal(distributed.unshuffle_batch(shuffled, permutation), x)
    outputs = torch.randn(10, 4)  # any per-row function of the shuffled rows is put back in order
    assert torch.equal(distributed.unshuffle_batch(outputs[permutation], permutation), outputs)


def _count_shuffles(monkeypatch):
    calls = []
    real = distributed.shuffle_batch

    def counting(x):
        calls.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(distributed, "shuffle_batch", counting)
    return calls


@pytest.mark.parametrize("version", [1, 2])
def test_eval_mode_keys_do_not_depend_on_the_shuffle(version, monkeypatch):
    calls = _count_shuffles(monkeypatch)
    m = (
        build_method(
            "moco" if version == 1 else "mocov2",
            backbone="convnet-small",
            image_size=8,
            hidden_dim=16,
            out_dim=8,
            queue_size=32,
            bn_splits=4,
        )
        .double()
        .eval()
    )
    views = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    shuffled_keys = m._keys(views)
    assert calls == [16]
    m.shuffle_bn = False
    plain_keys = m._keys(views)
    assert calls == [16]
    torch.testing.assert_close(shuffled_keys, plain_keys, **F64)


@pytest.mark.parametrize("splits", [2, 4])
def test_training_keys_use_the_statistics_of_their_shuffled_group(splits):
    batch = 16
    group = batch // splits
    m = bn_moco(splits).train()
    views = torch.randn(batch, CHANNELS, SIZE, SIZE, dtype=torch.float64) * 2 + 0.5
    keys, permutation = keys_and_permutation(m, views)
    torch.testing.assert_close(keys, ref_keys(m, views, permutation, group), **F64)
    # the queries are normalised over the batch's own consecutive chunks
    torch.testing.assert_close(m(views), ref_queries(m, views, group), **F64)
    if crosses_groups(permutation, group):  # all but certain: 16! / ((16/G)!^G) permutations
        unshuffled = ref_keys(m, views, torch.arange(batch), group)
        assert (keys - unshuffled).abs().max() > 1e-3


def test_without_shuffle_keys_share_their_querys_statistics():
    m = bn_moco(4, shuffle_bn=False).train()
    views = torch.randn(16, CHANNELS, SIZE, SIZE, dtype=torch.float64)
    state = torch.get_rng_state()
    keys = m._keys(views)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    torch.testing.assert_close(keys, ref_keys(m, views, torch.arange(16), 4), **F64)


def test_batch_not_divisible_by_bn_splits():
    m = build_method(
        "mocov2", backbone="convnet-small", image_size=8, hidden_dim=16, out_dim=8, queue_size=32, bn_splits=4
    )
    with pytest.raises(MethodError, match=r"batch of 10 images .* not divisible by bn_splits=4"):
        m.training_step(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8))
    assert torch.isfinite(m.training_step(torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)).loss)
    for bad in (0, -2, 2.0, True, "4"):
        with pytest.raises(MethodError, match="bn_splits"):
            MoCo(backbone="convnet-small", image_size=8, hidden_dim=16, out_dim=8, queue_size=32, bn_splits=bad)
    for bad in ("auto", 1, None):
        with pytest.raises(MethodError, match="shuffle_bn"):
            MoCo(backbone="convnet-small", image_size=8, hidden_dim=16, out_dim=8, queue_size=32, shuffle_bn=bad)


@pytest.mark.parametrize("name", ["moco", "mocov2"])
def test_one_group_computes_what_moco_computed_without_shuffle(name, monkeypatch):
    calls = _count_shuffles(monkeypatch)
    kw = dict(backbone="convnet-small", image_size=8, hidden_dim=16, out_dim=8, queue_size=32, momentum=0.9)
    default = build_method(name, **kw)
    assert default.shuffle_bn and default.bn_splits == 1 and not default.shuffles_keys()
    assert not any(isinstance(mod, SplitBatchNorm) for mod in default.modules())
    # the default keys are what MoCo computed before Shuffle-BN: the key encoder's plain
    # forward after the momentum update, and nothing drawn from the RNG
    views = torch.randn(8, 3, 8, 8)
    before = copy.deepcopy(default)
    state = torch.get_rng_state()
    keys = default._keys(views)
    assert torch.equal(torch.get_rng_state(), state)
    old = copy.deepcopy(before)
    with torch.no_grad():
        update_momentum(old.backbone_momentum, old.backbone, 0.9)
        update_momentum(old.projection_head_momentum, old.projection_head, 0.9)
        assert torch.equal(keys, old.projection_head_momentum(old.backbone_momentum(views)))
    # and whole training steps are bitwise those of a MoCo without Shuffle-BN
    off = copy.deepcopy(before)
    off.shuffle_bn = False
    on = copy.deepcopy(before)
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    seed = int(torch.randint(0, 2**31, ()))
    losses = []
    for method in (on, off):
        torch.manual_seed(seed)
        loss = method.training_step(x).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(on.backbone.parameters(), off.backbone.parameters()))
    assert torch.equal(on.criterion.queue, off.criterion.queue)
    assert calls == []


# ---- the trainer's SyncBatchNorm decision ---------------------------------------------------------


def test_use_sync_bn_decision():
    kw = dict(backbone="convnet-small", image_size=8, hidden_dim=16, out_dim=8, queue_size=32)
    shuffled, unshuffled = build_method("mocov2", **kw), build_method("mocov2", shuffle_bn=False, **kw)
    simclr = build_method("simclr", backbone="convnet-small", image_size=8, hidden_dim=16)
    assert shuffled.sync_bn_by_default is False and unshuffled.sync_bn_by_default is True
    # unset: on across CUDA processes, except for a method with Shuffle-BN
    assert use_sync_bn(None, shuffled, 2, "cuda") is False
    assert use_sync_bn(None, unshuffled, 2, "cuda") is True
    assert use_sync_bn(None, simclr, 2, "cuda") is True  # a method without the attribute
    for method in (shuffled, unshuffled, simclr):
        assert use_sync_bn(None, method, 1, "cuda") is False
        assert use_sync_bn(None, method, 4, "cpu") is False
        # an explicit choice wins
        assert use_sync_bn(True, method, 2, "cuda") is True
        assert use_sync_bn(False, method, 2, "cuda") is False


def _images(n):
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    return ImageDataset(images, torch.zeros(n, dtype=torch.long))


def test_trainer_converts_to_sync_bn_as_use_sync_bn_decides(tmp_path, monkeypatch):
    """Trainer.__init__ asks use_sync_bn and converts only when it says so (two ranks faked: the
    conversion itself needs no CUDA, only the forward of SyncBatchNorm does)."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    asked = []
    real = train.use_sync_bn
    kw = dict(backbone="convnet-small", image_size=8, hidden_dim=16, out_dim=8, queue_size=32)
    for shuffle_bn, forced, expect in ((True, lambda *a: True, True), (True, real, False), (False, real, False)):

        def deciding(requested, method, world_size, device_type, _decide=forced):
            asked.append((requested, world_size, device_type, method.sync_bn_by_default))
            return _decide(requested, method, world_size, device_type)

        monkeypatch.setattr(train, "use_sync_bn", deciding)
        method = build_method("mocov2", shuffle_bn=shuffle_bn, **kw)
        cfg = TrainConfig(
            epochs=1, batch_size=8, device="cpu", out_dir=str(tmp_path), progress=False, tensorboard=False
        )
        trainer = Trainer(method, _images(16), cfg)
        converted = any(isinstance(mod, nn.SyncBatchNorm) for mod in method.modules())
        assert trainer.sync_bn is expect and converted is expect
    assert asked == [(None, 2, "cpu", False), (None, 2, "cpu", False), (None, 2, "cpu", True)]


def test_a_run_with_bn_splits_builds_split_batch_norm(tmp_path):
    from pyssl.config import build_trainer, resolve
    from pyssl.models import SplitBatchNorm

    run = resolve(
        "mocov2", bn_splits=4, epochs=1, batch_size=64, out=str(tmp_path / "run"), progress=False, tensorboard=False
    )
    method = build_trainer(run).method
    assert method.bn_splits == 4 and method.shuffles_keys()
    splits = [m for m in method.backbone_momentum.modules() if isinstance(m, SplitBatchNorm)]
    assert splits and all(m.splits == 4 for m in splits)
