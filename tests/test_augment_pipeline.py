"""The fused pipeline (torch.ops.pyssl.augment_fused) against the composition of the functional
ops, parameter statistics, reproducibility, bad input, opcheck and the CUDA kernels."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyssl
from pyssl.augment import AugmentParams, SimCLRAugment, byol_pair
from pyssl.augment.reference import compose

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_images(batch, channels, height, width, dtype):
    if dtype == torch.uint8:
        return torch.randint(0, 256, (batch, channels, height, width), dtype=torch.uint8)
    return torch.rand(batch, channels, height, width, dtype=torch.float64).to(dtype)


def reference(aug, images, params):
    mean, std = aug._mean_std(images.shape[1], images.device)
    norm = (mean.tolist(), std.tolist()) if mean.numel() else (None, None)
    return compose(images, params, aug.size, *norm)


def assert_close_to(out, expected, dtype=torch.float32, scale=1.0):
    diff = (out.double() - expected).abs().max().item()
    # The reference is float32 too; normalisation by std ~0.22 scales its rounding by ~4.5.
    tol = TOL[dtype] * max(1.0, scale) + (1e-5 if dtype == torch.float32 else 0)
    assert diff <= tol, f"max difference {diff} > {tol}"


def std_scale(aug):
    return 1.0 if aug.std is None else 1.0 / min(aug.std)


AUGMENTS = {
    "simclr": lambda size: SimCLRAugment.simclr(size, p_solarize=0.3),
    "mocov2": lambda size: SimCLRAugment.mocov2(size),
    "fixed_order_all_ops": lambda size: SimCLRAugment(
        size, p_jitter=1.0, p_gray=0.5, p_blur=0.7, p_solarize=0.5, jitter_order="fixed", mean=None, std=None
    ),
}


@pytest.mark.parametrize("name", list(AUGMENTS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3])
def test_fused_equals_composition(name, dtype, channels):
    aug = AUGMENTS[name]((24, 20))
    images = random_images(12, channels, 37, 29, dtype)
    out, params = aug(images, return_params=True)
    assert out.shape == (12, channels, 24, 20) and out.dtype == torch.float32
    assert_close_to(out, reference(aug, images, params), scale=std_scale(aug))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_dtype_and_layout(out_dtype, channels_last):
    aug = SimCLRAugment.simclr(16, dtype=out_dtype, channels_last=channels_last)
    images = random_images(5, 3, 21, 30, torch.uint8)
    out, params = aug(images, return_params=True)
    assert out.dtype == out_dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expected = reference(aug, images, params)
    assert_close_to(out, expected, out_dtype, scale=expected.abs().max().item())
    plain = SimCLRAugment.simclr(16).apply(images, params)
    assert torch.equal(out, plain.to(out_dtype))


def test_strided_inputs():
    aug = SimCLRAugment.simclr(12, p_solarize=0.5)
    base = random_images(6, 3, 30, 44, torch.uint8)
    for images in (
        base.contiguous(memory_format=torch.channels_last),  # NHWC memory
        base[:, :, 3:25, ::2],  # a strided slice
        base[::2],
    ):
        out, params = aug(images, return_params=True)
        assert_close_to(out, reference(aug, images, params), scale=std_scale(aug))
        assert torch.equal(out, aug.apply(images.contiguous(), params))


def test_blur_kernel_bound_is_checked():
    aug = SimCLRAugment(8, p_blur=1.0, sigma=(1.0, 2.0))
    images = random_images(2, 3, 10, 10, torch.uint8)
    params = aug.draw_params(2, 10, 10)
    assert aug.kernel_bound() == 13
    aug.apply(images, params, blur_kernel_bound=13)
    with pytest.raises(RuntimeError, match="exceeds blur_kernel_bound"):
        aug.apply(images, params, blur_kernel_bound=1)


def test_compiles_without_graph_breaks():
    aug = SimCLRAugment.simclr(8)
    images = random_images(3, 3, 12, 10, torch.uint8)
    params = aug.draw_params(3, 12, 10)
    compiled = torch.compile(
        lambda x: aug.apply(x, params, blur_kernel_bound=aug.kernel_bound()), fullgraph=True, backend="eager"
    )
    assert torch.equal(compiled(images), aug.apply(images, params))


def test_batch_of_one_and_tiny_images():
    for shape, size in [((1, 3, 1, 1), 3), ((1, 1, 2, 5), (7, 1)), ((2, 3, 5, 3), (1, 1))]:
        aug = SimCLRAugment(size, p_jitter=1.0, p_blur=1.0, sigma=(0.5, 3.0), p_solarize=0.5)
        images = random_images(*shape, torch.uint8)
        out, params = aug(images, return_params=True)
        assert out.shape == (shape[0], shape[1], *((size, size) if isinstance(size, int) else size))
        assert torch.isfinite(out).all()
        assert_close_to(out, reference(aug, images, params), scale=std_scale(aug))


@pytest.mark.parametrize("channels_last", [False, True])
def test_empty_batch_gives_empty_views(channels_last):
    # As torchvision's transforms: (0, C, H, W) in, an empty batch of the output size out.
    images = torch.zeros(0, 3, 12, 10, dtype=torch.uint8)
    aug = SimCLRAugment.simclr(8, dtype=torch.bfloat16, channels_last=channels_last)
    out, params = aug(images, return_params=True)
    views = aug.views(images)
    assert len(params) == 0 and len(views) == 2
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for view in (out, *views):
        assert view.shape == (0, 3, 8, 8) and view.dtype == torch.bfloat16 and view.is_contiguous(memory_format=layout)
    assert [view.shape for view in byol_pair(8)(images)] == [(0, 3, 8, 8)] * 2


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 4),
    channels=st.sampled_from([1, 3]),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    size=st.tuples(st.integers(1, 32), st.integers(1, 32)),
    dtype=st.sampled_from([torch.uint8, torch.float32, torch.float16]),
    jitter=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.5)),
    probs=st.tuples(*[st.sampled_from([0.0, 0.5, 1.0])] * 4),
    sigma=st.tuples(st.floats(0.05, 1.0), st.floats(1.0, 4.0)),
    kernel=st.sampled_from([None, 1, 3, 7]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_fused_equals_composition(
    batch, channels, height, width, size, dtype, jitter, probs, sigma, kernel, seed
):
    p_jitter, p_gray, p_blur, p_solarize = probs
    aug = SimCLRAugment(
        size,
        jitter=jitter,
        p_jitter=p_jitter,
        p_gray=p_gray,
        p_blur=p_blur,
        sigma=sigma,
        p_solarize=p_solarize,
        blur_kernel_size=kernel,
    )
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, channels, height, width), dtype=torch.uint8, generator=g)
    if dtype != torch.uint8:
        images = (images.float() / 255).to(dtype)
    out, params = aug(images, generator=g, return_params=True)
    assert torch.isfinite(out).all()
    assert_close_to(out, reference(aug, images, params), scale=std_scale(aug))


def test_views_in_one_call():
    aug = SimCLRAugment.simclr(12)
    images = random_images(4, 3, 20, 20, torch.uint8)
    views, params = aug.views(images, n=3, return_params=True)
    assert len(views) == 3 and len(params) == 3
    for view, p in zip(views, params):
        assert view.shape == (4, 3, 12, 12)
        assert torch.equal(p.source_index, torch.arange(4))
        assert torch.equal(view, aug.apply(images, p))
    assert not torch.equal(views[0], views[1])


def test_byol_pair_is_asymmetric():
    pair = byol_pair(16)
    images = random_images(600, 3, 4, 4, torch.uint8)
    (v1, v2), (p1, p2) = pair(images, return_params=True)
    assert v1.shape == v2.shape == (600, 3, 16, 16)
    assert bool((p1.blur_sigma > 0).all()) and bool(torch.isinf(p1.solarize_threshold).all())
    assert 0.03 < (p2.blur_sigma > 0).float().mean() < 0.2
    assert 0.12 < torch.isfinite(p2.solarize_threshold).float().mean() < 0.3
    assert int(p1.blur_kernel_size[0]) == 1  # 10% of 16, made odd
    assert int(byol_pair(224).augments[0].blur_kernel_size) == 23


def test_generator_reproduces_parameters_and_output():
    aug = SimCLRAugment.simclr(16)
    images = random_images(8, 3, 30, 25, torch.uint8)
    a, pa = aug(images, generator=torch.Generator().manual_seed(7), return_params=True)
    b, pb = aug(images, generator=torch.Generator().manual_seed(7), return_params=True)
    c = aug(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    for f in dataclasses.fields(AugmentParams):
        assert torch.equal(getattr(pa, f.name), getattr(pb, f.name))
    assert not torch.equal(a, c)


def test_input_requiring_grad_is_detached():
    images = torch.rand(2, 3, 9, 9, requires_grad=True)
    out = SimCLRAugment.simclr(4)(images)
    assert not out.requires_grad


def test_no_nan_for_extreme_images():
    aug = SimCLRAugment(8, jitter=(0.9, 0.9, 0.9, 0.5), p_jitter=1.0, p_gray=0.5, p_blur=1.0, p_solarize=0.5)
    for fill in (0, 255):
        images = torch.full((16, 3, 9, 9), fill, dtype=torch.uint8)
        out = aug(images)
        assert torch.isfinite(out).all()
    images = torch.zeros(16, 3, 9, 9)
    images[:, 0] = 1.0  # saturated red: hue branches with two equal channels
    assert torch.isfinite(aug(images)).all()


# ---- statistics of the drawn parameters ----------------------------------------------------------

N_DRAW = 4000


def binomial_ok(flags, p, sigmas=5):
    rate = flags.float().mean().item()
    return abs(rate - p) <= sigmas * math.sqrt(p * (1 - p) / flags.numel()) + 1e-12


def test_parameter_statistics():
    aug = SimCLRAugment(
        32, jitter=(0.4, 0.3, 0.2, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5, sigma=(0.1, 2.0), p_solarize=0.3
    )
    p = aug.draw_params(N_DRAW, 64, 48)
    jittered = (p.jitter_factors != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(1)
    assert binomial_ok(jittered, 0.8)
    assert binomial_ok(p.flip, 0.5)
    assert binomial_ok(p.gray, 0.2)
    assert binomial_ok(p.blur_sigma > 0, 0.5)
    assert binomial_ok(torch.isfinite(p.solarize_threshold), 0.3)
    f = p.jitter_factors[jittered]
    n = f.shape[0]
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        x = f[:, col]
        assert lo <= x.min() and x.max() <= hi
        # Uniform: mean (lo + hi) / 2 with sd (hi - lo) / sqrt(12 n); variance (hi - lo)^2 / 12.
        assert abs(x.mean() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * n)
        assert abs(x.var() / ((hi - lo) ** 2 / 12) - 1) < 0.1
    # Each jitter op comes first a quarter of the time; every row is a permutation.
    order = p.jitter_order
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(N_DRAW, 4))
    for op in range(4):
        assert binomial_ok(order[:, 0] == op, 0.25)
    sigma = p.blur_sigma[p.blur_sigma > 0]
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0
    assert abs(sigma.mean() - 1.05) < 5 * 1.9 / math.sqrt(12 * sigma.numel())
    ksize = p.blur_kernel_size[p.blur_sigma > 0]
    assert torch.equal(ksize, 2 * torch.ceil(3 * sigma.double()).long() + 1)


def test_crop_distribution_matches_torchvision():
    from scipy.stats import ks_2samp
    from torchvision.transforms import v2

    height, width = 60, 90
    aug = SimCLRAugment(16, scale=(0.08, 1.0))
    boxes = aug.draw_params(N_DRAW, height, width).crop_boxes
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    image = torch.zeros(3, height, width)
    ref = torch.tensor([v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(N_DRAW)])
    # Box area, aspect and centre positions are drawn from the same distribution as torchvision's.
    for ours, theirs in [
        (h * w, ref[:, 2] * ref[:, 3]),
        (w / h, ref[:, 3] / ref[:, 2]),
        (top + h / 2, ref[:, 0] + ref[:, 2] / 2),
        (left + w / 2, ref[:, 1] + ref[:, 3] / 2),
    ]:
        assert ks_2samp(ours.double().numpy(), theirs.double().numpy()).pvalue > 1e-4


def test_crop_fallback_for_extreme_aspect():
    # A 1 x 200 strip: no box of aspect in [3/4, 4/3] and area >= 8% fits; central fallback.
    boxes = SimCLRAugment(4).draw_params(50, 1, 200).crop_boxes
    assert torch.equal(boxes, torch.tensor([[0, 99, 1, 1]]).expand(50, 4))


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    for kwargs, match in [
        (dict(scale=(0.5, 0.1)), "scale"),
        (dict(p_gray=1.5), "p_gray"),
        (dict(jitter=(0.4, 0.4, 0.4, 0.6)), "hue"),
        (dict(jitter=(0.4, -0.1, 0.4, 0.1)), "contrast"),
        (dict(sigma=(-1.0, 2.0)), "sigma"),
        (dict(blur_kernel_size=4), "blur_kernel_size"),
        (dict(mean=(0.5, 0.5), std=(0.2, 0.2, 0.2)), "mean"),
        (dict(std=None), "both"),
        (dict(dtype=torch.float64), "dtype"),
        (dict(jitter_order="sorted"), "jitter_order"),
    ]:
        with pytest.raises(ValueError, match=match):
            SimCLRAugment(8, **kwargs)
    with pytest.raises(ValueError, match="size"):
        SimCLRAugment((8, 0))


def test_bad_images_and_parameters():
    aug = SimCLRAugment.simclr(8)
    with pytest.raises(TypeError, match="uint8 or floating"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        aug(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="\\(B, C, H, W\\)"):
        aug(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="mean/std"):
        SimCLRAugment(8, mean=(0.5, 0.5, 0.5), std=(0.2, 0.3, 0.2))(torch.zeros(2, 1, 8, 8))
    images = random_images(2, 3, 10, 10, torch.uint8)
    params = aug.draw_params(2, 10, 10)
    bad_box = dataclasses.replace(params, crop_boxes=torch.tensor([[0, 0, 10, 10], [5, 5, 6, 2]]))
    with pytest.raises(RuntimeError, match="crop_boxes\\[1\\].*not inside"):
        aug.apply(images, bad_box)
    with pytest.raises(RuntimeError, match="blur_sigma\\[0\\]"):
        aug.apply(images, dataclasses.replace(params, blur_sigma=torch.tensor([-1.0, 0.0])))
    with pytest.raises(RuntimeError, match="flip must have shape \\(2,\\)"):
        aug.apply(images, dataclasses.replace(params, flip=torch.zeros(3, dtype=torch.bool)))
    with pytest.raises(RuntimeError, match="jitter_factors must have dtype"):
        aug.apply(images, dataclasses.replace(params, jitter_factors=params.jitter_factors.double()))
    with pytest.raises(RuntimeError, match="permutation"):
        aug.apply(images, dataclasses.replace(params, jitter_order=torch.zeros(2, 4, dtype=torch.long)))
    with pytest.raises(RuntimeError, match="source_index"):
        aug.apply(images, dataclasses.replace(params, source_index=torch.tensor([0, 2])))


# ---- operator registration ----------------------------------------------------------------------


def test_opcheck():
    aug = SimCLRAugment.simclr(8, p_solarize=0.5)
    for dtype, channels_last in [(torch.uint8, False), (torch.float32, True)]:
        images = random_images(3, 3, 11, 9, dtype)
        p = aug.draw_params(3, 11, 9)
        mean, std = aug._mean_std(3, "cpu")
        args = (
            images,
            p.source_index,
            p.crop_boxes,
            p.flip,
            p.jitter_factors,
            p.jitter_order,
            p.gray,
            p.blur_sigma,
            p.blur_kernel_size,
            p.solarize_threshold,
            mean,
            std,
            8,
            8,
            torch.bfloat16,
            channels_last,
        )
        torch.library.opcheck(torch.ops.pyssl.augment_fused.default, args)
    uniforms = torch.rand(5, 40)
    torch.library.opcheck(torch.ops.pyssl.augment_draw_crops.default, (uniforms, 11, 9, 0.08, 1.0, 0.75, 4 / 3))


# ---- CUDA: the CUDA kernels against the CPU kernels ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16])
@pytest.mark.parametrize("channels", [1, 3])
def test_cuda_matches_cpu(backend, dtype, channels):
    out = 224 if not backend.emulated else 97  # odd sizes: partial 32 x 16 tiles either way
    for aug in (
        SimCLRAugment.simclr((40, 33), p_solarize=0.3),
        SimCLRAugment.mocov2(out, channels_last=True, dtype=torch.bfloat16),
    ):
        images = random_images(9, channels, 57, 80, dtype)
        params = aug.draw_params(9, 57, 80)
        params.jitter_factors[0::2, 1] = 1.0  # no contrast jitter
        params.jitter_factors[1::2, 1] = 0.7
        cpu = aug.apply(images, params)
        with backend:
            gpu = aug.apply(backend.to(images), params.to(backend.device)).cpu()
        # The same float32 operations in the same order on both devices, and no FMA contraction
        # on either: bit for bit. Except where an image has contrast jitter: its mean is a double
        # sum of its pixels' luma, added up in another order on each device, which can round to
        # the neighbouring float32; then its pixels may differ by an ulp or so (float32 output,
        # scaled by the normalisation's 1 / std <= 5), one ulp of a half-precision output.
        contrast = params.jitter_factors[:, 1] != 1
        assert torch.equal(gpu[~contrast], cpu[~contrast])
        ulps = 4 * 2.0**-23 * std_scale(aug) if aug.dtype == torch.float32 else torch.finfo(aug.dtype).eps
        torch.testing.assert_close(gpu[contrast].float(), cpu[contrast].float(), rtol=ulps, atol=ulps)
        assert gpu.isfinite().all()


def test_cuda_draw_and_views(backend):
    uniforms = torch.rand(300, 40)
    for shape in [(64, 48), (1, 200), (500, 3)]:
        cpu = pyssl.ops.augment_draw_crops(uniforms, *shape, (0.08, 1.0), (0.75, 4 / 3))
        with backend:
            gpu = pyssl.ops.augment_draw_crops(backend.to(uniforms), *shape, (0.08, 1.0), (0.75, 4 / 3)).cpu()
        # Different libm rounding may move a box whose side sits exactly on a .5 boundary.
        assert (gpu != cpu).any(1).float().mean() < 0.01
    aug = SimCLRAugment.simclr(32)
    images = backend.to(random_images(16, 3, 40, 40, torch.uint8))
    g = backend.generator(3)
    with backend:
        views, params = aug.views(images, generator=g, return_params=True)
    assert views[0].device.type == backend.device.type and views[0].shape == (16, 3, 32, 32)
    for view, p in zip(views, params):
        torch.testing.assert_close(view.cpu(), aug.apply(images.cpu(), p.to("cpu")), rtol=1e-4, atol=1e-4)
