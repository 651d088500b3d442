"""Student image preparation: uint8 RGB camera images -> the TPVFormer input (pipeline.md §1.3).

The official pipeline works on BGR float images at 900x1600: PhotoMetricDistortion (training only, per
image), caffe normalisation (subtract the BGR mean, std 1), zero padding at the bottom/right to a multiple
of 32 (900 -> 928). Here it runs in torch on whatever device the images are on, batched over B x 6 images.

The teacher never sees these images: it gets the un-augmented uint8 originals (teacher.md §1.4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pop3d.constants import device_constant

CAFFE_MEAN_BGR = (103.530, 116.280, 123.675)
_FLT_EPSILON = 1.1920929e-07


def bgr_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """cv2.cvtColor(img, COLOR_BGR2HSV) for float images, without clipping.

    img: (..., 3, H, W) float BGR on any scale -> (..., 3, H, W) with H in [0, 360), S, V as cv2 computes.
    """
    b, g, r = img.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    vmin = torch.minimum(torch.minimum(r, g), b)
    diff = v - vmin
    s = diff / (v.abs() + _FLT_EPSILON)
    scale = 60.0 / (diff + _FLT_EPSILON)
    h = torch.where(v == r, (g - b) * scale, torch.where(v == g, (b - r) * scale + 120.0, (r - g) * scale + 240.0))
    h = torch.where(h < 0, h + 360.0, h)
    return torch.stack([h, s, v], dim=-3)


def hsv_to_bgr(hsv: torch.Tensor) -> torch.Tensor:
    """cv2.cvtColor(hsv, COLOR_HSV2BGR) for float images (H in degrees), without clipping."""
    h, s, v = hsv.unbind(-3)
    h6 = torch.remainder(h / 60.0, 6.0)
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.long().clamp_(0, 5)
    tab = torch.stack([v, v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))], dim=0)  # (4, ..., H, W)
    # cv2's sector table: (b, g, r) take tab[...] entries per sector.
    table = device_constant(((1, 3, 0), (1, 0, 2), (3, 0, 1), (0, 2, 1), (0, 1, 3), (2, 1, 0)), hsv.device,
                            torch.int64)
    idx = table[sector]  # (..., H, W, 3)
    out = torch.gather(tab, 0, idx.movedim(-1, 0))  # (3, ..., H, W)
    out = torch.where((s == 0).unsqueeze(0), v.unsqueeze(0).expand_as(out), out)
    return out.movedim(0, -3)


PHOTOMETRIC_FIELDS = ("brightness", "contrast_first", "alpha", "saturation", "hue", "perm0", "perm1", "perm2")
"""Columns of the photometric parameter tensor (n, 8): brightness delta (0 when that step does not fire),
contrast before the HSV block (1) or after it (0), contrast factor (1 when off), saturation factor (1 when off),
hue shift in degrees (0 when off), and the channel permutation (identity when off)."""


def draw_photometric_params(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw mmdet's PhotoMetricDistortion parameters of ``n`` images on the host: (n, 8) float32
    (columns :data:`PHOTOMETRIC_FIELDS`). The draws come from ``generator`` in the order the original
    draws them per image (each step's coin, then its value), vectorised over the n images."""

    def coin() -> torch.Tensor:
        return torch.rand(n, generator=generator) < 0.5

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    zero, one = torch.zeros(()), torch.ones(())
    brightness = torch.where(coin(), uniform(-32, 32), zero)
    contrast_first = coin()
    do_contrast, alpha = coin(), uniform(0.5, 1.5)
    alpha = torch.where(do_contrast, alpha, one)
    saturation = torch.where(coin(), uniform(0.5, 1.5), one)
    hue = torch.where(coin(), uniform(-18, 18), zero)
    swap = coin()
    perms = torch.stack([torch.randperm(3, generator=generator) for _ in range(n)])
    perms = torch.where(swap.view(n, 1), perms, torch.arange(3).expand(n, 3))
    return torch.cat([torch.stack([brightness, contrast_first.float(), alpha, saturation, hue], 1),
                      perms.float()], 1)


