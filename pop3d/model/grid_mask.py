"""GridMask augmentation as POP-3D configures it (use_h, use_w, rotate=1 -> 0 degrees, ratio 0.5, mode 1,
prob 0.7), built with ``arange``/modulo on the input's device instead of numpy + PIL on the CPU."""
from __future__ import annotations

import torch
from torch import nn


def grid_mask_pattern(h: int, w: int, d: int, st_h: int, st_w: int, ratio: float = 0.5,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(h, w) float mask: 1 on the stripes, 0 on the (d - l)^2 squares (mode 1, ~25 % zeros for ratio 0.5).

    The original draws stripes of width ``l = clamp(int(d*ratio + 0.5), 1, d - 1)`` with period d from
    offset st in [0, d) on a (int(1.5h), int(1.5w)) canvas (``canvas // d`` stripes per axis) and
    centre-crops it; this computes the same pixels directly.
    """
    hh, ww = int(1.5 * h), int(1.5 * w)
    lw = min(max(int(d * ratio + 0.5), 1), d - 1)

    def stripes(n: int, big: int, st: int) -> torch.Tensor:
        r = torch.arange(n, device=device) + (big - n) // 2 - st  # canvas coordinate minus stripe start
        return (r >= 0) & (torch.remainder(r, d) < lw) & (torch.div(r, d, rounding_mode="floor") < big // d)

    return (stripes(h, hh, st_h)[:, None] | stripes(w, ww, st_w)[None, :]).float()


class GridMask(nn.Module):
    """x (N, C, H, W) -> x * mask in training with probability ``prob``; one mask for all images/channels,
    or, with ``generators`` (one per sample of a batch of ``len(generators)`` samples, N = B x cameras), one
    draw and mask per sample from its own generator: sample b gets the mask it gets alone."""

    def __init__(self, prob: float = 0.7, ratio: float = 0.5):
        super().__init__()
        self.prob, self.ratio = prob, ratio

    def _mask(self, h: int, w: int, generator: torch.Generator | None, device, dtype) -> torch.Tensor | None:
        """One draw: (h, w) mask, or None when GridMask does not fire (probability 1 - prob)."""
        if torch.rand((), generator=generator).item() > self.prob:
            return None
        d = int(torch.randint(2, h, (), generator=generator))
        st_h = int(torch.randint(d, (), generator=generator))
        st_w = int(torch.randint(d, (), generator=generator))
        return grid_mask_pattern(h, w, d, st_h, st_w, self.ratio, device).to(dtype)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                generators: list[torch.Generator] | None = None) -> torch.Tensor:
        if not self.training:
            return x
        h, w = x.shape[-2:]
        if generators is None:
            mask = self._mask(h, w, generator, x.device, x.dtype)
            return x if mask is None else x * mask
        b = len(generators)
        if b == 0 or x.shape[0] % b:
            raise ValueError(f"GridMask: {x.shape[0]} images cannot be split into {b} samples")
        masks = [self._mask(h, w, g, x.device, x.dtype) for g in generators]
        if all(m is None for m in masks):
            return x
        ones = torch.ones((h, w), device=x.device, dtype=x.dtype)
        stacked = torch.stack([ones if m is None else m for m in masks])  # (B, h, w)
        return (x.view(b, -1, *x.shape[1:]) * stacked[:, None, None]).view_as(x)
