"""Without its compiled extension pyssl still imports and runs: the same operators on eager PyTorch
kernels (pyssl._fallback), with a warning. Fallback processes are started apart from this one
(the extension is loaded here); their losses, gradients, queue, EMA and augmentations must equal
the compiled kernels'."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyssl
from pyssl import _fallback

# Computes a fixed set of results with the losses, ops and augmentations; run here and in the
# fallback process. Every input comes from a seeded generator, so both see the same numbers.
RESULTS_SCRIPT = textwrap.dedent(
    """
    import torch
    import pyssl
    from pyssl.augment import SimCLRAugment
    from pyssl.losses import ClipLoss, InfoNCELoss, MoCoLoss, NTXentLoss

    def inputs(seed, *shapes, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]

    def results():
        out = {}
        for dtype in (torch.float32, torch.float64):
            z0, z1 = inputs(0, (12, 9), (12, 9), dtype=dtype)
            loss = NTXentLoss(temperature=0.3)(z0, z1)
            out[f"ntxent_{dtype}"] = [loss, *torch.autograd.grad(loss, (z0, z1))]
            q, k = inputs(1, (10, 7), (13, 7), dtype=dtype)
            loss = InfoNCELoss(temperature=0.2)(q, k)
            out[f"infonce_{dtype}"] = [loss, *torch.autograd.grad(loss, (q, k))]
            img, txt = inputs(2, (11, 6), (11, 6), dtype=dtype)
            scale = torch.tensor(3.0, dtype=dtype, requires_grad=True)
            loss = ClipLoss()(img, txt, scale)
            out[f"clip_{dtype}"] = [loss, *torch.autograd.grad(loss, (img, txt, scale))]
        moco = MoCoLoss(temperature=0.2, queue_size=40, dim=8)
        g = torch.Generator().manual_seed(3)
        moco.queue.copy_(torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1))
        for step in range(3):
            q, k = inputs(4 + step, (16, 8), (16, 8), dtype=torch.float32)
            loss = moco(q, k.detach())
            out[f"moco_{step}"] = [loss, *torch.autograd.grad(loss, q)]
        out["moco_queue"] = [moco.queue.clone()]
        ema = [torch.ones(5, dtype=torch.float64), torch.zeros(3, 2)]
        pyssl.ops.ema_update_(ema, [torch.arange(5.0), torch.full((3, 2), 2.0, dtype=torch.bfloat16)], 0.9)
        out["ema"] = ema
        images = torch.randint(0, 256, (6, 3, 37, 41), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
        aug = SimCLRAugment(24, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
        views, params = aug(images, generator=torch.Generator().manual_seed(6), return_params=True)
        out["augment"] = [views, params.crop_boxes]
        uniforms = torch.rand(200, 40, generator=torch.Generator().manual_seed(7))
        out["draw_crops"] = [pyssl.ops.augment_draw_crops(uniforms, 30, 90, (0.08, 1.0), (0.75, 1.33))]
        return {name: [t.detach() for t in values] for name, values in out.items()}
    """
)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYSSL_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=240
    )  # fmt: skip


def _compiled_results() -> dict:
    namespace = {}
    exec(RESULTS_SCRIPT, namespace)
    return namespace["results"]()


@pytest.fixture(scope="module")
def fallback_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("fallback") / "results.pt"
    code = RESULTS_SCRIPT + textwrap.dedent(
        f"""
        assert not pyssl.extension_loaded and not pyssl.cuda_kernels_built
        torch.save(results(), {str(path)!r})
        """
    )
    done = _run_python(code, PYSSL_NO_EXTENSION="1")
    assert done.returncode == 0, done.stderr
    assert "ExtensionMissingWarning" in done.stderr and "PYSSL_NO_EXTENSION=1" in done.stderr
    return torch.load(path)


def test_the_fallback_schemas_are_the_compiled_ones():
    assert set(_fallback.SCHEMAS) == set(pyssl.ops.FAKE_KERNELS)
    for name, schema in _fallback.SCHEMAS.items():
        compiled = getattr(torch.ops.pyssl, name).default._schema
        assert str(torch._C.parse_schema(f"pyssl::{schema}")) == str(compiled), name


def test_the_fallback_computes_what_the_kernels_compute(fallback_results):
    compiled = _compiled_results()
    assert set(fallback_results) == set(compiled)
    for name, expected in compiled.items():
        for got, want in zip(fallback_results[name], expected, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            if not want.is_floating_point():  # crop boxes: integers, drawn the same way
                assert torch.equal(got, want), name
            elif want.dtype == torch.float64:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
            else:  # float32 kernels sum in another order; augmentations as tests/test_augment_pipeline.py
                torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=name)


def test_the_fallback_ops_pass_opcheck_and_train_a_method(tmp_path):
    code = textwrap.dedent(
        f"""
        import torch, pyssl
        from pyssl.config import build_trainer, resolve
        from pyssl.train import StopTraining
        from pyssl.losses import NTXentLoss

        assert not pyssl.extension_loaded
        ops = torch.ops.pyssl
        z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(ops.ntxent_forward.default, (z, 0.5))
        q, k = torch.randn(6, 5, requires_grad=True), torch.randn(9, 5, requires_grad=True)
        scale = torch.tensor(2.0, requires_grad=True)
        torch.library.opcheck(ops.infonce_forward.default, (q, k, scale, False))
        torch.library.opcheck(ops.infonce_forward.default, (q, k[:6], scale, True))
        queue = torch.nn.functional.normalize(torch.randn(11, 5), dim=1)
        torch.library.opcheck(ops.moco_forward.default, (q, k[:6], queue, 0.2))
        compiled = torch.compile(lambda a, b: NTXentLoss()(a, b), backend="eager", fullgraph=True)
        compiled(torch.randn(4, 3), torch.randn(4, 3))

        def stop_after_two(trainer, step, loss):
            if step == 2:
                raise StopTraining
        for method in ("simclr", "mocov2"):
            run = resolve(method, "digits", device="cpu", out={str(tmp_path)!r} + "/" + method, progress=False,
                          tensorboard=False, knn_every=0, batch_size=64, epochs=1)
            result = build_trainer(run, callbacks=[stop_after_two]).fit()
            assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses))), result.losses
        """
    )
    done = _run_python(code, PYSSL_NO_EXTENSION="1")
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_missing_extension_falls_back_with_its_reason_or_fails_when_required():
    # sys.modules["pyssl._C"] = None makes the extension's import fail as a missing file would.
    code = "import sys; sys.modules['pyssl._C'] = None\nimport pyssl\nprint(pyssl.extension_loaded)"
    done = _run_python(code)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    assert "ExtensionMissingWarning" in done.stderr and "pip install --no-build-isolation" in done.stderr
    required = _run_python(code, PYSSL_REQUIRE_EXTENSION="1")
    assert required.returncode != 0 and "ImportError" in required.stderr
    assert "pip install --no-build-isolation" in required.stderr
