"""Data-parallel training on the CPU: 2 worker processes over Gloo, against single-process
float64 references (gathered losses, MoCo queue) and through ``pyssl train --nproc 2``."""

import csv
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyssl import distributed
from pyssl.cli import main
from pyssl.launch import free_port as _free_port
from pyssl.losses import ClipLoss, InfoNCELoss, MoCoLoss, NTXentLoss
from test_infonce import ref_infonce, ref_ntxent  # noqa: E402
from test_moco import RefQueue, ref_moco  # noqa: E402
from test_moco_shuffle_bn import (
    CHANNELS,
    F64,
    SIZE,
    bn_moco,
    crosses_groups,
    keys_and_permutation,  # noqa: E402
    ref_keys,
    ref_queries,
)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with the Gloo backend"
    ),
]

WORLD = 2


def _entry(rank, fn, port, args):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    try:
        assert distributed.is_distributed() and distributed.rank() == rank and distributed.world_size() == WORLD
        fn(rank, *args)
    finally:
        distributed.shutdown()
    # as pyssl.launch's workers: past this point Gloo can abort the process at exit (SIGABRT,
    # "terminate called without an active exception") though everything is done and saved
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(fn, *args):
    """Runs ``fn(rank, *args)`` in WORLD spawned processes of one Gloo group; a worker's
    exception fails the test with its traceback."""
    mp.start_processes(_entry, args=(fn, _free_port(), args), nprocs=WORLD, start_method="spawn")


# ---- gathered contrastive losses --------------------------------------------------------------

ROWS, IN_DIM, OUT_DIM, EXTRA_KEYS = 5, 6, 4, 3


def _loss_inputs(name, x0, x1, weight, scale):
    """The loss of ``name`` over embeddings ``x @ weight.T``; returns (loss module, its inputs)."""
    z0, z1 = x0 @ weight.T, x1 @ weight.T
    if name == "ntxent":
        return NTXentLoss(0.3, gather_distributed=True), (z0, z1)
    local = name.endswith("_local")  # each rank scores its own rows only
    if name.startswith("infonce"):
        return InfoNCELoss(0.2, gather_distributed=True, local_loss=local), (z0, z1)
    return ClipLoss(local_loss=local, gather_distributed=True), (z0, z1, scale)


def _reference(name, x0, x1, weight, scale):
    z0, z1 = x0 @ weight.T, x1 @ weight.T
    if name == "ntxent":
        return ref_ntxent(z0, z1, 0.3)
    if name.startswith("infonce"):
        return ref_infonce(z0, z1, 1 / 0.2, symmetric=False)
    return ref_infonce(z0, z1, scale, symmetric=True)


def _shard(x, rank, rows):
    return x[rank * rows : (rank + 1) * rows]


def _key_shard(keys, rank):
    """Rank ``rank``'s keys: its positives, then its extra negatives (InfoNCE's K > N)."""
    positives, extras = keys[: WORLD * ROWS], keys[WORLD * ROWS :]
    return torch.cat([_shard(positives, rank, ROWS), _shard(extras, rank, EXTRA_KEYS)])


