"""The exact sampler equals the original's double bilinear resize + nearest read; grid_sample difference."""
from __future__ import annotations

import pytest
import torch

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


def test_official_chain_at_float32_matches_too():
    feats = torch.rand(1, 4, 128, 228, generator=torch.Generator().manual_seed(1))
    full = official_double_resize(feats, (1024, 1820), (900, 1600))
    rc = torch.stack([torch.arange(0, 900, 3), torch.arange(0, 1600, 5)[:300]], 1)
    img = torch.zeros(300, dtype=torch.long)
    got = ExactSampler()(feats, img, rc, (1024, 1820), (900, 1600))
    assert (got - full[0][:, rc[:, 0], rc[:, 1]].t()).abs().max() < 1e-6


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
