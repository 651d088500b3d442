"""The fused Triton deformable attention (backend 'triton'), run on CPU through Triton's interpreter.

Oracle: a float64 autograd implementation of mmcv's CUDA-kernel formula written here with gathers (no
grid_sample, no Triton), itself checked against the loop reference of ``_student_refs`` (forward) and by
finite differences (gradients). TRITON_INTERPRET=1 is set per test with monkeypatch; the kernels read it per
call, so other tests in the same process never see it (checked below).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed (it ships with torch's CUDA wheels on Linux)")

from _student_refs import micro_config, msda_reference, random_rig

from pop3d.model import TPVFormer
from pop3d.model import msda_triton as mt
from pop3d.model.msda import multi_scale_deformable_attn, resolve_backend

#: set for the whole process (``TRITON_INTERPRET=1 pytest``): triton.language is then interpreted everywhere
INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET", "0") == "1"
ODD = [(7, 5), (3, 11), (4, 8), (1, 1)]  # odd sizes, a dyadic level (exact edges) and a 1x1 level


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def ref_autograd(value, shapes, loc, attn):
    """float64 CUDA-kernel formula, differentiable in value, loc and attn. Same shapes as the backends."""
    bv, _, m, d = value.shape
    q = loc.shape[1]
    out = value.new_zeros(bv, q, m, loc.shape[4], d)
    b_idx = torch.arange(bv)[:, None, None, None]
    h_idx = torch.arange(m)[None, None, :, None]
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w]
        start += h * w
        x = loc[:, :, :, lvl, :, 0] * w - 0.5  # (Bv, Q, M, P)
        y = loc[:, :, :, lvl, :, 1] * h - 0.5
        inside = (x > -1) & (y > -1) & (x < w) & (y < h)
        x0, y0 = torch.floor(x.detach()), torch.floor(y.detach())
        lx, ly = x - x0, y - y0
        for dy in (0, 1):
            for dx in (0, 1):
                yy, xx = y0 + dy, x0 + dx
                ok = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                tok = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long()
                wt = (ly if dy else 1 - ly) * (lx if dx else 1 - lx) * ok
                out = out + (attn[:, :, :, lvl] * wt)[..., None] * v[b_idx, tok, h_idx]
    return out.sum(3).reshape(bv, q, m * d)


def make_inputs(bv=2, q=5, m=2, d=3, npt=3, shapes=ODD, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(bv, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(bv, q, m, len(shapes), npt, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread
    attn = torch.rand(bv, q, m, len(shapes), npt, generator=g, dtype=torch.float64)
    if q >= 2 and len(shapes) >= 3 and npt >= 3:  # exact edges of level 2 (4 x 8): w_im = -1, = W, just inside
        loc[0, 0, 0, 2, 0] = torch.tensor([-1 / 16, 0.5])
        loc[0, 0, 0, 2, 1] = torch.tensor([1 + 1 / 16, 0.5])
        loc[0, 0, 0, 2, 2] = torch.tensor([-1 / 16 + 2 ** -10, 1 + 1 / 8 - 2 ** -10])
        loc[0, 1, 0, 0, 0] = torch.tensor([1e6, -1e6])  # far away (behind-camera-like)
        loc[0, 1, 0, 0, 1] = torch.tensor([-3e4, 0.5])
    return value, loc, attn


def run(fn, value, loc, attn, shapes, grad, needs=(True, True, True)):
    ins = [t.detach().clone().requires_grad_(n) for t, n in zip((value, loc, attn), needs)]
    out = fn(ins[0], shapes, ins[1], ins[2])
    out.backward(grad)
    return out.detach(), [t.grad for t in ins]


def test_reference_matches_loop_reference_and_finite_differences():
    value, loc, attn = make_inputs(bv=1, q=3, m=2, d=2, npt=3, seed=1)
    torch.testing.assert_close(ref_autograd(value, ODD, loc, attn), msda_reference(value, ODD, loc, attn),
                               atol=1e-12, rtol=1e-12)
    value, loc, attn = make_inputs(bv=1, q=2, m=1, d=2, npt=2, shapes=ODD[:2], seed=2, spread=0.2)
    ins = [t.requires_grad_(True) for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(lambda v, lc, a: ref_autograd(v, ODD[:2], lc, a), ins, eps=1e-7, atol=1e-6)


def test_forward_and_gradients_fp32_against_float64(interpret):
    value, loc, attn = make_inputs(bv=2, q=5, m=2, d=3, npt=3)
    grad = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want, want_g = run(ref_autograd, value, loc, attn, ODD, grad)
    got, got_g = run(mt.msda_triton, value.float(), loc.float(), attn.float(), ODD, grad.float())
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (want[0, 0, :3] != 0).all() and (want_g[1][0, 0, 0, 2, :2] == 0).all()  # edge points: out, no grad
    assert (want_g[1][0, 0, 0, 2, 2] != 0).all() and (want_g[1][0, 1, 0, 0, :2] == 0).all()
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    for name, g, w in zip(("value", "loc", "attn"), got_g, want_g):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-5, msg=f"grad of {name}")


def test_bf16_value_within_bf16_rounding(interpret):
    """Inputs are the bf16 values themselves, so out / grad loc / grad attn are fp32-exact; only grad value
    is rounded to bf16 (relative error <= 2**-9 per element, allowed 2**-8 plus fp32 accumulation)."""
    value, loc, attn = make_inputs(bv=1, q=6, m=1, d=8, npt=3, seed=3)
    v16 = value.bfloat16()
    grad = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want, want_g = run(ref_autograd, v16.double(), loc, attn, ODD, grad)
    got, got_g = run(mt.msda_triton, v16, loc.float(), attn.float(), ODD, grad.float())
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    assert got_g[0].dtype == torch.bfloat16
    err = (got_g[0].double() - want_g[0]).abs()
    assert (err <= 2 ** -8 * want_g[0].abs() + 1e-6).all(), float(err.max())
    assert err.max() > 0  # it really was rounded (the check above is not vacuous)
    for g, w in zip(got_g[1:], want_g[1:]):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-5)


def test_single_query_many_heads_levels_points_odd_channels(interpret):
    """Q = 1 (a block of 64 with 63 masked rows), D = 5 (BLOCK_D 8 with masked channels), 3 heads, 4 levels,
    2 points; and a Q = 70 run that spans two forward blocks and three backward blocks."""
    for bv, q, m, d, npt in ((1, 1, 3, 5, 2), (1, 70, 1, 2, 1)):
        value, loc, attn = make_inputs(bv=bv, q=q, m=m, d=d, npt=npt, seed=q)
        grad = torch.randn(bv, q, m * d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        want, want_g = run(ref_autograd, value, loc, attn, ODD, grad)
        got, got_g = run(mt.msda_triton, value.float(), loc.float(), attn.float(), ODD, grad.float())
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
        for g, w in zip(got_g, want_g):
            torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-5)
    value, loc, attn = (t.float() for t in make_inputs(bv=1, q=0, m=2, d=3, npt=1))  # no query at all
    out, grads = run(mt.msda_triton, value, loc, attn, ODD, torch.zeros(1, 0, 6))
    assert out.shape == (1, 0, 6) and grads[0].shape == value.shape and not grads[0].any()


def test_value_without_grad_skips_atomics(interpret):
    value, loc, attn = make_inputs(bv=1, q=4, m=2, d=3, npt=2, seed=9)
    grad = torch.ones(1, 4, 6, dtype=torch.float64)
    _, want_g = run(ref_autograd, value, loc, attn, ODD, grad)
    _, got_g = run(mt.msda_triton, value.float(), loc.float(), attn.float(), ODD, grad.float(),
                   needs=(False, True, True))
    assert got_g[0] is None
    torch.testing.assert_close(got_g[1].double(), want_g[1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_g[2].double(), want_g[2], atol=2e-5, rtol=1e-5)


def test_triton_backend_matches_pytorch_backend_through_dispatch(interpret):
    value, loc, attn = (t.float() for t in make_inputs(bv=2, q=7, m=2, d=4, npt=2, seed=4))
    shapes = torch.tensor(ODD)
    grad = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(8))
    outs = {}
    for backend in ("pytorch", "triton"):
        fn = lambda v, s, lc, a, b=backend: multi_scale_deformable_attn(v, s, lc, a, backend=b)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the dispatcher turns autocast off: still fp32
            outs[backend] = run(fn, value, loc, attn, shapes, grad)
    assert outs["triton"][0].dtype == torch.float32
    torch.testing.assert_close(outs["triton"][0], outs["pytorch"][0], atol=1e-5, rtol=1e-5)
    for g, w in zip(outs["triton"][1], outs["pytorch"][1]):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_backend_selection_and_cpu_refusal(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "pytorch"  # 'auto' picks triton on CUDA only
    assert resolve_backend("triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    value, loc, attn = (t.float() for t in make_inputs(bv=1, q=2, m=1, d=2, npt=1))
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        multi_scale_deformable_attn(value, ODD, loc, attn, backend="triton")
    assert micro_config(attention_backend="triton").attention_backend == "triton"


def test_selfcheck_and_benchmark_entry_points_for_the_gpu_suite(interpret, monkeypatch):
    """What benchmarks/gpu_suite.py calls, run here on CPU: selfcheck passes (bf16 values; fp32 is covered
    above) and benchmark reports both backends; without the interpreter the CPU triton run is reported as
    skipped, not dropped."""
    report = mt.selfcheck("cpu", torch.bfloat16)
    assert report["ok"], report
    assert report["d32"]["out"] < 1e-5 and set(report["d20"]) == {"out", "grad_value", "grad_loc", "grad_attn"}
    tiny = {"bv": 1, "q": 3, "m": 1, "d": 4, "n_points": 1, "shapes": [(3, 3)], "iters": 1}
    res = mt.benchmark("cpu", **tiny)
    assert res["pytorch"]["fwd_bwd_ms"] > 0 and res["triton"]["fwd_bwd_ms"] > 0
    assert res["triton"]["saved_gb"] < res["pytorch"]["saved_gb"]
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in mt.benchmark("cpu", **tiny, backends=("triton",))["triton"]["skipped"]


def test_interpreter_env_does_not_leak(interpret):
    """The kernels are chosen per call: under the env var the interpreter runs them; without it, the same
    process still builds ordinary compiled kernels and other triton.jit functions are not interpreted."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    assert all(isinstance(k, InterpretedFunction) for k in mt._kernels(True))
    os.environ.pop("TRITON_INTERPRET")  # monkeypatch restores and then removes it after the test
    assert all(isinstance(k, JITFunction) for k in mt._kernels(False))
    assert not mt._interpret_env()

    def other_kernel(x_ptr):
        pass

    assert isinstance(triton.jit(other_kernel), JITFunction)
    if not INTERPRET_AT_START:
        assert isinstance(triton.language.sum, JITFunction)


