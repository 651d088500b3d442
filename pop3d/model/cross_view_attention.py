"""TPVCrossViewHybridAttention of TPVFormer-04: deformable self-attention on the HW plane only.

The value is two identical copies of the query (the BEVFormer temporal layout with the "previous BEV"
replaced by the current query); the two copies get independent offsets/weights and are averaged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import device_constant
from .msda import multi_scale_deformable_attn


def fp32_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` computed in fp32 with autocast disabled (sampling offsets, attention logits)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())


def direction_grid(num_heads: int) -> torch.Tensor:
    """(num_heads, 2) unit-square directions (cos, sin)/max(|cos|,|sin|) of angles 2*pi*h/num_heads."""
    thetas = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    return grid / grid.abs().max(-1, keepdim=True)[0]


class TPVCrossViewHybridAttention(nn.Module):
    """query (B, Nq, C) on an (H, W) plane -> (B, Nq, C).

    ``sampling_offsets``: Linear(2C -> M*2*L*P*2), output index ((((h*2+qu)*L+l)*P+k)*2+xy);
    ``attention_weights``: Linear(2C -> M*2*L*P), softmax over L*P per (head, queue entry). The 2C input is
    cat[query, query + pos].
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 1, num_points: int = 4,
                 dropout: float = 0.1, backend: str = "auto"):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        self.embed_dims, self.num_heads, self.num_levels, self.num_points = embed_dims, num_heads, num_levels, num_points
        self.num_queue = 2
        self.backend = backend
        self.sampling_offsets = nn.Linear(embed_dims * 2, 2 * num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims * 2, 2 * num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        grid = direction_grid(self.num_heads).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels * self.num_queue, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor | None, reference_points: torch.Tensor,
                spatial_shape: tuple[int, int]) -> torch.Tensor:
        """query, query_pos (B, Nq, C); reference_points (2B, Nq, L, 2) normalised (x, y); spatial_shape (H, W)."""
        bs, nq, c = query.shape
        m, nl, npt = self.num_heads, self.num_levels, self.num_points
        identity = query
        q_pos = query if query_pos is None else query + query_pos
        qcat = torch.cat([query, q_pos], -1)  # (B, Nq, 2C)
        value = self.value_proj(query)
        value = torch.cat([value, value], 0).reshape(2 * bs, nq, m, c // m)  # row = qu*B + b
        offsets = fp32_linear(self.sampling_offsets, qcat).view(bs, nq, m, 2, nl, npt, 2)
        attn = fp32_linear(self.attention_weights, qcat).view(bs, nq, m, 2, nl * npt).softmax(-1)
        attn = attn.view(bs, nq, m, 2, nl, npt).permute(3, 0, 1, 2, 4, 5).reshape(2 * bs, nq, m, nl, npt)
        offsets = offsets.permute(3, 0, 1, 2, 4, 5, 6).reshape(2 * bs, nq, m, nl, npt, 2)
        h, w = spatial_shape
        normaliser = device_constant((w, h), offsets.device, offsets.dtype)
        loc = reference_points.float()[:, :, None, :, None, :] + offsets / normaliser
        out = multi_scale_deformable_attn(value, [(h, w)] * nl, loc, attn, backend=self.backend)  # (2B, Nq, C)
        out = (out[:bs] + out[bs:]) / 2
        out = self.output_proj(out.to(query.dtype))
        return self.dropout(out) + identity
