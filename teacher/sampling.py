"""Reading teacher features at integer pixels of the ORIGINAL image without any full-resolution map.

The original extraction (teacher.md §1.3-1.4) upsampled the (C, h, w) feature map bilinearly
(align_corners=False) to the network input size (H', W') = e.g. (1024, 1820), then again to the original
image size (H, W) = (900, 1600), and read the result at integer (row, col). Both resizes are linear and
separable, so the value at (r, c) is

    f(r, c) = sum_a sum_b  Ah[r, a] * Aw[c, b] * L[:, a, b]

with Ah = R(H' -> H) @ R(h -> H') of shape (H, h), Aw likewise (W, w), and R(n -> m) the (m, n) matrix of one
PyTorch bilinear resize. Every row of Ah / Aw has at most 3 non-zero taps for the upsampling chains used
here (in general at most 4), so a point costs <= 9 reads of a C-vector: :class:`ExactSampler`.

:func:`sample_grid` is the cheaper approximation: ONE bilinear ``grid_sample`` (align_corners=False,
border padding) at the pixel centre mapped straight into the (h, w) map, i.e. 2x2 taps. Measured against the
original's targets on the teacher_tiny fixture (random weights, 3000 points, features up to ~8): max abs
error 3.2e-2, relative L2 4.7e-4, min cosine 0.99999 (the exact sampler: 4.3e-6 / 1.9e-7); on white-noise
maps (tests/test_teacher_sampling.py) the relative L2 is ~1e-2. Use it only where such targets are
acceptable; the default is exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# 1-D taps
# ----------------------------------------------------------------------------------------------------


def _linear_taps(dst: torch.Tensor, in_size: int, out_size: int,
                 index_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Taps of one PyTorch bilinear resize in_size -> out_size (align_corners=False, size given, no scale).

    dst: (P,) int64 output positions. Returns (i0, i1, w0, w1), each (P,), weights float64, following ATen's
    ``area_pixel_compute_source_index``: src = in/out * (dst + 0.5) - 0.5, clamped at 0; i1 = min(i0+1, in-1),
    w1 = src - i0. ``index_dtype`` is the precision of that arithmetic: float32 is what ATen does for a
    float32 map (CPU and CUDA: opmath = float), i.e. what the original fp32 extraction computed; float64
    gives the mathematically exact operator (and ATen's result for a float64 map).
    """
    scale = torch.tensor(in_size, dtype=index_dtype) / out_size
    src = (scale * (dst.to(index_dtype) + 0.5) - 0.5).clamp_(min=0.0)
    i0 = src.floor().to(torch.int64).clamp_(max=in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = src - i0.to(index_dtype)
    w0 = 1.0 - w1
    return i0, i1, w0.to(torch.float64), w1.to(torch.float64)


def chain_taps(positions: torch.Tensor, sizes: tuple[int, ...],
               index_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps of a chain of 1-D bilinear resizes sizes[0] -> sizes[1] -> ... -> sizes[-1], read at positions.

    positions: (P,) int64 in [0, sizes[-1]). Returns (index (P, K) int64 into [0, sizes[0]),
    weight (P, K) float64), K = the largest number of distinct taps any position needs (<= 2**(len-1),
    3 for the 8x-then-slightly-down chains of the teacher). Unused slots have weight 0 and a valid index.
    index_dtype: see :func:`_linear_taps` (float32 = the original fp32 run, float64 = exact operator).
    """
    if len(sizes) < 2:
        raise ValueError(f"chain_taps: need at least two sizes, got {sizes}")
    pos = positions.to(torch.int64)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= sizes[-1]):
        raise ValueError(f"chain_taps: positions outside [0, {sizes[-1]}): min {int(pos.min())}, "
                         f"max {int(pos.max())}")
    idx = pos.unsqueeze(1)                                    # (P, 1) at the last size
    w = torch.ones(idx.shape, dtype=torch.float64, device=pos.device)
    for k in range(len(sizes) - 1, 0, -1):                    # walk back towards the feature map
        i0, i1, w0, w1 = _linear_taps(idx.reshape(-1), sizes[k - 1], sizes[k], index_dtype)
        idx = torch.stack([i0, i1], 1).reshape(idx.shape[0], -1)
        w = (w.reshape(-1, 1) * torch.stack([w0, w1], 1)).reshape(idx.shape[0], -1)
    # merge duplicates: taps are contiguous runs base .. base+span
    base = idx.min(dim=1, keepdim=True).values
    off = idx - base
    span = int(off.max()) + 1 if off.numel() else 1
    merged = torch.zeros(idx.shape[0], span, dtype=torch.float64, device=pos.device)
    merged.scatter_add_(1, off, w)
    keep = (merged != 0).any(dim=0)
    keep_cols = torch.nonzero(keep).flatten()
    if keep_cols.numel() == 0:
        keep_cols = torch.zeros(1, dtype=torch.int64, device=pos.device)
    last = int(keep_cols.max()) + 1
    out_idx = (base + torch.arange(last, device=pos.device)).clamp_(max=sizes[0] - 1)
    return out_idx, merged[:, :last]


# ----------------------------------------------------------------------------------------------------
# Exact sampler
# ----------------------------------------------------------------------------------------------------


class ExactSampler:
    """Per-point features equal to the original's double bilinear upsampling + nearest-pixel read.

    Per-axis tap tables (H, Kh) / (W, Kw) are built once per (h, H', H) and (w, W', W) chain and device and
    cached; a call gathers <= Kh*Kw (<= 9) C-vectors per point with one ``F.embedding_bag`` (weighted sum).
    ``index_dtype`` float32 (default) reproduces the source-index rounding of the original's fp32
    ``F.interpolate`` calls; float64 is the exact operator (differences ~1e-5 relative at 1600 px).
    """

    def __init__(self, index_dtype: torch.dtype = torch.float32) -> None:
        self.index_dtype = index_dtype
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (S, K) int64, weight (S, K) float32) for every position 0..S-1 of the last size S."""
        key = (tuple(int(s) for s in sizes), str(device))
        if key not in self._cache:
            pos = torch.arange(sizes[-1], device=device)
            idx, w = chain_taps(pos, key[0], self.index_dtype)
            self._cache[key] = (idx, w.to(torch.float32))
        return self._cache[key]

    def __call__(self, feats: torch.Tensor, img_index: torch.Tensor, rowcol: torch.Tensor,
                 net_hw: tuple[int, int], orig_hw: tuple[int, int]) -> torch.Tensor:
        """feats (N, C, h, w); img_index (P,) in [0, N); rowcol (P, 2) int (row, col) of the (H, W) image.

        net_hw = (H', W') the network input size the map was first upsampled to; orig_hw = (H, W).
        Returns float32 (P, C).
        """
        n, c, h, w = feats.shape
        dev = feats.device
        rows_i, rows_w = self.table((h, net_hw[0], orig_hw[0]), dev)
        cols_i, cols_w = self.table((w, net_hw[1], orig_hw[1]), dev)
        r = rowcol[:, 0].to(dev)
        col = rowcol[:, 1].to(dev)
        ri, rw = rows_i[r], rows_w[r]                                  # (P, Kh)
        ci, cw = cols_i[col], cols_w[col]                              # (P, Kw)
        base = img_index.to(dev).to(torch.int64).unsqueeze(1) * (h * w)
        flat_idx = (base + ri * w).unsqueeze(2) + ci.unsqueeze(1)      # (P, Kh, Kw)
        weights = rw.unsqueeze(2) * cw.unsqueeze(1)                    # (P, Kh, Kw)
        table = feats.float().permute(0, 2, 3, 1).reshape(n * h * w, c)  # (N*h*w, C)
        return F.embedding_bag(flat_idx.flatten(1), table, per_sample_weights=weights.flatten(1), mode="sum")


def _grid_coords(rowcol: torch.Tensor, orig_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel (row, col) of the original image -> grid_sample's x, y in [-1, 1] (align_corners=False): (P,) each."""
    rc = rowcol.to(torch.float32)
    return (rc[:, 1] + 0.5) / orig_hw[1] * 2 - 1, (rc[:, 0] + 0.5) / orig_hw[0] * 2 - 1


def sample_grid(feats: torch.Tensor, img_index: torch.Tensor, rowcol: torch.Tensor,
                orig_hw: tuple[int, int]) -> torch.Tensor:
    """Approximate sampler: one bilinear grid_sample per image at the pixel centre (align_corners=False).

    feats (N, C, h, w); img_index (P,); rowcol (P, 2). Returns float32 (P, C). See the module docstring for
    its measured difference from :class:`ExactSampler`.
    """
    _n, c, _h, _w = feats.shape
    dev = feats.device
    img_index = img_index.to(dev)
    gx, gy = _grid_coords(rowcol.to(dev), orig_hw)
    out = torch.empty(gx.shape[0], c, dtype=torch.float32, device=dev)
    for i in torch.unique(img_index).tolist():
        sel = torch.nonzero(img_index == i).flatten()
        grid = torch.stack([gx[sel], gy[sel]], -1).view(1, 1, -1, 2)
        got = F.grid_sample(feats[i:i + 1].float(), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)                       # (1, C, 1, P_i)
        out[sel] = got[0, :, 0].t()
    return out


def sample_grid_dense(feats: torch.Tensor, img_index: torch.Tensor, rowcol: torch.Tensor,
                      orig_hw: tuple[int, int]) -> torch.Tensor:
    """:func:`sample_grid` without host synchronisation: every image is read at every point and each point
    keeps its own image's value (N times the reads; same values). Returns float32 (P, C)."""
    n, c, _h, _w = feats.shape
    dev = feats.device
    img_index = img_index.to(dev)
    gx, gy = _grid_coords(rowcol.to(dev), orig_hw)
    grid = torch.stack([gx, gy], -1).view(1, 1, -1, 2)
    out = torch.zeros(gx.shape[0], c, dtype=torch.float32, device=dev)
    for i in range(n):
        got = F.grid_sample(feats[i:i + 1].float(), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)[0, :, 0].t()   # (P, C)
        out = torch.where((img_index == i)[:, None], got, out)
    return out


def official_double_resize(feats: torch.Tensor, net_hw: tuple[int, int], orig_hw: tuple[int, int]) -> torch.Tensor:
    """The original's two F.interpolate calls (reference for tests; materialises (N, C, H, W)!)."""
    up = F.interpolate(feats, size=tuple(net_hw), mode="bilinear", align_corners=False)
    return F.interpolate(up, size=tuple(orig_hw), mode="bilinear", align_corners=False)