def test_saved_tensors_match_memory_formula(interpret):
    """What autograd keeps for backward (unique storages seen by saved_tensors_hooks) equals saved_bytes()
    for both backends, so the paper-config numbers in msda_triton's docstring come from a checked formula."""
    bv, q, m, d, npt = 2, 5, 2, 3, 3
    value, loc, attn = make_inputs(bv=bv, q=q, m=m, d=d, npt=npt)
    for backend, vdtype in (("pytorch", torch.float32), ("triton", torch.float32), ("triton", torch.bfloat16)):
        ins = [value.to(vdtype).requires_grad_(True), loc.float().requires_grad_(True),
               attn.float().requires_grad_(True)]
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            multi_scale_deformable_attn(ins[0], ODD, ins[1], ins[2], backend=backend)
        want = mt.saved_bytes(backend, bv, q, m, d, ODD, npt, value_bytes=ins[0].element_size())
        assert sum(storages.values()) == want, (backend, vdtype)
    paper = {"bv": 6, "q": 12431, "m": 8, "d": 32, "n_points": 8,
             "spatial_shapes": [(116, 200), (58, 100), (29, 50), (15, 25)]}
    assert math.isclose(mt.saved_bytes("pytorch", **paper) / 1e9, 2.862, abs_tol=1e-3)
    assert math.isclose(mt.saved_bytes("triton", **paper) / 1e9, 0.418, abs_tol=1e-3)
    assert math.isclose(mt.saved_bytes("triton", **paper, value_bytes=2) / 1e9, 0.324, abs_tol=1e-3)


