"""The exact sampler equals the original's double bilinear resize + nearest read; grid_sample difference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from teacher.sampling import ExactSampler, chain_taps, official_double_resize, sample_grid

CHAINS = [
    # (feature h, w), (network input H', W'), (original H, W)
    ((128, 228), (1024, 1820), (900, 1600)),     # the original resolution chain
    ((64, 114), (512, 910), (900, 1600)),        # lower teacher resolution
    ((32, 57), (256, 455), (900, 1600)),
    ((13, 17), (100, 131), (77, 160)),           # odd sizes, down then up
    ((20, 30), (20, 30), (50, 61)),              # single effective resize
]


@pytest.mark.parametrize("feat_hw,net_hw,orig_hw", CHAINS)
def test_exact_sampler_equals_double_resize(feat_hw, net_hw, orig_hw):
    g = torch.Generator().manual_seed(0)
    n, c = 2, 3
    feats = torch.rand(n, c, *feat_hw, generator=g, dtype=torch.float64)
    full = official_double_resize(feats, net_hw, orig_hw)                 # (n, c, H, W) float64
    p = 5000
    img = torch.randint(0, n, (p,), generator=g)
    rc = torch.stack([torch.randint(0, orig_hw[0], (p,), generator=g),
                      torch.randint(0, orig_hw[1], (p,), generator=g)], 1)
    rc[:4] = torch.tensor([[0, 0], [orig_hw[0] - 1, orig_hw[1] - 1], [0, orig_hw[1] - 1], [orig_hw[0] - 1, 0]])
    ref = full[img, :, rc[:, 0], rc[:, 1]]
    got = ExactSampler(index_dtype=torch.float64)(feats.float(), img, rc, net_hw, orig_hw)
    assert got.dtype == torch.float32 and got.shape == (p, c)
    assert (got.double() - ref).abs().max() < 2e-6


@pytest.mark.parametrize("feat_hw,net_hw,orig_hw", CHAINS)
def test_taps_are_few_and_sum_to_one(feat_hw, net_hw, orig_hw):
    for axis in (0, 1):
        idx, w = chain_taps(torch.arange(orig_hw[axis]), (feat_hw[axis], net_hw[axis], orig_hw[axis]),
                            torch.float64)
        assert idx.shape[1] <= 4 and torch.allclose(w.sum(1), torch.ones(orig_hw[axis], dtype=torch.float64))
        assert int(idx.min()) >= 0 and int(idx.max()) < feat_hw[axis]
    if net_hw[0] >= 4 * feat_hw[0]:        # the teacher's up-by-8-then-down chains: <= 3 taps per axis
        assert chain_taps(torch.arange(orig_hw[0]), (feat_hw[0], net_hw[0], orig_hw[0]))[0].shape[1] <= 3
        assert chain_taps(torch.arange(orig_hw[1]), (feat_hw[1], net_hw[1], orig_hw[1]))[0].shape[1] <= 3


EPS32 = float(torch.finfo(torch.float32).eps)          # 2**-23: one ulp of 1.0


def float32_chain_tolerance(feats: torch.Tensor, net_hw: tuple[int, int], ref: torch.Tensor) -> float:
    """Largest difference two correct float32 evaluations of the double resize + read can have.

    Two sources of float32 rounding, each bounded at the magnitude it acts on:
    - values: the official chain forms each output as two separable 2-D lerps (2 stages x 4 weighted terms,
      weights summing to 1), our sampler as one weighted sum of <= 9 taps with float32 weights; a convex sum
      of n terms rounds by at most ~n * eps * max|value|, so (8 + 9) * eps * max|ref|.
    - source indices: every resize computes src = in/out * (dst + 0.5) - 0.5 in float32. How that rounds
      (separate multiply/subtract vs a fused multiply-add, the scale rounded in float or double, vectorised
      or scalar kernel) differs between torch builds by up to ~1.5 ulp(src) <= 2 * eps * in_size
      (torch 2.14.1 differs from our table by 1 ulp at a few rows). A lerp weight wrong by d moves the
      output by d * (difference of the two neighbours it mixes), and the later stage and the other axis
      only average that (convex weights). So per axis: 2 * eps * (in_1 * D_1 + in_2 * D_2), with D_k the
      largest neighbour difference along that axis of stage k's input (the feature map, then the map
      upsampled to the network size).
    For the test's white-noise map (D_1 ~ 1, D_2 ~ 0.12) this is ~1.7e-4; a 1/100-pixel slip of one tap
    weight (the smallest geometric bug worth catching) moves outputs by ~D_1 / 100 ~ 1e-2.
    """
    up = F.interpolate(feats, size=tuple(net_hw), mode="bilinear", align_corners=False)
    value_term = (2 * 4 + 9) * EPS32 * float(ref.abs().max())
    index_term = 0.0
    for axis in (2, 3):
        d1 = float(feats.diff(dim=axis).abs().max())
        d2 = float(up.diff(dim=axis).abs().max())
        index_term += 2 * EPS32 * (feats.shape[axis] * d1 + up.shape[axis] * d2)
    return value_term + index_term


def test_official_chain_at_float32_matches_too():
    feats = torch.rand(1, 4, 128, 228, generator=torch.Generator().manual_seed(1))
    net_hw, orig_hw = (1024, 1820), (900, 1600)
    full = official_double_resize(feats, net_hw, orig_hw)
    rc = torch.stack([torch.arange(0, 900, 3), torch.arange(0, 1600, 5)[:300]], 1)
    img = torch.zeros(300, dtype=torch.long)
    ref = full[0][:, rc[:, 0], rc[:, 1]].t()
    tol = float32_chain_tolerance(feats, net_hw, ref)
    assert 1e-5 < tol < 5e-4
    sampler = ExactSampler()
    err = float((sampler(feats, img, rc, net_hw, orig_hw) - ref).abs().max())
    assert err < tol

    # The tolerance still catches real bugs: a 1/100-pixel slip of the column weights (taps of the
    # feature map shifted by 0.01 px), and a single entry off by 2 * tol.
    key = ((228, 1820, 1600), str(feats.device))
    idx, w = sampler.table(key[0], feats.device)
    slipped = w.clone()
    slipped[:, 0] += 0.01 * (w[:, 1] != 0)
    slipped[:, 1] -= 0.01 * (w[:, 1] != 0)
    sampler._cache[key] = (idx, slipped)
    err_bug = float((sampler(feats, img, rc, net_hw, orig_hw) - ref).abs().max())
    assert err_bug > 10 * tol
    one_off = ref.clone()
    one_off[17, 2] += 2 * tol
    assert float((ExactSampler()(feats, img, rc, net_hw, orig_hw) - one_off).abs().max()) > tol


def test_grid_sample_difference_is_small_but_nonzero():
    g = torch.Generator().manual_seed(2)
    feats = torch.rand(2, 8, 128, 228, generator=g)
    p = 4000
    img = torch.randint(0, 2, (p,), generator=g)
    rc = torch.stack([torch.randint(0, 900, (p,), generator=g), torch.randint(0, 1600, (p,), generator=g)], 1)
    exact = ExactSampler()(feats, img, rc, (1024, 1820), (900, 1600))
    approx = sample_grid(feats, img, rc, (900, 1600))
    rel = float((approx - exact).norm() / exact.norm())
    print(f"grid_sample vs exact on white noise: rel L2 {rel:.2e}, max abs {(approx - exact).abs().max():.2e}")
    assert 1e-5 < rel < 2e-2
