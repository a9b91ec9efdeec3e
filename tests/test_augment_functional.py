"""pyssl.augment.functional against torchvision.transforms.v2.functional, image by image."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import pyssl.augment.functional as AF

DTYPES = [torch.uint8, torch.float32, torch.float64]


def random_images(batch, channels, height, width, dtype):
    images = torch.randint(0, 256, (batch, channels, height, width), dtype=torch.uint8)
    if dtype == torch.uint8:
        return images
    # Not only multiples of 1/255: fresh float values in [0, 1], including the exact bounds.
    x = torch.rand(batch, channels, height, width, dtype=torch.float64)
    x[..., 0, 0] = 0.0
    x[..., -1, -1] = 1.0
    return x.to(dtype)


def assert_matches(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    tol = 1.0 if dtype == torch.uint8 else 1e-5
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= tol, f"max difference {diff} > {tol}"


def per_image(fn, images, *params):
    return torch.stack([fn(images[i], *(p[i] for p in params)) for i in range(images.shape[0])])


def uniform(batch, low, high):
    return torch.empty(batch, dtype=torch.float64).uniform_(low, high)


COLOR_OPS = {
    "brightness": (AF.adjust_brightness, TF.adjust_brightness, (0.0, 2.0)),
    "contrast": (AF.adjust_contrast, TF.adjust_contrast, (0.0, 2.0)),
    "saturation": (AF.adjust_saturation, TF.adjust_saturation, (0.0, 2.0)),
    "hue": (AF.adjust_hue, TF.adjust_hue, (-0.5, 0.5)),
}


@pytest.mark.parametrize("name", list(COLOR_OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_color_ops_match_torchvision(name, dtype, channels):
    ours, theirs, (low, high) = COLOR_OPS[name]
    images = random_images(5, channels, 11, 17, dtype)
    factors = uniform(5, low, high)
    factors[0] = low  # the range ends
    factors[1] = high
    expected = per_image(lambda im, f: theirs(im, f.item()), images, factors)
    assert_matches(ours(images, factors), expected, dtype)


@pytest.mark.parametrize("name", list(COLOR_OPS))
def test_color_ops_scalar_parameter(name):
    ours, theirs, (low, high) = COLOR_OPS[name]
    images = random_images(3, 3, 9, 8, torch.float32)
    factor = (low + high) / 2 + 0.123 * (high - low) / 2
    assert_matches(ours(images, factor), theirs(images, factor), torch.float32)


def test_hue_on_gray_and_saturated_pixels():
    # Pixels with max == min (gray) and with two equal channels exercise each hue branch.
    values = torch.tensor([0.0, 0.25, 0.5, 1.0])
    grid = torch.cartesian_prod(values, values, values).T.reshape(1, 3, 8, 8)
    for shift in (-0.5, -0.1, 0.0, 0.3, 0.5):
        assert_matches(AF.adjust_hue(grid, shift), TF.adjust_hue(grid, shift), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_resized_crop_matches_torchvision(dtype, channels):
    batch, height, width = 6, 23, 31
    images = random_images(batch, channels, height, width, dtype)
    h = torch.randint(1, height + 1, (batch,))
    w = torch.randint(1, width + 1, (batch,))
    top = (torch.rand(batch) * (height - h + 1)).long()
    left = (torch.rand(batch) * (width - w + 1)).long()
    h[0], w[0], top[0], left[0] = height, width, 0, 0  # whole image
    h[1], w[1] = 1, 1  # a single pixel
    boxes = torch.stack([top, left, h, w], 1)
    for size in [(13, 29), (40, 7), (h[2].item(), w[2].item())]:
        expected = per_image(
            lambda im, b, size=size: TF.resized_crop(im, *b.tolist(), list(size), antialias=False), images, boxes
        )
        assert_matches(AF.resized_crop(images, boxes, size), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hflip_and_grayscale(dtype):
    images = random_images(4, 3, 7, 10, dtype)
    mask = torch.tensor([True, False, True, False])
    flipped = AF.hflip(images, mask)
    assert torch.equal(flipped[mask], TF.horizontal_flip(images[mask]))
    assert torch.equal(flipped[~mask], images[~mask])
    for n in (1, 3):
        assert_matches(AF.rgb_to_grayscale(images, n), TF.rgb_to_grayscale(images, n), dtype)
    gray = random_images(2, 1, 5, 6, dtype)
    assert torch.equal(AF.rgb_to_grayscale(gray, 3), TF.rgb_to_grayscale(gray, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_gaussian_blur_matches_torchvision(dtype, channels):
    images = random_images(5, channels, 19, 26, dtype)
    sigma = uniform(5, 0.1, 3.0)
    for kernel_size in (1, 3, 9, 17):
        expected = per_image(
            lambda im, s, kernel_size=kernel_size: TF.gaussian_blur(im, [kernel_size] * 2, [s.item()] * 2),
            images,
            sigma,
        )
        assert_matches(AF.gaussian_blur(images, sigma, kernel_size), expected, dtype)
    # Kernel size from sigma: 2 ceil(3 sigma) + 1, different per image.
    ksize = AF.kernel_size_for(sigma)
    assert torch.equal(ksize, torch.tensor([2 * math.ceil(3 * s) + 1 for s in sigma.tolist()]))
    expected = torch.stack([TF.gaussian_blur(images[i], [int(ksize[i])] * 2, [sigma[i].item()] * 2) for i in range(5)])
    assert_matches(AF.gaussian_blur(images, sigma), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_solarize_and_normalize(dtype):
    images = random_images(4, 3, 6, 5, dtype)
    bound = 255 if dtype == torch.uint8 else 1.0
    thresholds = [0.0, 0.3 * bound, 0.5 * bound, bound]
    if dtype == torch.uint8:
        thresholds = [float(int(t)) for t in thresholds]
    expected = torch.stack([TF.solarize(images[i], t) for i, t in enumerate(thresholds)])
    assert torch.equal(AF.solarize(images, torch.tensor(thresholds)), expected)
    assert torch.equal(AF.solarize(images, math.inf), images)
    if dtype != torch.uint8:
        mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.7]
        assert_matches(AF.normalize(images, mean, std), TF.normalize(images, mean, std), dtype)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.sampled_from([1, 3]),
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    out=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    dtype=st.sampled_from(DTYPES),
    factors=st.tuples(st.floats(0, 3), st.floats(0, 3), st.floats(0, 3), st.floats(-0.5, 0.5)),
    sigma=st.floats(0.05, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_ops_match_torchvision(batch, channels, height, width, out, dtype, factors, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, channels, height, width), dtype=torch.uint8, generator=g)
    if dtype != torch.uint8:
        images = torch.rand(images.shape, generator=g, dtype=torch.float64).to(dtype)
    h = torch.randint(1, height + 1, (batch,), generator=g)
    w = torch.randint(1, width + 1, (batch,), generator=g)
    top = (torch.rand(batch, generator=g) * (height - h + 1)).long()
    left = (torch.rand(batch, generator=g) * (width - w + 1)).long()
    boxes = torch.stack([top, left, h, w], 1)
    expected = per_image(lambda im, b: TF.resized_crop(im, *b.tolist(), list(out), antialias=False), images, boxes)
    cropped = AF.resized_crop(images, boxes, out)
    assert_matches(cropped, expected, dtype)
    for (ours, theirs, _), f in zip(COLOR_OPS.values(), factors):
        assert_matches(ours(expected, f), theirs(expected, f), dtype)
    # torchvision's reflect padding needs the radius below the image side.
    ksize = min(2 * math.ceil(3 * sigma) + 1, 2 * (min(out) - 1) + 1)
    assert_matches(
        AF.gaussian_blur(expected, sigma, ksize), TF.gaussian_blur(expected, [ksize] * 2, [sigma] * 2), dtype
    )


# ---- empty batches ------------------------------------------------------------------------------

# (ours, torchvision's) on one batch: torchvision's kernels take (0, C, H, W) and return one.
EMPTY_BATCH_OPS = {
    "resized_crop": (
        lambda x: AF.resized_crop(x, torch.zeros(0, 4, dtype=torch.long), (4, 5)),
        lambda x: TF.resized_crop(x, 0, 0, 4, 4, [4, 5], antialias=False),
    ),
    "hflip": (AF.hflip, TF.horizontal_flip),
    "adjust_brightness": (lambda x: AF.adjust_brightness(x, 1.2), lambda x: TF.adjust_brightness(x, 1.2)),
    "adjust_contrast": (lambda x: AF.adjust_contrast(x, 1.2), lambda x: TF.adjust_contrast(x, 1.2)),
    "adjust_saturation": (lambda x: AF.adjust_saturation(x, 1.2), lambda x: TF.adjust_saturation(x, 1.2)),
    "adjust_hue": (lambda x: AF.adjust_hue(x, 0.1), lambda x: TF.adjust_hue(x, 0.1)),
    "rgb_to_grayscale": (lambda x: AF.rgb_to_grayscale(x, 3), lambda x: TF.rgb_to_grayscale(x, 3)),
    "gaussian_blur": (lambda x: AF.gaussian_blur(x, 1.0), lambda x: TF.gaussian_blur(x, [7, 7], [1.0, 1.0])),
    "gaussian_blur_per_image": (
        lambda x: AF.gaussian_blur(x, torch.empty(0), torch.empty(0, dtype=torch.long)),
        lambda x: TF.gaussian_blur(x, [3, 3], [1.0, 1.0]),
    ),
    "solarize": (lambda x: AF.solarize(x, 0.5 * _bound(x)), lambda x: TF.solarize(x, 0.5 * _bound(x))),
    "normalize": (
        lambda x: AF.normalize(x, [0.5] * x.shape[1], [0.2] * x.shape[1]),
        lambda x: TF.normalize(x, [0.5] * x.shape[1], [0.2] * x.shape[1]),
    ),
}


def _bound(images):
    return 255 if images.dtype == torch.uint8 else 1.0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", EMPTY_BATCH_OPS)
def test_empty_batch_gives_an_empty_batch_as_torchvision(name, channels, dtype):
    if name == "normalize" and dtype == torch.uint8:
        pytest.skip("normalize takes floating images only")
    ours, theirs = EMPTY_BATCH_OPS[name]
    images = torch.zeros(0, channels, 8, 6, dtype=dtype)
    got, want = ours(images), theirs(images)
    assert got.shape == want.shape and got.dtype == want.dtype


def test_images_without_pixels_are_an_error():
    with pytest.raises(ValueError, match="no pixels"):
        AF.adjust_brightness(torch.zeros(2, 3, 0, 4), 1.0)


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    images = random_images(2, 3, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="boxes\\[1\\].*not inside"):
        AF.resized_crop(images, torch.tensor([[0, 0, 8, 8], [2, 2, 7, 3]]), 4)
    with pytest.raises(ValueError, match="boxes must have shape"):
        AF.resized_crop(images, torch.tensor([[0, 0, 8, 8]]), 4)
    with pytest.raises(TypeError, match="integer"):
        AF.resized_crop(images, torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="size"):
        AF.resized_crop(images, torch.tensor([[0, 0, 8, 8]] * 2), 0)
    with pytest.raises(ValueError, match="sigma"):
        AF.gaussian_blur(images, torch.tensor([1.0, -0.5]), 3)
    with pytest.raises(ValueError, match="kernel_size"):
        AF.gaussian_blur(images, 1.0, 4)
    with pytest.raises(ValueError, match="one value per image"):
        AF.adjust_brightness(images, torch.tensor([1.0, 1.1, 1.2]))
    with pytest.raises(ValueError, match="factor"):
        AF.adjust_contrast(images, -0.1)
    with pytest.raises(ValueError, match="factor"):
        AF.adjust_hue(images, 0.7)
    with pytest.raises(ValueError, match="factor"):
        AF.adjust_saturation(images, torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="uint8 or floating"):
        AF.adjust_brightness(images.to(torch.int32), 1.0)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        AF.adjust_saturation(torch.rand(2, 4, 5, 5), 1.0)
    with pytest.raises(ValueError, match="\\(B, C, H, W\\)"):
        AF.adjust_brightness(torch.rand(3, 5, 5), 1.0)
    with pytest.raises(TypeError, match="floating"):
        AF.normalize(images.mul(255).to(torch.uint8), [0.5] * 3, [0.2] * 3)
    with pytest.raises(ValueError, match="3 values"):
        AF.normalize(images, [0.5], [0.2])
    with pytest.raises(TypeError, match="bool"):
        AF.hflip(images, torch.tensor([1, 0]))