def test_student_forward_backward_same_with_triton_backend(interpret):
    """The whole micro student (cross-view and image cross-attention layers) with backend 'triton' gives the
    'pytorch' backend's outputs and parameter gradients."""
    cfg = micro_config(attention_backend="pytorch", dropout=0.0, grid_mask=False, tpv_h=4, tpv_w=4, tpv_z=2,
                       levels=3, num_heads=2, num_cams=2, num_points_in_pillar=(2, 2, 2), num_points=(2, 2, 2),
                       cvha_num_points=2, base_channels=2)
    torch.manual_seed(0)
    model = TPVFormer(cfg).train()
    with torch.no_grad():
        for n, p in model.tpv_head.named_parameters():
            if "sampling_offsets.weight" in n:
                p.normal_(std=0.05)
    imgs = torch.randn(1, cfg.num_cams, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    l2i = random_rig(1, cfg.num_cams, 32, 64, 0)
    results = {}
    for backend in ("pytorch", "triton"):
        model.zero_grad()
        model.set_attention_backend(backend)
        out = model(imgs, l2i, voxel_features=True)
        out.logits_vox.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.tpv_head.named_parameters() if p.grad is not None}
        results[backend] = (out.logits_vox.detach(), grads)
    torch.testing.assert_close(results["triton"][0], results["pytorch"][0], atol=1e-5, rtol=1e-4)
    assert any("deformable_attention.value_proj" in n for n in results["pytorch"][1])
    for n, g in results["pytorch"][1].items():
        torch.testing.assert_close(results["triton"][1][n], g, atol=1e-5, rtol=1e-3, msg=n)


