"""RGB <-> Lab against a float64 reference written from the CIE formulas (and scikit-image)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyssl.pretext.lab import ABQuantizer, lab_to_rgb, rgb_to_lab

# --- float64 reference, straight from the definitions (sRGB IEC 61966-2-1, CIE 1976 L*a*b*) ---
_M = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def ref_rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """rgb (..., 3) float64 in [0, 1] -> Lab (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _M.T / _WHITE
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz * (29 / 6) ** 2 / 3 + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def ref_lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE
    lin = np.maximum(xyz, 0) @ np.linalg.inv(_M).T
    rgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.abs(lin) ** (1 / 2.4) - 0.055)
    return np.clip(rgb, 0, 1)


def _nchw_to_last(x):
    return x.movedim(1, -1).numpy()


def test_rgb_to_lab_float64_equals_reference():
    x = torch.rand(3, 3, 9, 7, dtype=torch.float64)
    got = rgb_to_lab(x)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(_nchw_to_last(got), ref_rgb_to_lab(_nchw_to_last(x)), rtol=0, atol=1e-10)


def test_rgb_to_lab_float32_and_uint8():
    x = torch.rand(4, 3, 8, 8)
    ref = ref_rgb_to_lab(_nchw_to_last(x.double()))
    np.testing.assert_allclose(_nchw_to_last(rgb_to_lab(x)), ref, atol=2e-3)
    u = (x * 255).round().to(torch.uint8)
    ref_u = ref_rgb_to_lab(_nchw_to_last(u.double() / 255))
    np.testing.assert_allclose(_nchw_to_last(rgb_to_lab(u)), ref_u, atol=2e-3)


def test_known_colours():
    colours = torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    lab = rgb_to_lab(colours, dim=-1)
    np.testing.assert_allclose(lab[0].numpy(), [100, 0, 0], atol=1e-2)  # the matrix rows sum to D65 to ~1e-5
    np.testing.assert_allclose(lab[1].numpy(), [0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(lab[2].numpy(), [53.24, 80.09, 67.20], atol=0.02)  # CIE sRGB red
    np.testing.assert_allclose(lab[4].numpy(), [32.30, 79.19, -107.86], atol=0.02)


def test_lab_to_rgb_reference_and_round_trip():
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    lab = rgb_to_lab(x)
    back = lab_to_rgb(lab)
    np.testing.assert_allclose(back.numpy(), x.numpy(), atol=1e-10)
    lab_rand = torch.stack([torch.rand(50) * 100, torch.randn(50) * 40, torch.randn(50) * 40], -1).double()
    np.testing.assert_allclose(lab_to_rgb(lab_rand, dim=-1).numpy(), ref_lab_to_rgb(lab_rand.numpy()), atol=1e-9)


def test_matches_skimage():
    color = pytest.importorskip("skimage.color")
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64)
    # scikit-image rounds the CIE constants (0.008856, 7.787): agreement to ~1e-3 in Lab units.
    np.testing.assert_allclose(_nchw_to_last(rgb_to_lab(x)), color.rgb2lab(_nchw_to_last(x)), atol=2e-3)
    lab = rgb_to_lab(x)
    np.testing.assert_allclose(_nchw_to_last(lab_to_rgb(lab)), color.lab2rgb(_nchw_to_last(lab)), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5), dim=st.sampled_from([1, -3]))
def test_property_shapes_and_reference(n, h, w, dim):
    x = torch.rand(n, 3, h, w, dtype=torch.float64)
    lab = rgb_to_lab(x, dim=dim)
    assert lab.shape == x.shape
    np.testing.assert_allclose(_nchw_to_last(lab), ref_rgb_to_lab(_nchw_to_last(x)), atol=1e-10)
    assert lab[:, 0].min() >= -1e-9 and lab[:, 0].max() <= 100 + 1e-9


