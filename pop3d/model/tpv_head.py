"""TPVFormerHead: learned plane queries, HW positional encoding, image tokens, encoder."""
from __future__ import annotations

import torch
from torch import nn

from .config import StudentConfig
from .cross_view_attention import TPVCrossViewHybridAttention
from .encoder import TPVFormerEncoder
from .image_cross_attention import TPVMSDeformableAttention3D


class LearnedPositionalEncoding(nn.Module):
    """mmdet LearnedPositionalEncoding: mask (B, h, w) -> (B, 2F, h, w), channels [0:F] col_embed[w],
    [F:2F] row_embed[h]."""

    def __init__(self, num_feats: int, row_num_embed: int, col_num_embed: int):
        super().__init__()
        self.row_embed = nn.Embedding(row_num_embed, num_feats)
        self.col_embed = nn.Embedding(col_num_embed, num_feats)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        b, h, w = mask.shape
        x_embed = self.col_embed(torch.arange(w, device=mask.device))  # (w, F)
        y_embed = self.row_embed(torch.arange(h, device=mask.device))  # (h, F)
        pos = torch.cat((x_embed[None].expand(h, -1, -1), y_embed[:, None].expand(-1, w, -1)), -1)
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1)


class TPVFormerHead(nn.Module):
    """Multi-level camera features -> three TPV planes.

    forward(mlvl_feats [(B, N, C, h_l, w_l)] * levels, lidar2img (B, N, 4, 4), img_hw (H, W))
    -> [(B, H*W, C), (B, Z*H, C), (B, W*Z, C)].
    """

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.tpv_h, self.tpv_w, self.tpv_z = cfg.tpv_h, cfg.tpv_w, cfg.tpv_z
        self.embed_dims, self.num_cams, self.num_levels = cfg.dim, cfg.num_cams, cfg.levels
        self.level_embeds = nn.Parameter(torch.empty(cfg.levels, cfg.dim))
        self.cams_embeds = nn.Parameter(torch.empty(cfg.num_cams, cfg.dim))
        self.positional_encoding = LearnedPositionalEncoding(cfg.pos_feats, cfg.tpv_h, cfg.tpv_w)
        self.register_buffer("tpv_mask_hw", torch.zeros(1, cfg.tpv_h, cfg.tpv_w))
        layer_kwargs = {"embed_dims": cfg.dim, "num_heads": cfg.num_heads, "num_levels": cfg.levels,
                        "num_points": cfg.num_points, "num_z_anchors": cfg.num_points_in_pillar,
                        "plane_sizes": cfg.plane_sizes, "ffn_dim": cfg.ffn_dim, "num_cams": cfg.num_cams,
                        "dropout": cfg.dropout, "cvha_num_points": cfg.cvha_num_points,
                        "backend": cfg.attention_backend}
        self.encoder = TPVFormerEncoder(cfg.tpv_h, cfg.tpv_w, cfg.tpv_z, cfg.pc_range, cfg.num_points_in_pillar,
                                        cfg.num_layers, layer_kwargs)
        self.tpv_embedding_hw = nn.Embedding(cfg.tpv_h * cfg.tpv_w, cfg.dim)
        self.tpv_embedding_zh = nn.Embedding(cfg.tpv_z * cfg.tpv_h, cfg.dim)
        self.tpv_embedding_wz = nn.Embedding(cfg.tpv_w * cfg.tpv_z, cfg.dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """xavier_uniform on every parameter with dim > 1, then the deformable attentions' own init,
        then N(0, 1) level/camera embeddings (TPVFormerHead.init_weights)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, (TPVMSDeformableAttention3D, TPVCrossViewHybridAttention)):
                m.init_weights()
        nn.init.normal_(self.level_embeds)
        nn.init.normal_(self.cams_embeds)

    def set_backend(self, backend: str) -> None:
        for m in self.modules():
            if isinstance(m, (TPVMSDeformableAttention3D, TPVCrossViewHybridAttention)):
                m.backend = backend

    def forward(self, mlvl_feats: list[torch.Tensor], lidar2img: torch.Tensor,
                img_hw: tuple[int, int]) -> list[torch.Tensor]:
        bs = mlvl_feats[0].shape[0]
        dtype = mlvl_feats[0].dtype
        queries = [e.weight.to(dtype)[None].expand(bs, -1, -1)
                   for e in (self.tpv_embedding_hw, self.tpv_embedding_zh, self.tpv_embedding_wz)]
        pos_hw = self.positional_encoding(self.tpv_mask_hw.expand(bs, -1, -1)).to(dtype)
        pos_hw = pos_hw.flatten(2).transpose(1, 2)  # (B, H*W, C), index h*W + w
        tokens, shapes = [], []
        for lvl, feat in enumerate(mlvl_feats):
            h, w = feat.shape[-2:]
            feat = feat.flatten(3).transpose(2, 3)  # (B, N, h*w, C)
            feat = feat + self.cams_embeds[None, :, None, :].to(feat.dtype)
            feat = feat + self.level_embeds[None, None, lvl:lvl + 1, :].to(feat.dtype)
            tokens.append(feat)
            shapes.append((h, w))
        value = torch.cat(tokens, 2).flatten(0, 1)  # (B*N, S, C), row b*N + cam
        return self.encoder(queries, value, pos_hw, lidar2img, img_hw, shapes)
