"""Batched pretext transforms: rotations, patch grids, jigsaw permutations, inpainting masks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyssl.pretext.transforms import (
    drop_colour_channels,
    extract_patches,
    grid_geometry,
    grid_origins,
    maximal_hamming_permutations,
    min_pairwise_hamming,
    project_out_green_magenta,
    region_masks,
    rotate_all4,
)


def test_rotate_all4_matches_rot90():
    x = torch.randn(5, 3, 7, 7)
    rotated, labels = rotate_all4(x)
    assert rotated.shape == (20, 3, 7, 7)
    for k in range(4):
        assert torch.equal(rotated[5 * k : 5 * (k + 1)], torch.rot90(x, k, dims=(2, 3)))
        assert (labels[5 * k : 5 * (k + 1)] == k).all()
    u = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(rotate_all4(u)[0][2:4], torch.rot90(u, 1, dims=(2, 3)))
    with pytest.raises(ValueError, match="square"):
        rotate_all4(torch.randn(1, 1, 4, 5))
    with pytest.raises(ValueError, match="N, C, H, W"):
        rotate_all4(torch.randn(4, 4))


def test_extract_patches_equals_slicing():
    x = torch.randn(3, 2, 20, 20)
    origins = torch.randint(0, 15, (3, 4, 2))
    p = extract_patches(x, origins, 5)
    for i in range(3):
        for j in range(4):
            r, c = origins[i, j].tolist()
            assert torch.equal(p[i, j], x[i, :, r : r + 5, c : c + 5])


@settings(max_examples=40, deadline=None)
@given(size=st.integers(6, 64), gap=st.integers(0, 4), jitter=st.integers(0, 3))
def test_grid_keeps_gaps_and_bounds(size, gap, jitter):
    try:
        patch = grid_geometry(size, None, gap, jitter, task="t")
    except ValueError as e:
        assert f"{size}x{size}" in str(e) and "minimum" in str(e)
        assert size < 3 * (2 + gap + 2 * jitter)
        return
    o = grid_origins(16, size, patch, gap, jitter)
    assert o.min() >= 0 and o.max() <= size - patch
    g = o.view(16, 3, 3, 2)
    # Horizontal neighbours: at least `gap` pixels between them; likewise vertically.
    assert (g[:, :, 1:, 1] - g[:, :, :-1, 1] - patch).min() >= gap
    assert (g[:, 1:, :, 0] - g[:, :-1, :, 0] - patch).min() >= gap


def test_grid_too_small_names_size_and_minimum():
    with pytest.raises(ValueError, match=r"8x8.*minimum image size is 18x18"):
        grid_geometry(8, None, 2, 1, task="jigsaw")


def test_maximal_hamming_permutations():
    p = maximal_hamming_permutations(100)
    assert p.shape == (100, 9)
    assert torch.equal(p.sort(dim=1).values, torch.arange(9).expand(100, 9))
    assert len({tuple(r) for r in p.tolist()}) == 100
    assert torch.equal(p, maximal_hamming_permutations(100))  # deterministic
    # Greedy selection spreads them far better than chance.
    g = torch.Generator().manual_seed(0)
    rand = torch.stack([torch.randperm(9, generator=g) for _ in range(100)])
    assert min_pairwise_hamming(p) >= 6 > min_pairwise_hamming(rand)
    with pytest.raises(ValueError, match="num_permutations"):
        maximal_hamming_permutations(0)


def test_region_masks():
    m = region_masks(4, 16, "center", 0.5)
    assert m.shape == (4, 1, 16, 16) and m.dtype == torch.bool
    assert m[:, :, 4:12, 4:12].all() and m.sum() == 4 * 64
    r = region_masks(50, 16, "random", 0.25)
    assert (r.flatten(1).sum(1) == 16).all()
    assert len({tuple(x.nonzero()[0].tolist()) for x in r}) > 1
    with pytest.raises(ValueError, match="mode"):
        region_masks(1, 8, "ring")
    with pytest.raises(ValueError, match="fraction"):
        region_masks(1, 8, "center", 1.5)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6))
def test_green_magenta_projection_equals_float64_reference(n, h, w):
    import numpy as np

    x = torch.rand(n, 3, h, w, dtype=torch.float64)
    a = np.array([-1.0, 2.0, -1.0]) / np.sqrt(6.0)
    ref = np.einsum("dc,nchw->ndhw", np.eye(3) - np.outer(a, a), x.numpy())
    got = project_out_green_magenta(x)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12)
    # Nothing green-magenta is left, greys are untouched, and projecting twice changes nothing.
    assert torch.einsum("nchw,c->nhw", got, torch.tensor(a)).abs().max() < 1e-12
    grey = torch.rand(n, 1, h, w, dtype=torch.float64).expand(-1, 3, -1, -1)
    torch.testing.assert_close(project_out_green_magenta(grey), grey)
    torch.testing.assert_close(project_out_green_magenta(got), got)
    with pytest.raises(ValueError, match="3 channels"):
        project_out_green_magenta(torch.rand(n, 1, h, w))


def test_drop_colour_channels_keeps_one_channel_per_image():
    x = torch.rand(64, 3, 9, 9)
    out = drop_colour_channels(x, generator=torch.Generator().manual_seed(1))
    kept = (out == x).flatten(2).all(-1)  # (N, C): channels passed through unchanged
    assert (kept.sum(1) == 1).all()
    assert set(kept.float().argmax(1).tolist()) == {0, 1, 2}  # every channel gets kept sometimes
    filler_std = out[~kept].flatten(1).std(1)
    assert (filler_std < 0.05 * x.flatten(2).std(-1).min()).all()  # faint noise, no structure
    again = drop_colour_channels(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
