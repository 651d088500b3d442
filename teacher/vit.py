"""MaskCLIP (training-free) ViT-B/16 dense features through open_clip's own modules (teacher.md §3.1-3.2, §6).

Differences from a plain open_clip image forward, all as MaskCLIP ran it:
- the normalised image is zero-padded at the bottom/right ("corner") to a multiple of the patch size;
- the 14x14 position table is resized to the token grid with bicubic, align_corners=False,
  antialias=False (the cls entry is kept);
- LayerNorm eps 1e-6 everywhere in the visual tower, MLP activation GELU (erf) (open_clip's plain
  ``ViT-B-16`` config, not ``-quickgelu``);
- the last block runs the value path only: x + out_proj(v) then + MLP(LN2(.)), no attention;
- ln_post on every token, cls dropped, projection by ``visual.proj``.

Input: ImageNet-normalised RGB (N, 3, H, W) float (the same tensor as the DeepLab teacher's input).
Output: raw projected features (N, 512, ceil(H/16), ceil(W/16)) (not L2-normalised; normalise for cosine).
"""
from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MASKCLIP_LN_EPS = 1e-6


def resize_pos_embed(pos: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(1 + g*g, D) table -> (1 + gh*gw, D): bicubic, align_corners=False, antialias=False; cls kept."""
    n, d = pos.shape
    g = round(math.sqrt(n - 1))
    if g * g != n - 1:
        raise ValueError(f"positional embedding of {n} rows is not 1 + a square grid")
    if (g, g) == tuple(grid_hw):
        return pos
    grid = pos[1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(grid_hw), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, d)], 0)


class MaskClipViT(nn.Module):
    """Wraps an open_clip ``VisionTransformer`` (kept under ``visual`` with open_clip's names)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not hasattr(visual, "transformer") or visual.proj is None:
            raise ValueError("MaskClipViT needs an open_clip VisionTransformer with a projection")
        self.visual = visual
        for mod in visual.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.eps = MASKCLIP_LN_EPS
        self.patch = int(visual.conv1.kernel_size[0])

    @property
    def out_channels(self) -> int:
        return int(self.visual.proj.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised -> (N, D_out, ceil(H/p), ceil(W/p))."""
        v = self.visual
        n, _, h, w = x.shape
        p = self.patch
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        tok = v.conv1(x.to(v.conv1.weight.dtype))                       # (N, D, gh, gw)
        gh, gw = tok.shape[-2:]
        tok = tok.flatten(2).transpose(1, 2)                            # (N, gh*gw, D)
        cls = v.class_embedding.view(1, 1, -1).expand(n, 1, -1).to(tok.dtype)
        tok = torch.cat([cls, tok], 1)
        tok = tok + resize_pos_embed(v.positional_embedding, (gh, gw)).to(tok.dtype)
        tok = v.ln_pre(tok)
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            tok = blk(tok)
        last = blocks[-1]
        d = tok.shape[-1]
        y = last.ln_1(tok)
        val = F.linear(y, last.attn.in_proj_weight[2 * d:], last.attn.in_proj_bias[2 * d:])
        tok = tok + last.ls_1(last.attn.out_proj(val))
        tok = tok + last.ls_2(last.mlp(last.ln_2(tok)))
        tok = v.ln_post(tok)[:, 1:] @ v.proj                             # (N, gh*gw, D_out)
        return tok.transpose(1, 2).reshape(n, -1, gh, gw)


def build_maskclip_vit(weights: str | os.PathLike | None = None, model_name: str = "ViT-B-16",
                       model_cfg: dict | None = None) -> MaskClipViT:
    """open_clip ``create_model(model_name)`` (GELU) with weights from a LOCAL file, visual tower only.

    weights: an open_clip-named ``.safetensors`` / ``.bin`` (e.g. from teacher.checkpoint.convert_clip_weights)
    or None for random init. model_cfg: a full open_clip model config dict (embed_dim, vision_cfg, text_cfg)
    to build a small random model for tests instead of ``model_name``.
    """
    import open_clip

    if model_cfg:
        from open_clip.model import CLIP
        model = CLIP(**model_cfg)
    else:
        pretrained = None if weights is None else str(weights)
        if pretrained is not None and not os.path.isfile(pretrained):
            raise FileNotFoundError(f"{pretrained}: CLIP weight file not found (only local files are used)")
        model = open_clip.create_model(model_name, pretrained=pretrained)
    visual = model.visual
    del model
    return MaskClipViT(visual).eval()