def _gathered_loss_worker(rank, name, inputs_path, out_dir):
    x0_all, x1_all, weight0, scale0 = torch.load(inputs_path)
    x0 = _shard(x0_all, rank, ROWS).clone().requires_grad_()
    x1 = (_key_shard(x1_all, rank) if name.startswith("infonce") else _shard(x1_all, rank, ROWS)).clone()
    x1.requires_grad_()
    weight, scale = weight0.clone().requires_grad_(), scale0.clone().requires_grad_()
    loss_fn, loss_inputs = _loss_inputs(name, x0, x1, weight, scale)
    loss = loss_fn(*loss_inputs)
    loss.backward()
    # what the trainer does after backward: average the parameter gradients over ranks
    distributed.all_reduce_gradients([weight, scale])
    torch.save(
        {
            "loss": loss.detach(),
            "x0_grad": x0.grad,
            "x1_grad": x1.grad,
            "weight_grad": weight.grad,
            "scale_grad": scale.grad,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


@pytest.mark.parametrize("name", ["ntxent", "infonce", "clip", "infonce_local", "clip_local"])
def test_gathered_loss_gives_the_single_process_gradient(name, tmp_path):
    key_rows = WORLD * (ROWS + EXTRA_KEYS) if name.startswith("infonce") else WORLD * ROWS
    x0_all = torch.randn(WORLD * ROWS, IN_DIM, dtype=torch.float64)
    x1_all = torch.randn(key_rows, IN_DIM, dtype=torch.float64)
    weight0 = torch.randn(OUT_DIM, IN_DIM, dtype=torch.float64)
    scale0 = torch.tensor(2.0 + 8.0 * torch.rand(()).item(), dtype=torch.float64)
    torch.save((x0_all, x1_all, weight0, scale0), tmp_path / "inputs.pt")
    run_workers(_gathered_loss_worker, name, str(tmp_path / "inputs.pt"), str(tmp_path))

    x0_ref, x1_ref = x0_all.clone().requires_grad_(), x1_all.clone().requires_grad_()
    weight, scale = weight0.clone().requires_grad_(), scale0.clone().requires_grad_()
    expected = _reference(name, x0_ref, x1_ref, weight, scale)
    expected.backward()
    tol = dict(rtol=1e-9, atol=1e-11)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    if name.endswith("_local"):  # each rank's loss over its own rows: their mean is the global loss
        torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, expected.detach(), **tol)
        assert not torch.allclose(results[0]["loss"], results[1]["loss"])
    for rank, got in enumerate(results):
        # every rank computes the global-batch loss (or its own rows' share of it) ...
        if not name.endswith("_local"):
            torch.testing.assert_close(got["loss"], expected.detach(), **tol)
        # ... and the averaged parameter gradients are the single-process ones, which is what
        # makes a data-parallel step equal the single-process step over the whole batch
        torch.testing.assert_close(got["weight_grad"], weight.grad, **tol)
        if name.startswith("clip"):
            torch.testing.assert_close(got["scale_grad"], scale.grad, **tol)
        # gather_with_grad's convention: a rank's input gradient is world_size times its share
        # of the global gradient (the trainer's averaging divides it back out)
        torch.testing.assert_close(got["x0_grad"], WORLD * _shard(x0_ref.grad, rank, ROWS), **tol)
        x1_expected = _key_shard(x1_ref.grad, rank) if name.startswith("infonce") else _shard(x1_ref.grad, rank, ROWS)
        torch.testing.assert_close(got["x1_grad"], WORLD * x1_expected, **tol)


def _open_clip_worker(rank, options, inputs_path, out_dir):
    # open_clip's ClipLoss and pyssl's with the same data-parallel arguments, on the same rows
    import open_clip.loss as open_clip_loss

    image_all, text_all, scale = torch.load(inputs_path)
    results = {}
    for name, loss_fn in (
        ("ours", ClipLoss(**options, rank=rank, world_size=WORLD)),
        ("theirs", open_clip_loss.ClipLoss(**options, rank=rank, world_size=WORLD)),
    ):
        image = _shard(image_all, rank, ROWS).clone().requires_grad_()
        text = _shard(text_all, rank, ROWS).clone().requires_grad_()
        # open_clip takes normalised features (its model normalises them); pyssl normalises itself
        if name == "ours":
            loss = loss_fn(image, text, scale)
        else:
            loss = loss_fn(
                torch.nn.functional.normalize(image, dim=1), torch.nn.functional.normalize(text, dim=1), scale
            )
        loss.backward()
        results[name] = (loss.detach(), image.grad, text.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_clip_loss_is_open_clips_on_several_ranks(local_loss, gather_with_grad, tmp_path):
    pytest.importorskip("open_clip.loss")
    image, text = (torch.randn(WORLD * ROWS, OUT_DIM, dtype=torch.float64) for _ in range(2))
    torch.save((image, text, torch.tensor(7.0, dtype=torch.float64)), tmp_path / "inputs.pt")
    options = {"local_loss": local_loss, "gather_with_grad": gather_with_grad}
    run_workers(_open_clip_worker, options, str(tmp_path / "inputs.pt"), str(tmp_path))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for ours, theirs in zip(got["ours"], got["theirs"], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


# ---- MoCo: one queue for all ranks -----------------------------------------------------------

QUEUE, MOCO_DIM, MOCO_STEPS = 10, 4, 3  # 3 steps of 2 x 3 keys: the ring buffer wraps


def _moco_worker(rank, inputs_path, out_dir):
    queries, keys = torch.load(inputs_path)
    torch.manual_seed(1000 + rank)  # different random queues: the broadcast must make them one
    loss_fn = MoCoLoss(temperature=0.2, queue_size=QUEUE, dim=MOCO_DIM, gather_distributed=True)
    distributed.broadcast_module(loss_fn)
    queues, losses = [loss_fn.queue.clone()], []
    for step in range(MOCO_STEPS):
        query = _shard(queries[step], rank, 3).clone().requires_grad_()
        losses.append(loss_fn(query, _shard(keys[step], rank, 3)).detach())
        queues.append(loss_fn.queue.clone())
    torch.save(
        {"queues": queues, "losses": losses, "ptr": int(loss_fn.queue_ptr), "len": int(loss_fn.queue_len)},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def test_moco_queue_gets_the_keys_of_all_ranks(tmp_path):
    queries = torch.randn(MOCO_STEPS, WORLD * 3, MOCO_DIM)
    keys = torch.randn(MOCO_STEPS, WORLD * 3, MOCO_DIM)
    torch.save((queries, keys), tmp_path / "inputs.pt")
    run_workers(_moco_worker, str(tmp_path / "inputs.pt"), str(tmp_path))
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    start = got[0]["queues"][0]
    reference = RefQueue(start.double())
    for step in range(MOCO_STEPS):
        for rank in range(WORLD):
            # the loss stays local: this rank's queries against its own keys and the shared queue
            expected_loss = ref_moco(
                _shard(queries[step], rank, 3), _shard(keys[step], rank, 3), reference.negatives(), 0.2
            )
            torch.testing.assert_close(got[rank]["losses"][step].double(), expected_loss, rtol=1e-5, atol=1e-6)
        reference.push(keys[step])  # all ranks' keys, in rank order
        for rank in range(WORLD):
            assert torch.equal(got[rank]["queues"][step + 1], got[0]["queues"][step + 1])
            torch.testing.assert_close(got[rank]["queues"][step + 1].double(), reference.queue, rtol=1e-6, atol=1e-7)
    assert [g["ptr"] for g in got] == [reference.ptr] * WORLD
    assert [g["len"] for g in got] == [reference.filled] * WORLD


# ---- MoCo: Shuffle-BN across ranks ------------------------------------------------------------

SHUFFLE_ROWS = 8  # per rank


def _shuffle_bn_worker(rank, inputs_path, out_dir):
    views_all, state = torch.load(inputs_path)
    views = _shard(views_all, rank, SHUFFLE_ROWS)
    shuffled, permutation = distributed.shuffle_batch(views)
    got = {"helper": (shuffled, permutation, distributed.unshuffle_batch(shuffled, permutation))}
    for splits in (1, 2):  # one BatchNorm group per rank, then two per rank (SplitBatchNorm)
        m = bn_moco(splits)
        m.load_state_dict(state)
        eval_keys = m.eval()._keys(views)
        m.shuffle_bn = False
        eval_unshuffled = m._keys(views)
        m.shuffle_bn = True
        keys, permutation = keys_and_permutation(m.train(), views)
        got[splits] = {
            "eval": eval_keys,
            "eval_unshuffled": eval_unshuffled,
            "keys": keys,
            "permutation": permutation,
            "queries": m(views).detach(),
        }
    torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))


def test_moco_shuffle_bn_across_ranks(tmp_path):
    model = bn_moco()
    views_all = torch.randn(WORLD * SHUFFLE_ROWS, CHANNELS, SIZE, SIZE, dtype=torch.float64) * 2 + 0.5
    torch.save((views_all, model.state_dict()), tmp_path / "inputs.pt")
    run_workers(_shuffle_bn_worker, str(tmp_path / "inputs.pt"), str(tmp_path))
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]

    permutation = got[0]["helper"][1]
    assert sorted(permutation.tolist()) == list(range(WORLD * SHUFFLE_ROWS))
    for rank, g in enumerate(got):
        shuffled, rank_permutation, unshuffled = g["helper"]
        assert torch.equal(rank_permutation, permutation)  # one permutation for all ranks
        assert torch.equal(shuffled, _shard(views_all[permutation], rank, SHUFFLE_ROWS))
        assert torch.equal(unshuffled, _shard(views_all, rank, SHUFFLE_ROWS))

    for splits in (1, 2):
        group = SHUFFLE_ROWS // splits
        permutation = got[0][splits]["permutation"]
        expected = ref_keys(model, views_all, permutation, group)
        for rank, g in enumerate(got):
            r = g[splits]
            assert torch.equal(r["permutation"], permutation)
            # eval mode: shuffling then unshuffling gives back each sample's own key
            torch.testing.assert_close(r["eval"], r["eval_unshuffled"], **F64)
            # training: a key is normalised with the group its shuffled position fell into,
            # a query with its own rank's (chunk of the) shard
            torch.testing.assert_close(r["keys"], _shard(expected, rank, SHUFFLE_ROWS), **F64)
            torch.testing.assert_close(
                r["queries"], ref_queries(model, _shard(views_all, rank, SHUFFLE_ROWS), group), **F64
            )
        if crosses_groups(permutation, group):
            unshuffled = ref_keys(model, views_all, torch.arange(len(permutation)), group)
            keys = torch.cat([g[splits]["keys"] for g in got])
            assert (keys - unshuffled).abs().max() > 1e-3


# ---- gradient averaging and the initial broadcast ----------------------------------------------


def _collectives_worker(rank, out_dir):
    distributed.BUCKET_BYTES = 64  # several buckets per dtype, and a tensor larger than one
    torch.manual_seed(rank)  # different weights and gradients on each rank
    params = [
        torch.nn.Parameter(torch.randn(shape, dtype=dtype))
        for shape, dtype in [
            ((3,), torch.float32),
            ((5, 7), torch.float64),
            ((20,), torch.float32),
            ((2,), torch.float64),
            ((4, 4), torch.float32),
        ]
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    params.append(torch.nn.Parameter(torch.randn(3)))  # no gradient: skipped
    module = torch.nn.ParameterList(params)
    module.register_buffer("counter", torch.tensor([rank + 10]))
    local = [p.grad.clone() for p in params[:-1]]
    distributed.all_reduce_gradients(params)
    distributed.broadcast_module(module)
    torch.save(
        {
            "local": local,
            "averaged": [p.grad for p in params[:-1]],
            "last_grad": params[-1].grad,
            "state": {k: v.clone() for k, v in module.state_dict().items()},
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def test_gradients_averaged_per_dtype_in_buckets_and_state_broadcast(tmp_path):
    run_workers(_collectives_worker, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for i in range(len(got[0]["local"])):
        mean = sum(g["local"][i] for g in got) / WORLD
        for g in got:
            assert g["averaged"][i].dtype == mean.dtype
            torch.testing.assert_close(g["averaged"][i], mean)
    assert all(g["last_grad"] is None for g in got)
    for key, value in got[0]["state"].items():
        assert torch.equal(got[1]["state"][key], value), key
    assert int(got[1]["state"]["counter"]) == 10  # rank 0's


# ---- the trainer through the CLI ---------------------------------------------------------------

TRAIN = [
    "train",
    "--nproc",
    str(WORLD),
    "--method",
    "simclr",
    "--image-size",
    "8",
    "--backbone",
    "small",
    "--hidden-dim",
    "16",
    "--epochs",
    "1",
    "--batch-size",
    "128",
    "--knn-every",
    "0",
    "--device",
    "cpu",
    "--no-progress",
    "--no-tensorboard",
]


def _losses(run) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_train_nproc_2_crash_and_exact_resume(tmp_path, monkeypatch, capfd):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*TRAIN, "--out", str(full)]) == 0
    ckpt = torch.load(full / "checkpoint.pt", weights_only=True)
    digests = ckpt["parameter_digest_per_rank"]
    assert len(digests) == WORLD and len(set(digests)) == 1, "the ranks' parameters differ"
    assert len(ckpt["rng_per_rank"]) == WORLD
    steps = 1258 // 128
    assert ckpt["step"] == steps and len(_losses(full)) == steps
    assert {"checkpoint.pt", "metrics.csv", "config.json"} <= set(os.listdir(full))

    # both workers SIGKILL themselves after step 5; the checkpoint of step 4 survives
    monkeypatch.setenv("PYSSL_CRASH_AT_STEP", "5")
    capfd.readouterr()
    assert main([*TRAIN, "--out", str(cut), "--checkpoint-every", "2"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert errors == [err[-1]] and err[-1].startswith("pyssl: error: worker") and "SIGKILL" in err[-1], err
    monkeypatch.delenv("PYSSL_CRASH_AT_STEP")
    assert main([*TRAIN, "--out", str(cut), "--checkpoint-every", "2", "--resume"]) == 0
    # every rank restored its own augmentation RNG: the resumed run is the uninterrupted one
    assert _losses(cut) == _losses(full)
    resumed = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert resumed["parameter_digest_per_rank"] == digests


def _interrupt_after_first_checkpoint(out, to_group: bool) -> tuple[int, list[str]]:
    """Starts 12 epochs of TRAIN under --nproc in a session of its own, sends SIGINT once the
    first checkpoint exists (to the process group, as a terminal's Ctrl-C, or to the launcher
    alone) and returns (exit code, stderr lines)."""
    argv = [sys.executable, "-m", "pyssl", *TRAIN, "--epochs", "12", "--out", str(out), "--checkpoint-every", "2"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT) if to_group else proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err.strip().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [True, False], ids=["ctrl-c", "sigint-to-launcher"])
def test_ctrl_c_under_nproc_says_how_to_resume(tmp_path, to_group):
    # Before, the workers swallowed the KeyboardInterrupt and the launcher printed only
    # "pyssl: interrupted"; a SIGINT to the launcher alone left the workers without it.
    out = tmp_path / "run"
    code, err = _interrupt_after_first_checkpoint(out, to_group)
    assert code == 130, err
    assert not [line for line in err if "Traceback" in line or "error" in line.lower()], err
    assert err[-2].startswith("pyssl: interrupted at step") and "holds the checkpoint of step" in err[-2], err
    resume = shlex.split(err[-1])
    assert resume[0] == "pyssl" and resume[-1] == "--resume" and resume[1:-1] == [
        *TRAIN, "--epochs", "12", "--out", str(out), "--checkpoint-every", "2"
    ], err  # fmt: skip
    if to_group:  # the command it prints finishes the run, each step logged once
        assert main(resume[1:]) == 0
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 12 * (1258 // 128)
        assert len(_losses(out)) == 12 * (1258 // 128)


def test_batch_not_divisible_by_the_processes_is_one_line(tmp_path, capfd):
    argv = [*TRAIN, "--batch-size", "63", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "pyssl: error: batch size 63 must be divisible by the number of processes (2): "
        "each process trains on an equal shard of every batch"
    ]
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_single_process_helpers_are_no_ops():
    x = torch.randn(3, 2, requires_grad=True)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.gather_with_grad(x) is x and distributed.gather(x) is x
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    before = p.grad.clone()
    distributed.all_reduce_gradients([p])
    assert torch.equal(p.grad, before)


@pytest.mark.parametrize("name", ["mocov3", "byol", "barlow_twins", "dino"])
def test_the_new_methods_train_in_lockstep_on_two_processes(name, tmp_path):
    # MoCo v3 gathers its keys and Barlow Twins its cross-correlation over the ranks; BYOL needs
    # nothing gathered, DINO averages its centre. Each rank updates its own teacher: they stay one
    # only if every step is.
    argv = ["train", "--nproc", str(WORLD), "--method", name, "--image-size", "8", "--backbone", "small"]
    argv += ["--hidden-dim", "16", "--epochs", "1", "--batch-size", "512", "--device", "cpu", "--knn-every", "0"]
    assert main([*argv, "--no-progress", "--no-tensorboard", "--out", str(tmp_path)]) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    digests = ckpt["parameter_digest_per_rank"]
    assert len(digests) == WORLD and len(set(digests)) == 1, "the ranks' parameters differ"
    losses = _losses(tmp_path)
    assert len(losses) == 1258 // 512 and all(math.isfinite(v) for v in losses)
