"""Multi-scale deformable attention (the sampling core), one function with interchangeable backends.

Notation: Bv value batch, S = sum_l H_l*W_l tokens, M heads, D channels per head, Q queries, L levels,
P points. Locations are normalised (x, y): 0 is the left/top edge of the first pixel, 1 the right/bottom
edge of the last (pixel centres at (k + 0.5) / W_l). For every (b, q, m):

    out[b, q, m*D:(m+1)*D] = sum_{l,p} A[b,q,m,l,p] * bilinear(V_l[b, :, m], x*W_l - 0.5, y*H_l - 0.5)

with per-corner zero padding (mmcv's CUDA kernel formula). Backends:

* ``'pytorch'``: ``F.grid_sample(align_corners=False, padding_mode='zeros')`` per level at ``2*loc - 1``,
  which un-normalises to exactly ``x*W - 0.5``; always available, fp32 accumulation.
* ``'triton'``: the fused Triton kernel of :mod:`pop3d.model.msda_triton` (forward and backward; value in
  its own dtype, bf16 or fp32, fp32 accumulation; saves only value, locations and weights for backward).
  CUDA tensors; CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, used by the tests).
* ``'mmcv'``: ``mmcv.ops.multi_scale_deform_attn`` (optional extra ``pop3d[mmcv]``), fp32.
* ``'auto'``: on CUDA ``'triton'`` when triton imports, else ``'mmcv'`` when importable, else
  ``'pytorch'``; on other devices ``'pytorch'``.

All backends compute in fp32 whatever the input dtype (autocast-safe) and return fp32.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "pytorch", "triton", "mmcv")


def _mmcv_function():
    try:
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction
    except (ImportError, OSError, RuntimeError):  # not installed, or installed without compiled ops
        return None
    return MultiScaleDeformableAttnFunction


def _triton_module():
    try:
        from . import msda_triton
    except (ImportError, OSError, RuntimeError):  # triton absent (e.g. macOS, CPU-only wheels) or broken
        return None
    return msda_triton


def triton_available() -> bool:
    """True when triton imports (the fused kernel then runs on CUDA tensors)."""
    return _triton_module() is not None


def mmcv_available() -> bool:
    """True when mmcv's compiled multi-scale deformable attention can be imported."""
    return _mmcv_function() is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``'auto'`` into a concrete backend for tensors on ``device``; validate the name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown deformable-attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return "pytorch"
        return "triton" if triton_available() else "mmcv" if mmcv_available() else "pytorch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("attention backend 'triton' requested but triton is not importable; install triton "
                           "(it ships with torch's CUDA wheels on Linux) or use backend='pytorch'")
    if backend == "mmcv" and not mmcv_available():
        raise RuntimeError("attention backend 'mmcv' requested but mmcv.ops is not importable; install the "
                           "optional extra (pip install 'pop3d[mmcv]') or use backend='pytorch'")
    return backend


def _shapes_list(spatial_shapes) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def msda_pytorch(value: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
                 sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                 compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """grid_sample formulation. value (Bv,S,M,D), loc (Bv,Q,M,L,P,2), attn (Bv,Q,M,L,P) -> (Bv,Q,M*D) in
    ``compute_dtype`` (fp32; float64 for reference checks)."""
    bv, _, m, d = value.shape
    q, n_points = sampling_locations.shape[1], sampling_locations.shape[4]
    value = value.to(compute_dtype)
    grids = 2.0 * sampling_locations.to(compute_dtype) - 1.0
    attention_weights = attention_weights.to(compute_dtype)
    out = None
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        # (Bv, h*w, M, D) -> (Bv*M, D, h, w)
        v_l = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(bv * m, d, h, w)
        start += h * w
        g_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (Bv*M, Q, P, 2)
        s_l = F.grid_sample(v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        a_l = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(bv * m, 1, q, n_points)
        o_l = (s_l * a_l).sum(-1)  # (Bv*M, D, Q)
        out = o_l if out is None else out + o_l
    return out.view(bv, m * d, q).transpose(1, 2).contiguous()


def msda_mmcv(value: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
              sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
              im2col_step: int = 64) -> torch.Tensor:
    """mmcv's compiled kernel (fp32). Same shapes as :func:`msda_pytorch`."""
    fn = _mmcv_function()
    if fn is None:
        raise RuntimeError("mmcv.ops is not importable; install the optional extra or use backend='pytorch'")
    shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=value.device)
    level_start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    return fn.apply(value.float().contiguous(), shapes, level_start, sampling_locations.float().contiguous(),
                    attention_weights.float().contiguous(), im2col_step)


def multi_scale_deformable_attn(value: torch.Tensor, spatial_shapes, sampling_locations: torch.Tensor,
                                attention_weights: torch.Tensor, backend: str = "auto",
                                im2col_step: int = 64) -> torch.Tensor:
    """Multi-scale deformable attention with a selectable backend (see module docstring).

    Args:
        value: (Bv, S, M, D), levels concatenated row-major in the order of ``spatial_shapes``.
        spatial_shapes: [(H_l, W_l)] * L as a list or a (L, 2) long tensor.
        sampling_locations: (Bv, Q, M, L, P, 2) normalised (x, y); not clamped (far-out points give 0).
        attention_weights: (Bv, Q, M, L, P), already normalised by the caller.
        backend: ``'auto'`` | ``'pytorch'`` | ``'triton'`` | ``'mmcv'``.
    Returns:
        (Bv, Q, M*D) float32, head-major channels (c = m*D + d).
    """
    shapes = _shapes_list(spatial_shapes)
    s = value.shape[1]
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"value has {s} tokens but spatial_shapes {shapes} sum to {sum(h * w for h, w in shapes)}")
    if sampling_locations.shape[:3] != attention_weights.shape[:3] or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} and attention_weights "
                         f"{tuple(attention_weights.shape)} do not match (Bv,Q,M,L,P,2)/(Bv,Q,M,L,P)")
    if sampling_locations.shape[3] != len(shapes):
        raise ValueError(f"sampling_locations has {sampling_locations.shape[3]} levels, spatial_shapes {len(shapes)}")
    name = resolve_backend(backend, value.device)
    with torch.autocast(device_type=value.device.type, enabled=False):
        if name == "triton":
            return _triton_module().msda_triton(value, shapes, sampling_locations, attention_weights)
        if name == "mmcv":
            return msda_mmcv(value, shapes, sampling_locations, attention_weights, im2col_step)
        return msda_pytorch(value, shapes, sampling_locations, attention_weights)