def test_gradcheck():
    x = (torch.rand(1, 3, 2, 2, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(rgb_to_lab, (x,))
    lab = rgb_to_lab(x.detach()).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: lab_to_rgb(t, clip=False), (lab,))


def test_bad_input():
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_lab(torch.rand(2, 4, 3, 3))
    with pytest.raises(TypeError, match="Tensor"):
        rgb_to_lab(np.zeros((3, 2, 2)))
    with pytest.raises(TypeError, match="floating"):
        lab_to_rgb(torch.zeros(3, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="grid"):
        ABQuantizer(0)


def test_ab_quantizer():
    q = ABQuantizer(10.0)
    assert 200 < q.num_bins <= 484  # the in-gamut part of the 22x22 grid (313 in the paper)
    # Every sRGB colour's ab lies within one grid cell of its bin centre, and no centre is closer.
    ab = rgb_to_lab(torch.rand(2000, 3), dim=-1)[:, 1:]
    idx = q.encode(ab, dim=-1)
    d_bin = (q.centers[idx] - ab).norm(dim=-1)
    d_best = torch.cdist(ab, q.centers).min(dim=1).values
    # Nearest to the look-up point, which is within half a fine cell (1/20 of the grid) of the value.
    assert (d_bin <= d_best + 2 * (10 / 20) * 2**0.5 + 1e-4).all()
    assert d_bin.max() <= 10 * 2**0.5 / 2 + 1.5  # half a cell diagonal, plus the look-up slack
    soft = q.soft_encode(ab.T.reshape(2, 40, 50), dim=0)
    assert soft.shape == (q.num_bins, 40, 50)
    assert torch.allclose(soft.sum(0), torch.ones(40, 50), atol=1e-5)
    # A sharp distribution on one bin decodes to that bin's centre.
    logits = torch.full((1, q.num_bins, 1, 1), -50.0)
    logits[0, 7] = 50.0
    assert torch.allclose(q.decode(logits, dim=1)[0, :, 0, 0], q.centers[7], atol=1e-4)


def _ref_rebalance(counts, centers, lam, sigma):
    # Straight from Zhang et al. (2016), eq. 4, in float64 with explicit loops.
    q = len(counts)
    p = counts / counts.sum()
    smooth = np.zeros(q)
    for i in range(q):
        k = np.exp(-((centers - centers[i]) ** 2).sum(1) / (2 * sigma**2))
        smooth += p[i] * k / k.sum()
    w = 1.0 / ((1 - lam) * smooth + lam / q)
    return w / (smooth * w).sum(), smooth


@settings(max_examples=15, deadline=None)
@given(lam=st.floats(0.01, 1.0), sigma=st.floats(1.0, 20.0), seed=st.integers(0, 2**16))
def test_rebalance_weights_equal_reference(lam, sigma, seed):
    q = ABQuantizer(10.0)
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 50, (q.num_bins,), generator=g).double() * (torch.rand(q.num_bins, generator=g) < 0.3)
    if counts.sum() == 0:
        counts[0] = 1
    w = q.rebalance_weights(counts, lam, sigma)
    ref, smooth = _ref_rebalance(counts.numpy(), q.centers.double().numpy(), lam, sigma)
    np.testing.assert_allclose(w.double().numpy(), ref, rtol=1e-5)
    assert abs((smooth * w.double().numpy()).sum() - 1) < 1e-5  # the loss keeps its size
    # Rarer (smoothed) colours weigh more.
    order = np.argsort(smooth)
    assert (np.diff(w.double().numpy()[order]) <= 1e-6 * w.max().item()).all()


def test_rebalance_weights_edge_cases():
    q = ABQuantizer(10.0)
    assert torch.equal(q.rebalance_weights(torch.zeros(q.num_bins)), torch.ones(q.num_bins))
    counts = torch.rand(q.num_bins)
    torch.testing.assert_close(q.rebalance_weights(counts, lam=1.0), torch.ones(q.num_bins))
    with pytest.raises(ValueError, match="counts"):
        q.rebalance_weights(torch.ones(3))
    for lam in (0.0, 1.5):
        with pytest.raises(ValueError, match="lam"):
            q.rebalance_weights(counts, lam=lam)