def _compile_sm90(fn, signature, constexprs, workdir: Path):
    """Compile one kernel for an H100/H200 (sm_90) without a GPU and return (ptx, ptxas -v report).
    Pointer arguments get the 16-byte alignment the launcher specialises real tensors with."""
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    src = compiler.ASTSource(triton.jit(fn), signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": mt.NUM_WARPS})
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ptx = kernel.asm["ptx"]
    path = workdir / f"{fn.__name__}.ptx"
    path.write_text(ptx)
    rep = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path), "-o", str(path.with_suffix(".cubin"))],
                         capture_output=True, text=True, check=True)
    return ptx, rep.stdout + rep.stderr


def test_gpu_kernels_compile_for_sm90_vectorised_without_spills(tmp_path):
    """The compiled path (never run here: no GPU) at the paper's D = 32, L = 4, P = 8 with bf16 values:
    Triton lowers it for sm_90, ptxas accepts it with no register spills, and the value rows are read with
    128-bit loads and the value gradient is scattered with vector fp32 atomics."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton without its NVIDIA backend (ptxas)")
    if INTERPRET_AT_START:
        pytest.skip("TRITON_INTERPRET=1 for the whole process: triton.jit gives interpreter functions")
    common = {"S": "i32", "Q": "i32", "M": "i32", "D": "constexpr", "L": "constexpr", "P": "constexpr",
              "BLOCK_Q": "constexpr", "BLOCK_D": "constexpr"}
    sizes = {"D": 32, "L": 4, "P": 8, "BLOCK_D": 32}
    fwd_sig = {"value_ptr": "*bf16", "levels_ptr": "*i32", "loc_ptr": "*fp32", "attn_ptr": "*fp32",
               "out_ptr": "*fp32", **common}
    bwd_sig = {"value_ptr": "*bf16", "levels_ptr": "*i32", "loc_ptr": "*fp32", "attn_ptr": "*fp32",
               "grad_out_ptr": "*fp32", "grad_value_ptr": "*fp32", "grad_loc_ptr": "*fp32",
               "grad_attn_ptr": "*fp32", **common, "GRAD_VALUE": "constexpr"}
    fwd_ptx, fwd_rep = _compile_sm90(mt._msda_fwd, fwd_sig, {**sizes, "BLOCK_Q": mt.block_q(32, 2, False)},
                                    tmp_path)
    bwd_ptx, bwd_rep = _compile_sm90(mt._msda_bwd, bwd_sig, {**sizes, "BLOCK_Q": mt.block_q(32, 2, True),
                                                             "GRAD_VALUE": True}, tmp_path)
    for rep in (fwd_rep, bwd_rep):
        assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", rep), rep
    assert "ld.global.v4.b32" in fwd_ptx and "ld.global.b16" not in fwd_ptx
    assert "atom.global.gpu.relaxed.add.v4.f32" in bwd_ptx
