"""Deformable attention (all backends) and DCNv2 against independent float64 references."""
from __future__ import annotations

import pytest
import torch
from _student_refs import dcn_reference, msda_reference

from pop3d.model.backbone import ModulatedDeformConv2dPack
from pop3d.model.msda import msda_pytorch, multi_scale_deformable_attn, resolve_backend

SHAPES = [(5, 6), (3, 3), (2, 1)]


def _msda_inputs(dtype=torch.float64, bv=2, q=5, m=2, d=3, npt=3, seed=0, spread=0.7):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(bv, s, m, d, generator=g, dtype=dtype)
    # locations in [-spread, 1 + spread]: many samples partly or fully outside the map
    loc = torch.rand(bv, q, m, len(SHAPES), npt, 2, generator=g, dtype=dtype) * (1 + 2 * spread) - spread
    attn = torch.rand(bv, q, m, len(SHAPES), npt, generator=g, dtype=dtype)
    return value, loc, attn


def test_msda_pytorch_matches_kernel_formula_including_out_of_range():
    value, loc, attn = _msda_inputs(torch.float64)
    loc[0, 0, 0, 0, 0] = torch.tensor([-0.5, 0.5], dtype=torch.float64)  # entirely outside
    loc[0, 0, 0, 0, 1] = torch.tensor([1e6, -1e6], dtype=torch.float64)  # far outside (behind-camera-like)
    ref = msda_reference(value, SHAPES, loc, attn)
    out = msda_pytorch(value.float(), SHAPES, loc.float(), attn.float())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


def test_msda_dispatch_and_fp32_under_autocast():
    value, loc, attn = _msda_inputs(torch.float32)
    a = multi_scale_deformable_attn(value, SHAPES, loc, attn, backend="pytorch")
    b = multi_scale_deformable_attn(value, torch.tensor(SHAPES), loc, attn, backend="auto")
    torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = multi_scale_deformable_attn(value.bfloat16(), SHAPES, loc, attn, backend="pytorch")
    assert c.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown deformable-attention backend"):
        resolve_backend("cuda-magic", torch.device("cpu"))
    with pytest.raises(ValueError, match="spatial_shapes"):
        multi_scale_deformable_attn(value[:, :-1], SHAPES, loc, attn, backend="pytorch")


def test_msda_gradcheck_float64():
    value, loc, attn = _msda_inputs(torch.float64, bv=1, q=2, m=2, d=2, npt=2, seed=3, spread=0.2)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    attn.requires_grad_(True)

    def f(v, lc, a):
        # a float64 run of the same grid_sample formula (msda_pytorch casts to fp32, so inline it here)
        import torch.nn.functional as F
        bv, _, m, d = v.shape
        out, start = 0, 0
        for lvl, (h, w) in enumerate(SHAPES):
            v_l = v[:, start:start + h * w].permute(0, 2, 3, 1).reshape(bv * m, d, h, w)
            start += h * w
            g_l = (2 * lc[:, :, :, lvl] - 1).transpose(1, 2).flatten(0, 1)
            s_l = F.grid_sample(v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=False)
            out = out + (s_l * a[:, :, :, lvl].transpose(1, 2).reshape(bv * m, 1, lc.shape[1], -1)).sum(-1)
        return out

    assert torch.autograd.gradcheck(f, (value, loc, attn), eps=1e-6, atol=1e-5)
    # and the fp32 production path gives the same gradients as float64 up to fp32 precision
    v32, l32, a32 = (t.detach().float().requires_grad_(True) for t in (value, loc, attn))
    msda_pytorch(v32, SHAPES, l32, a32).sum().backward()
    f(value, loc, attn).sum().backward()
    for t32, t64 in ((v32, value), (l32, loc), (a32, attn)):
        torch.testing.assert_close(t32.grad.double(), t64.grad, atol=1e-4, rtol=1e-3)


def test_msda_mmcv_matches_pytorch():
    pytest.importorskip("mmcv.ops")
    value, loc, attn = _msda_inputs(torch.float32, bv=2, q=7, m=2, d=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    value, loc, attn = value.to(device), loc.to(device), attn.to(device)
    try:
        got = multi_scale_deformable_attn(value, SHAPES, loc, attn, backend="mmcv")
    except (RuntimeError, NotImplementedError) as exc:  # mmcv 1.x: CUDA-only kernel
        pytest.skip(f"mmcv kernel unavailable on {device}: {exc}")
    want = multi_scale_deformable_attn(value, SHAPES, loc, attn, backend="pytorch")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_dcn_matches_per_tap_bilinear_reference(stride, dilation):
    torch.manual_seed(stride * 10 + dilation)
    layer = ModulatedDeformConv2dPack(3, 4, 3, stride=stride, padding=dilation, dilation=dilation).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.conv_offset.weight.normal_(std=0.6)  # offsets of a few pixels, some samples leave the image
        layer.conv_offset.bias.normal_(std=1.0)
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    out = layer(x)
    o = layer.conv_offset(x)
    offset, mask = o[:, :18], torch.sigmoid(o[:, 18:])
    assert offset.abs().max() > 1.5
    ref = dcn_reference(x, layer.weight.detach(), offset.detach(), mask.detach(), stride=stride, padding=dilation, dilation=dilation)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)


def test_dcn_zero_offsets_is_plain_conv():
    layer = ModulatedDeformConv2dPack(3, 5, 3)
    x = torch.randn(2, 3, 8, 9)
    want = torch.nn.functional.conv2d(x, layer.weight, padding=1) * 0.5  # sigmoid(0) = 0.5 modulation
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_msda_matches_mmcv_pure_pytorch_reference():
    """mmcv's own pure-PyTorch MSDA (independent code, runs on CPU) against ours."""
    mmcv_msda = pytest.importorskip("mmcv.ops.multi_scale_deform_attn")
    value, loc, attn = _msda_inputs(torch.float64, bv=2, q=7, m=2, d=4)
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    want = mmcv_msda.multi_scale_deformable_attn_pytorch(value, shapes, loc, attn)
    got = multi_scale_deformable_attn(value.float(), SHAPES, loc.float(), attn.float(), backend="pytorch")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_dcn_matches_mmcv_modulated_deform_conv(stride, dilation):
    """Our torchvision-based DCNv2 against mmcv-full's ModulatedDeformConv2dPack with the same weights."""
    ops = pytest.importorskip("mmcv.ops")
    torch.manual_seed(7 + stride + dilation)
    ours = ModulatedDeformConv2dPack(4, 5, 3, stride=stride, padding=dilation, dilation=dilation)
    theirs = ops.ModulatedDeformConv2dPack(4, 5, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
    with torch.no_grad():
        ours.weight.normal_()
        ours.conv_offset.weight.normal_(std=0.5)
        ours.conv_offset.bias.normal_(std=1.0)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    x = torch.randn(2, 4, 9, 11)
    try:
        want = theirs(x)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"mmcv's modulated deform conv has no CPU kernel in this build: {exc}")
    torch.testing.assert_close(ours(x), want, atol=1e-4, rtol=1e-4)