def apply_photometric(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply drawn photometric parameters, on the images' device without host reads.

    img: (N, 3, H, W) float BGR in 0..255; params: (N, 8) (:func:`draw_photometric_params`, any device)
    -> (N, 3, H, W); values are not clipped, as the original.
    """
    n = img.shape[0]
    if tuple(params.shape) != (n, len(PHOTOMETRIC_FIELDS)):
        raise ValueError(f"photometric parameters {tuple(params.shape)} for {n} images: expected "
                         f"({n}, {len(PHOTOMETRIC_FIELDS)})")
    p = params.to(img.device)
    brightness, alpha, sat, hue = (p[:, k].to(img.dtype) for k in (0, 2, 3, 4))
    contrast_first = p[:, 1] > 0.5
    one = torch.ones((), device=img.device)

    def per_image(x: torch.Tensor) -> torch.Tensor:
        return x.view(n, 1, 1, 1)

    img = img + per_image(brightness)
    img = img * per_image(torch.where(contrast_first, alpha, one))
    hsv = bgr_to_hsv(img)
    h = hsv[:, 0] + hue.view(n, 1, 1)
    h = torch.where(h > 360, h - 360, h)
    h = torch.where(h < 0, h + 360, h)
    hsv = torch.stack([h, hsv[:, 1] * sat.view(n, 1, 1), hsv[:, 2]], dim=1)
    img = hsv_to_bgr(hsv)
    img = img * per_image(torch.where(contrast_first, one, alpha))
    perms = p[:, 5:8].long()
    return torch.gather(img, 1, perms.view(n, 3, 1, 1).expand_as(img))


def photometric_distortion(img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """mmdet's PhotoMetricDistortion applied independently to each image (pipeline.md §1.3): the draws of
    :func:`draw_photometric_params` from ``generator``, then :func:`apply_photometric`.

    img: (N, 3, H, W) float BGR in 0..255 -> same shape; values are not clipped, as the original.
    Each step fires with probability 0.5: brightness +-32, contrast x[0.5, 1.5] (before or after the HSV block),
    saturation x[0.5, 1.5], hue +-18 degrees with wrap-around, and a random channel permutation.
    """
    return apply_photometric(img, draw_photometric_params(img.shape[0], generator))


def scale_lidar2img(lidar2img: torch.Tensor, scale_hw: tuple[float, float]) -> torch.Tensor:
    """Rescale LiDAR->pixel matrices for images resized by (sy, sx): rows u and v are multiplied.

    lidar2img: (..., 4, 4) -> (..., 4, 4)
    """
    sy, sx = scale_hw
    s = torch.diag(device_constant((float(sx), float(sy), 1.0, 1.0), lidar2img.device, lidar2img.dtype))
    return s @ lidar2img


def prepare_student_inputs(images: torch.Tensor, lidar2img: torch.Tensor, *, out_hw: tuple[int, int] | None = None,
                           photometric: bool = False, pad_divisor: int = 32,
                           generator: torch.Generator | None = None,
                           photometric_params: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """uint8 RGB images -> normalised, padded BGR float input for TPVFormer.

    images: (B, 6, 3, H, W) uint8 RGB; lidar2img: (B, 6, 4, 4) for the original H x W.
    ``photometric``: apply the distortion, with ``photometric_params`` (B, 6, 8) drawn beforehand (the
    training loader does: :func:`draw_photometric_params`) or, without them, drawn here from ``generator``.
    Returns (imgs (B, 6, 3, Hp, Wp) float32, lidar2img (B, 6, 4, 4) float32 for the (resized) image,
    img_shape (Hp, Wp)): the padded size, which the official model normalises projections by.
    """
    if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"images must be uint8 (B, 6, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    b, n, _, h, w = images.shape
    x = images.reshape(b * n, 3, h, w).float().flip(1)  # RGB -> BGR
    l2i = lidar2img.float()
    if out_hw is not None and tuple(out_hw) != (h, w):
        x = F.interpolate(x, size=tuple(out_hw), mode="bilinear", align_corners=False, antialias=True)
        l2i = scale_lidar2img(l2i, (out_hw[0] / h, out_hw[1] / w))
        h, w = out_hw
    if photometric and photometric_params is not None:
        x = apply_photometric(x, photometric_params.reshape(b * n, -1))
    elif photometric:
        x = photometric_distortion(x, generator)
    x = x - device_constant(CAFFE_MEAN_BGR, x.device).view(1, 3, 1, 1)
    hp = -(-h // pad_divisor) * pad_divisor
    wp = -(-w // pad_divisor) * pad_divisor
    if (hp, wp) != (h, w):
        x = F.pad(x, (0, wp - w, 0, hp - h), value=0.0)
    return x.view(b, n, 3, hp, wp), l2i, (hp, wp)
