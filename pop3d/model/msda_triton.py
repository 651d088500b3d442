"""Fused multi-scale deformable attention in Triton (backend ``'triton'`` of :mod:`pop3d.model.msda`).

Same formula and out-of-range rule as mmcv's CUDA kernel (see :mod:`pop3d.model.msda`): for each
(b, q, m, l, p) the sample point is ``(x * W_l - 0.5, y * H_l - 0.5)``; it contributes only when
``-1 < h_im < H_l`` and ``-1 < w_im < W_l``, and then each of its 4 bilinear corners only when that corner
lies inside the map (zero padding per corner). Entry point for users and the GPU suite:
``multi_scale_deformable_attn(..., backend='triton')``; :func:`msda_triton` is the same without dispatch;
:func:`selfcheck` runs a numerical check on a device and returns the errors.

Kernels (one program per (query block, head, batch row); ``grid = (cdiv(Q, BLOCK_Q), M, Bv)``):

* forward: a (BLOCK_Q, BLOCK_D) fp32 accumulator; per (level, point) the locations and weights of the block's
  queries are loaded once and the 4 corners are gathered as rows of D contiguous channels (``value`` is
  (Bv, S, M, D), so a corner of one head is D contiguous elements: 64 B in bf16, 128 B in fp32 at D = 32);
* backward: the same walk with ``grad_out`` held in registers; per corner one reduction over D gives
  ``<grad_out, v>`` from which the gradients of the weight and of both coordinates follow without atomics
  (one program owns a (query, head)); ``grad_value`` is scattered with relaxed fp32 atomics into an fp32
  buffer (cast to the value dtype at the end), so its summation order, like mmcv's, is not deterministic.

Saved for backward: ``value`` (its own dtype), ``sampling_locations`` and ``attention_weights`` (fp32), and a
(L, 3) int32 level table: nothing per level, nothing of size Q*P*D.

Memory at the paper config (image cross-attention: Bv = 6 cameras, S = 30825 tokens of 4 levels
(116x200, 58x100, 29x50, 15x25), Q = 12431 rebatched queries, M = 8, D = 32, L = 4, P = 8; 3 layers), from
:func:`saved_bytes` (the formula is checked against autograd's saved tensors in ``tests/test_msda_triton.py``):

====================================  ===============  ===========
backend                               per layer        3 layers
====================================  ===============  ===========
pytorch (grid_sample), fp32           2.862 GB         8.59 GB
triton, fp32 value                    0.418 GB         1.25 GB
triton, bf16 value                    0.324 GB         0.97 GB
====================================  ===============  ===========

(the grid_sample path saves, per level, the level's value copy, the grid, the sampled (Bv*M, D, Q, P) tensor
and the weights; the HW-plane self-attention adds ~0.11 GB per layer there, ~0.02 GB here.)

Tuning notes. GPU timings are pending (no GPU was available when this was written; the GPU suite's
``fused_msda`` section and :func:`benchmark` time it, ``benchmark(block_q=[(64, 32), (32, 16), ...])`` sweeps
block sizes). What is known offline: the kernels compile for sm_90 (H100/H200) on a machine without a GPU
(``tests/test_msda_triton.py`` compiles them and runs ptxas), and at the paper's D = 32 with the default
blocks ptxas reports, per thread (4 warps):

========================  =========  ======  ========================================================
kernel                    registers  spills  memory instructions
========================  =========  ======  ========================================================
forward, bf16, BQ 64      70         0       value rows as 128-bit loads (8 bf16)
forward, fp32, BQ 32      70         0       value rows as 128-bit loads (4 fp32)
backward, bf16, BQ 32     80         0       128-bit loads, ``atom.add.v4.f32`` relaxed (4 fp32 per op)
backward, fp32, BQ 32     96         0       same
========================  =========  ======  ========================================================

Choices that matter: ``D`` is a compile-time constant and, when ``BLOCK_D == D``, the masks are constant
along D; without that the gathers fall back to one 16-bit load per element. The point loop is a runtime loop:
unrolling it (``tl.static_range``) made the compiler hoist all 32 gathers of a level (255 registers, ~1 KB of
spills). ``BLOCK_D = next_pow2(D)``: a program covers all channels of its head, which the backward's
in-program reductions need. Queries per program: :func:`block_q` (a 4 KB corner tile; fp32 forward at 64
queries took 138 registers, hence 32). Levels and points are a loop, corners unrolled.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

FWD_BLOCK_Q: int | None = None  # None: block_q() below; set an int to override (tuning sweeps)
BWD_BLOCK_Q: int | None = None
NUM_WARPS = 4
TILE_BYTES = 4096  # one (BLOCK_Q, BLOCK_D) corner tile: 64 x 32 bf16 values, 32 x 32 fp32


def block_q(block_d: int, elem_bytes: int, backward: bool) -> int:
    """Queries per program: a corner tile of TILE_BYTES (the backward's tiles are fp32 grad_out), in [16, 128].
    At D = 32: forward 64 (bf16) / 32 (fp32), backward 32."""
    override = BWD_BLOCK_Q if backward else FWD_BLOCK_Q
    if override is not None:
        return override
    return max(16, min(128, TILE_BYTES // (block_d * (4 if backward else elem_bytes))))


# --------------------------------------------------------------------------------------------------------
# Kernels (plain functions, wrapped by _kernels() as compiled or interpreted Triton functions)
# --------------------------------------------------------------------------------------------------------

def _msda_fwd(value_ptr, levels_ptr, loc_ptr, attn_ptr, out_ptr, S, Q, M, D: tl.constexpr,
              L: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = offs_q < Q
    d_mask = offs_d < D
    row = (b * Q + offs_q) * M + head  # (b, q, m) row of loc / attn / out, int64
    v_base = value_ptr + b * S * M * D + head * D
    acc = tl.full((BLOCK_Q, BLOCK_D), 0.0, tl.float32)
    for lvl in range(L):
        h_l = tl.load(levels_ptr + 3 * lvl)
        w_l = tl.load(levels_ptr + 3 * lvl + 1)
        start = tl.load(levels_ptr + 3 * lvl + 2)
        hf = h_l.to(tl.float32)
        wf = w_l.to(tl.float32)
        for pt in range(P):
            k = lvl * P + pt
            x = tl.load(loc_ptr + row * (2 * L * P) + 2 * k, mask=q_mask, other=0.0)
            y = tl.load(loc_ptr + row * (2 * L * P) + 2 * k + 1, mask=q_mask, other=0.0)
            a = tl.load(attn_ptr + row * (L * P) + k, mask=q_mask, other=0.0)
            w_im = x * wf - 0.5
            h_im = y * hf - 0.5
            inside = q_mask & (h_im > -1.0) & (w_im > -1.0) & (h_im < hf) & (w_im < wf)
            # clamp before the int conversion so far-away points cannot overflow (they are masked anyway)
            h_im = tl.minimum(tl.maximum(h_im, -2.0), hf + 1.0)
            w_im = tl.minimum(tl.maximum(w_im, -2.0), wf + 1.0)
            h0f = tl.floor(h_im)
            w0f = tl.floor(w_im)
            lh = h_im - h0f
            lw = w_im - w0f
            h0 = h0f.to(tl.int32)
            w0 = w0f.to(tl.int32)
            for c in tl.static_range(4):
                yy = h0 + (c // 2)
                xx = w0 + (c % 2)
                wy = lh if (c // 2) == 1 else 1.0 - lh
                wx = lw if (c % 2) == 1 else 1.0 - lw
                ok = inside & (yy >= 0) & (yy < h_l) & (xx >= 0) & (xx < w_l)
                tok = start + yy * w_l + xx
                if BLOCK_D == D:  # a mask constant along D keeps the row loads vectorised
                    mask2 = ok[:, None]
                else:
                    mask2 = ok[:, None] & d_mask[None, :]
                v = tl.load(v_base + tok[:, None] * (M * D) + offs_d[None, :], mask=mask2, other=0.0)
                acc += (a * wy * wx)[:, None] * v.to(tl.float32)
    if BLOCK_D == D:
        out_mask = q_mask[:, None]
    else:
        out_mask = q_mask[:, None] & d_mask[None, :]
    tl.store(out_ptr + row[:, None] * D + offs_d[None, :], acc, mask=out_mask)


def _msda_bwd(value_ptr, levels_ptr, loc_ptr, attn_ptr, grad_out_ptr, grad_value_ptr, grad_loc_ptr,
              grad_attn_ptr, S, Q, M, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr,
              BLOCK_D: tl.constexpr, GRAD_VALUE: tl.constexpr):
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = offs_q < Q
    d_mask = offs_d < D
    row = (b * Q + offs_q) * M + head
    v_base = value_ptr + b * S * M * D + head * D
    gv_base = grad_value_ptr + b * S * M * D + head * D
    if BLOCK_D == D:
        g_mask = q_mask[:, None]
    else:
        g_mask = q_mask[:, None] & d_mask[None, :]
    g = tl.load(grad_out_ptr + row[:, None] * D + offs_d[None, :], mask=g_mask, other=0.0).to(tl.float32)
    for lvl in range(L):
        h_l = tl.load(levels_ptr + 3 * lvl)
        w_l = tl.load(levels_ptr + 3 * lvl + 1)
        start = tl.load(levels_ptr + 3 * lvl + 2)
        hf = h_l.to(tl.float32)
        wf = w_l.to(tl.float32)
        for pt in range(P):
            k = lvl * P + pt
            x = tl.load(loc_ptr + row * (2 * L * P) + 2 * k, mask=q_mask, other=0.0)
            y = tl.load(loc_ptr + row * (2 * L * P) + 2 * k + 1, mask=q_mask, other=0.0)
            a = tl.load(attn_ptr + row * (L * P) + k, mask=q_mask, other=0.0)
            w_im = x * wf - 0.5
            h_im = y * hf - 0.5
            inside = q_mask & (h_im > -1.0) & (w_im > -1.0) & (h_im < hf) & (w_im < wf)
            h_im = tl.minimum(tl.maximum(h_im, -2.0), hf + 1.0)
            w_im = tl.minimum(tl.maximum(w_im, -2.0), wf + 1.0)
            h0f = tl.floor(h_im)
            w0f = tl.floor(w_im)
            lh = h_im - h0f
            lw = w_im - w0f
            h0 = h0f.to(tl.int32)
            w0 = w0f.to(tl.int32)
            dot_s = tl.full((BLOCK_Q,), 0.0, tl.float32)  # <g, sample>
            dot_h = tl.full((BLOCK_Q,), 0.0, tl.float32)  # <g, d sample / d h_im>
            dot_w = tl.full((BLOCK_Q,), 0.0, tl.float32)  # <g, d sample / d w_im>
            for c in tl.static_range(4):
                yy = h0 + (c // 2)
                xx = w0 + (c % 2)
                wy = lh if (c // 2) == 1 else 1.0 - lh
                wx = lw if (c % 2) == 1 else 1.0 - lw
                sy = 1.0 if (c // 2) == 1 else -1.0  # d wy / d h_im
                sx = 1.0 if (c % 2) == 1 else -1.0  # d wx / d w_im
                ok = inside & (yy >= 0) & (yy < h_l) & (xx >= 0) & (xx < w_l)
                tok = start + yy * w_l + xx
                if BLOCK_D == D:
                    mask2 = ok[:, None]
                else:
                    mask2 = ok[:, None] & d_mask[None, :]
                v = tl.load(v_base + tok[:, None] * (M * D) + offs_d[None, :], mask=mask2,
                            other=0.0).to(tl.float32)
                gv = tl.reduce(g * v, 1, tl.standard._sum_combine)  # = tl.sum(g * v, 1), see _kernels
                dot_s += wy * wx * gv
                dot_h += sy * wx * gv
                dot_w += sx * wy * gv
                if GRAD_VALUE:
                    tl.atomic_add(gv_base + tok[:, None] * (M * D) + offs_d[None, :], (a * wy * wx)[:, None] * g,
                                  mask=mask2, sem="relaxed")
            tl.store(grad_attn_ptr + row * (L * P) + k, dot_s, mask=q_mask)
            tl.store(grad_loc_ptr + row * (2 * L * P) + 2 * k, a * wf * dot_w, mask=q_mask)
            tl.store(grad_loc_ptr + row * (2 * L * P) + 2 * k + 1, a * hf * dot_h, mask=q_mask)


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """(forward, backward) as Triton's interpreter functions (CPU tensors, tests) or compiled kernels.

    Built on first use rather than at import, so TRITON_INTERPRET set by one test (or unset afterwards)
    decides per call and never changes kernels another caller already uses. For that the kernels call no
    ``@triton.jit`` helper of ``triton.language`` (those are compiled or interpreted once, when triton is
    imported): ``tl.full`` instead of ``tl.zeros`` and ``tl.reduce(x, 1, tl.standard._sum_combine)``, which is
    ``tl.sum``'s own body for fp32 and which the interpreter recognises by identity and runs as ``np.sum``.
    """
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_msda_fwd), InterpretedFunction(_msda_bwd)
    return triton.jit(_msda_fwd), triton.jit(_msda_bwd)


def _kernels_for(device: torch.device):
    interpret = _interpret_env()
    if device.type == "cpu" and not interpret:
        raise RuntimeError("deformable-attention backend 'triton' needs CUDA tensors; CPU tensors run only "
                           "under Triton's interpreter (TRITON_INTERPRET=1, for tests); use backend='pytorch'")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"deformable-attention backend 'triton' supports CUDA tensors, got {device.type}")
    return _kernels(interpret)


_LEVEL_TABLES: dict = {}


def level_table(spatial_shapes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(L, 3) int32 [H_l, W_l, level_start_index] on ``device``, cached per (shapes, device) so repeated
    calls make no host-to-device copy."""
    key = (tuple((int(h), int(w)) for h, w in spatial_shapes), str(device))
    table = _LEVEL_TABLES.get(key)
    if table is None:
        rows, start = [], 0
        for h, w in key[0]:
            rows.append((h, w, start))
            start += h * w
        table = torch.tensor(rows, dtype=torch.int32).to(device)
        _LEVEL_TABLES[key] = table
    return table


def _grid(q: int, m: int, bv: int, block_q: int):
    return (triton.cdiv(q, block_q), m, bv)


class MSDATritonFunction(torch.autograd.Function):
    """value (Bv,S,M,D) fp32/bf16/fp16, levels (L,3) int32, loc (Bv,Q,M,L,P,2) fp32, attn (Bv,Q,M,L,P) fp32
    -> (Bv,Q,M*D) fp32. Gradients for value (its dtype), loc and attn (fp32)."""

    @staticmethod
    def forward(ctx, value, levels, loc, attn):
        bv, s, m, d = value.shape
        q, n_lvl, n_pt = loc.shape[1], loc.shape[3], loc.shape[4]
        fwd, _ = _kernels_for(value.device)
        out = torch.empty(bv, q, m, d, dtype=torch.float32, device=value.device)
        block_d = triton.next_power_of_2(d)
        bq = block_q(block_d, value.element_size(), backward=False)
        ctx.save_for_backward(value, levels, loc, attn)
        if out.numel() == 0:  # no queries (or batch rows): nothing to launch
            return out.view(bv, q, m * d)
        fwd[_grid(q, m, bv, bq)](value, levels, loc, attn, out, s, q, m, D=d, L=n_lvl, P=n_pt, BLOCK_Q=bq,
                                 BLOCK_D=block_d, num_warps=NUM_WARPS)
        return out.view(bv, q, m * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, levels, loc, attn = ctx.saved_tensors
        bv, s, m, d = value.shape
        q, n_lvl, n_pt = loc.shape[1], loc.shape[3], loc.shape[4]
        _, bwd = _kernels_for(value.device)
        grad_out = grad_out.contiguous()
        need_value = ctx.needs_input_grad[0]
        # fp32 atomics target; a 1-element dummy when value needs no gradient
        grad_value = torch.zeros((bv, s, m, d) if need_value else (1,), dtype=torch.float32, device=value.device)
        grad_loc = torch.empty_like(loc)
        grad_attn = torch.empty_like(attn)
        block_d = triton.next_power_of_2(d)
        bq = block_q(block_d, value.element_size(), backward=True)
        if grad_out.numel() == 0:
            return grad_value.to(value.dtype) if need_value else None, None, grad_loc.zero_(), grad_attn.zero_()
        bwd[_grid(q, m, bv, bq)](value, levels, loc, attn, grad_out, grad_value, grad_loc, grad_attn, s, q, m,
                                 D=d, L=n_lvl, P=n_pt, BLOCK_Q=bq, BLOCK_D=block_d, GRAD_VALUE=need_value,
                                 num_warps=NUM_WARPS)
        grad_value = grad_value.to(value.dtype) if need_value else None
        return grad_value, None, grad_loc, grad_attn


def msda_triton(value: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Fused kernel. Same shapes as :func:`pop3d.model.msda.msda_pytorch`; value keeps its dtype when it is
    fp32/bf16/fp16 (accumulation in fp32), locations and weights are used in fp32. Returns (Bv, Q, M*D) fp32."""
    _, s, m, d = value.shape
    if s * m * d >= 2 ** 31:
        raise ValueError(f"value has {s * m * d} elements per batch row; the kernel indexes them in int32")
    if value.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        value = value.float()
    levels = level_table(spatial_shapes, value.device)
    loc = sampling_locations.to(torch.float32).contiguous()
    attn = attention_weights.to(torch.float32).contiguous()
    return MSDATritonFunction.apply(value.contiguous(), levels, loc, attn)


# --------------------------------------------------------------------------------------------------------
# Memory accounting, self-check and timing (for the GPU suite)
# --------------------------------------------------------------------------------------------------------

def saved_bytes(backend: str, bv: int, q: int, m: int, d: int, spatial_shapes: Sequence[tuple[int, int]],
                n_points: int, value_bytes: int = 4) -> int:
    """Bytes one call saves for backward. ``'pytorch'``: per level the (Bv*M, D, H_l, W_l) fp32 value copy,
    the (Bv*M, Q, P, 2) grid, the (Bv*M, D, Q, P) sample and the (Bv*M, 1, Q, P) weights; ``'triton'``: value
    (``value_bytes`` per element), fp32 locations and weights, the (L, 3) int32 level table."""
    n_lvl = len(spatial_shapes)
    s = sum(h * w for h, w in spatial_shapes)
    if backend == "pytorch":
        return 4 * (bv * m * d * s + n_lvl * bv * m * q * n_points * (2 + d + 1))
    if backend == "triton":
        return value_bytes * bv * s * m * d + 4 * bv * q * m * n_lvl * n_points * 3 + 4 * 3 * n_lvl
    raise ValueError(f"saved_bytes: unknown backend {backend!r}")


def compare(value: torch.Tensor, spatial_shapes, sampling_locations: torch.Tensor,
            attention_weights: torch.Tensor, grad: torch.Tensor | None = None) -> dict:
    """The triton backend against the float64 grid_sample formula on the same inputs (synthetic ones, or a
    real layer's: the GPU suite's check). Returns the max abs error of the output and of the three gradients,
    each divided by the reference's max magnitude: ``{"out", "grad_value", "grad_loc", "grad_attn"}``."""
    from .msda import _shapes_list, msda_pytorch
    shapes = _shapes_list(spatial_shapes)
    if grad is None:
        g = torch.Generator(device="cpu").manual_seed(0)
        grad = torch.randn(value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3], generator=g)
    grad = grad.to(value.device)
    ref64 = functools.partial(msda_pytorch, compute_dtype=torch.float64)
    results = []
    for fn, cast in ((msda_triton, lambda t: t), (ref64, torch.Tensor.double)):
        ins = [cast(t.detach()).requires_grad_(True) for t in (value, sampling_locations, attention_weights)]
        out = fn(ins[0], shapes, ins[1], ins[2])
        out.backward(cast(grad.float()))
        results.append([out.detach()] + [t.grad for t in ins])
    errs = {}
    for name, got, ref in zip(("out", "grad_value", "grad_loc", "grad_attn"), *results):
        errs[name] = float((got.double() - ref).abs().max()) / float(ref.abs().max().clamp(min=1e-12))
    return errs


def selfcheck(device: str | torch.device = "cuda", dtype: torch.dtype = torch.float32) -> dict:
    """:func:`compare` on synthetic inputs on ``device`` with many points off the maps, odd level sizes and
    D = 32 (unmasked rows) and D = 20 (masked). Returns ``{"d32": errs, "d20": errs, "ok": bool}``; ok means
    every relative error <= 1e-4, except grad_value of a bf16/fp16 value (rounded to it): <= 1e-2."""
    shapes = [(7, 5), (3, 11), (1, 1)]
    g = torch.Generator(device="cpu").manual_seed(0)
    s = sum(h * w for h, w in shapes)
    report, ok = {}, True
    for d in (32, 20):
        value = torch.randn(1, s, 2, d, generator=g).to(device, dtype)
        loc = (torch.rand(1, 37, 2, len(shapes), 2, 2, generator=g) * 1.6 - 0.3).to(device)
        attn = torch.rand(1, 37, 2, len(shapes), 2, generator=g).to(device)
        errs = compare(value, shapes, loc, attn)
        tol_v = 1e-4 if dtype == torch.float32 else 1e-2
        ok = ok and all(e <= (tol_v if k == "grad_value" else 1e-4) for k, e in errs.items())
        report[f"d{d}"] = errs
    report["ok"] = ok
    return report


def _time_ms(fn, device: torch.device, iters: int) -> float:
    if device.type == "cuda":
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(iters):
            fn()
        t1.record()
        torch.cuda.synchronize(device)
        return t0.elapsed_time(t1) / iters
    import time
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) * 1e3 / iters


def benchmark(device: str | torch.device = "cuda", bv: int = 6, q: int = 12431, m: int = 8, d: int = 32,
              n_points: int = 8, shapes=((116, 200), (58, 100), (29, 50), (15, 25)),
              dtype: torch.dtype = torch.bfloat16, backends=("pytorch", "triton"), iters: int = 10,
              block_q: Sequence[tuple[int, int]] = ()) -> dict:
    """Per backend: forward ms (autograd on) and forward+backward ms (CUDA events; perf_counter on CPU), peak
    memory above the inputs (CUDA only, else None) and :func:`saved_bytes`. Defaults: one layer's image
    cross-attention at the paper config. ``block_q`` adds triton runs with those (FWD_BLOCK_Q, BWD_BLOCK_Q).
    On CPU the triton runs need TRITON_INTERPRET=1; without it they are reported as skipped, with the reason."""
    from .msda import multi_scale_deformable_attn
    global FWD_BLOCK_Q, BWD_BLOCK_Q
    device = torch.device(device)
    shapes = [tuple(hw) for hw in shapes]
    g = torch.Generator(device="cpu").manual_seed(0)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(bv, s, m, d, generator=g).to(device, dtype).requires_grad_(True)
    loc = (torch.rand(bv, q, m, len(shapes), n_points, 2, generator=g) * 1.2 - 0.1).to(device).requires_grad_(True)
    attn = torch.rand(bv, q, m, len(shapes), n_points, generator=g).to(device).requires_grad_(True)
    results = {}
    for name, bq in [(b, None) for b in backends] + [("triton", tuple(bq)) for bq in block_q]:
        key = name if bq is None else f"triton_bq{bq[0]}_{bq[1]}"
        if name == "triton" and device.type == "cpu" and not _interpret_env():
            results[key] = {"skipped": "triton on CPU runs only under TRITON_INTERPRET=1"}
            continue
        saved = (FWD_BLOCK_Q, BWD_BLOCK_Q)
        if bq is not None:
            FWD_BLOCK_Q, BWD_BLOCK_Q = bq

        def fwd(name=name):
            return multi_scale_deformable_attn(value, shapes, loc, attn, backend=name)

        def step():
            value.grad = loc.grad = attn.grad = None
            fwd().sum().backward()

        try:
            step()  # compile + warm up
            step()
            peak = None
            if device.type == "cuda":
                value.grad = loc.grad = attn.grad = None
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                step()
                torch.cuda.synchronize(device)
                peak = (torch.cuda.max_memory_allocated(device) - base) / 1e9
            results[key] = {"fwd_ms": _time_ms(fwd, device, iters), "fwd_bwd_ms": _time_ms(step, device, iters),
                            "peak_extra_gb": peak,
                            "saved_gb": saved_bytes(name, bv, q, m, d, shapes, n_points, value.element_size()) / 1e9
                            if name in ("pytorch", "triton") else None}
        finally:
            FWD_BLOCK_Q, BWD_BLOCK_Q = saved
    return results
