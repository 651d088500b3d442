"""MaskCLIP ViT dense path vs an independent float64 computation from open_clip's own blocks."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from teacher.vit import MaskClipViT, build_maskclip_vit

SMALL = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": 3, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def reference_dense(visual, x: torch.Tensor) -> torch.Tensor:
    """float64 MaskCLIP v-path written out from the weights (teacher.md §3.2, §6)."""
    visual = visual.double()
    x = x.double()
    p = visual.conv1.kernel_size[0]
    n, _, h, w = x.shape
    gh, gw = math.ceil(h / p), math.ceil(w / p)
    x = F.pad(x, (0, gw * p - w, 0, gh * p - h))
    tok = F.conv2d(x, visual.conv1.weight, stride=p).flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    g = math.isqrt(pos.shape[0] - 1)
    grid = F.interpolate(pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic",
                         align_corners=False, antialias=False).permute(0, 2, 3, 1).reshape(gh * gw, -1)
    tok = torch.cat([visual.class_embedding.expand(n, 1, -1), tok], 1) + torch.cat([pos[:1], grid])[None]

    def ln(t, mod):
        return F.layer_norm(t, t.shape[-1:], mod.weight, mod.bias, 1e-6)

    tok = ln(tok, visual.ln_pre)
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        for m in blk.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = 1e-6
        tok = blk(tok)                                   # open_clip's own block (GELU, eps set to 1e-6)
    last = blocks[-1]
    d = tok.shape[-1]
    y = ln(tok, last.ln_1)
    v = y @ last.attn.in_proj_weight[2 * d:].t() + last.attn.in_proj_bias[2 * d:]
    tok = tok + (v @ last.attn.out_proj.weight.t() + last.attn.out_proj.bias)
    hdn = F.gelu(ln(tok, last.ln_2) @ last.mlp.c_fc.weight.t() + last.mlp.c_fc.bias)
    tok = tok + hdn @ last.mlp.c_proj.weight.t() + last.mlp.c_proj.bias
    out = ln(tok, visual.ln_post)[:, 1:] @ visual.proj
    return out.transpose(1, 2).reshape(n, -1, gh, gw)


def test_vit_dense_path_matches_float64_reference():
    torch.manual_seed(0)
    model = build_maskclip_vit(None, model_cfg=SMALL)
    x = torch.randn(2, 3, 50, 90)                          # not a multiple of 16 -> corner padding, grid 4x6
    with torch.no_grad():
        got = model(x)
        ref = reference_dense(copy.deepcopy(model.visual), x)
    assert got.shape == (2, 24, 4, 6)
    assert (got.double() - ref).abs().max() < 1e-4


def test_vit_b16_random_real_layout_small_input():
    torch.manual_seed(0)
    model = build_maskclip_vit(None)                       # open_clip ViT-B-16 config, random init
    keys = set(model.visual.state_dict())
    assert "conv1.weight" in keys and "proj" in keys and "transformer.resblocks.11.attn.in_proj_weight" in keys
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    with torch.no_grad():
        y = model(torch.randn(1, 3, 40, 72))
    assert y.shape == (1, 512, 3, 5) and model.out_channels == 512


def test_clip_file_converts_and_loads_into_the_vit_teacher(tmp_path):
    """The real loading path of the MaskCLIP ViT teacher: an open_clip ViT-B-16 checkpoint file (random values,
    real key layout) -> scripts/convert_weights.py clip -> safetensors -> LiveTeacher, equal to the source."""
    import subprocess
    import sys

    import open_clip
    from _paths import ROOT

    from teacher.config import TeacherConfig
    from teacher.live import build_teacher_from_config

    torch.manual_seed(1)
    source = open_clip.create_model("ViT-B-16")
    torch.save(source.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    dst = tmp_path / "clip_vit_b16.safetensors"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_weights.py"), "clip",
                           str(tmp_path / "open_clip_pytorch_model.bin"), str(dst)],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    teacher = build_teacher_from_config(TeacherConfig(kind="maskclip_vit", weights=str(dst), resize_fit=(96, 48),
                                                      resize_method="float"))
    assert torch.equal(teacher.net.visual.conv1.weight, source.visual.conv1.weight)
    images = torch.randint(0, 256, (1, 6, 3, 45, 80), dtype=torch.uint8)
    feats, net_hw = teacher.features(images[0])
    with torch.no_grad():
        from teacher.preprocess import preprocess

        want = MaskClipViT(source.visual).eval()(preprocess(images[0], (96, 48), method="float"))
    torch.testing.assert_close(feats, want)
    assert net_hw == (48, 85)
