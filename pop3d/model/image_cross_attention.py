"""TPVImageCrossAttention + TPVMSDeformableAttention3D of TPVFormer-04, with vectorised camera rebatching.

The original loops over planes x cameras x batch with ``nonzero()`` and index copies in every layer. Here the
visibility masks, the per-(sample, camera) query index lists (padded to the longest list), the gathered
reference points and the per-query camera counts are computed **once per forward** (:func:`build_rebatch`;
one host sync per forward reads the padded lengths of all planes) and reused by every layer; gather and
scatter are single indexing / ``index_add`` ops. Semantics kept from the original:

* a query enters camera i if *any* of its anchors is visible there, and then *all* its anchors are sampled;
* outputs of the cameras that see a query are summed and divided by ``clamp(count, 1)``;
* ``output_proj`` is applied after that average, then dropout and the residual (the input query).

Batch: row ``b * num_cams + i`` holds sample b, camera i, for both the rebatched queries and the image
values. For B = 1 this is exactly the original; for B > 1 the original mixed rows (it used sample 0's mask
for every sample and cam-major value rows), here every sample uses its own mask and its own images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..constants import device_constant
from .cross_view_attention import direction_grid, fp32_linear
from .msda import multi_scale_deformable_attn


@dataclass
class PlaneRebatch:
    """Per-forward camera rebatching of one TPV plane (B samples, N cameras, nq queries, D anchors).

    flat_index (B*N, L): index into the (B*nq) flattened queries, padded entries point at row b*nq;
    valid (B*N, L) bool; ref (B*N, L, D, 2) fp32 reference points (zero where padded);
    count (B, nq) float: number of cameras seeing each query, clamped to >= 1.
    """

    flat_index: torch.Tensor
    valid: torch.Tensor
    ref: torch.Tensor
    count: torch.Tensor


def rebatch_lengths(masks: list[torch.Tensor]) -> list[int]:
    """Padded rebatch length of each plane: the most queries any (sample, camera) row sees, >= 1.

    masks [(B, N, nq, D) bool] -> [int]; ONE host sync for all planes (a single device->host read).
    """
    maxima = torch.stack([m.any(-1).flatten(0, 1).sum(-1).max() for m in masks])
    return [max(int(v), 1) for v in maxima.tolist()]


def build_rebatch(reference_points_cam: torch.Tensor, mask: torch.Tensor, max_len: int | None = None
                  ) -> PlaneRebatch:
    """reference_points_cam (B, N, nq, D, 2), mask (B, N, nq, D) bool -> :class:`PlaneRebatch`.

    max_len: the padded length (:func:`rebatch_lengths`; any value >= the true maximum gives the same
    result); None reads it from ``mask`` (a host sync).
    """
    b, n, nq, d, _ = reference_points_cam.shape
    vis = mask.any(-1).reshape(b * n, nq)  # query enters camera if any anchor is visible
    per_row = vis.sum(-1)
    if max_len is None:
        max_len = rebatch_lengths([mask])[0]
    order = torch.argsort((~vis).to(torch.uint8), dim=-1, stable=True)[:, :max_len]  # visible first, ascending
    valid = torch.arange(max_len, device=vis.device)[None, :] < per_row[:, None]
    index = torch.where(valid, order, torch.zeros_like(order))
    ref = reference_points_cam.reshape(b * n, nq, d, 2).gather(1, index[:, :, None, None].expand(-1, -1, d, 2))
    ref = torch.where(valid[:, :, None, None], ref, torch.zeros_like(ref))
    batch_of_row = torch.arange(b, device=vis.device).repeat_interleave(n)
    flat_index = index + (batch_of_row * nq)[:, None]
    count = vis.view(b, n, nq).sum(1).clamp(min=1).to(torch.float32)
    return PlaneRebatch(flat_index=flat_index, valid=valid, ref=ref.float(), count=count)


class TPVMSDeformableAttention3D(nn.Module):
    """Deformable attention of rebatched plane queries into multi-level image features.

    Per plane i with ``pm_i = num_z_anchors[i] // num_z_anchors[0]`` sub-queries per query, each sub-query
    owns ``num_z_anchors[0]`` consecutive anchors and ``num_points[0]`` points per (head, level).
    ``sampling_offsets[i]`` output index ((((h*L + l)*Z_i + z)*K + k)*2 + xy), ``attention_weights[i]``
    ((h*L + l)*Z_i + z)*K + k with K = num_points[0] / num_z_anchors[0]; the softmax runs jointly over the
    L * num_points[i] logits of a query; sub-query outputs are summed. No output projection here.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: tuple[int, int, int] = (8, 64, 64), num_z_anchors: tuple[int, int, int] = (4, 32, 32),
                 backend: str = "auto"):
        super().__init__()
        self.embed_dims, self.num_heads, self.num_levels = embed_dims, num_heads, num_levels
        self.num_points, self.num_z_anchors = tuple(num_points), tuple(num_z_anchors)
        self.points_multiplier = tuple(z // num_z_anchors[0] for z in num_z_anchors)
        self.backend = backend
        self.sampling_offsets = nn.ModuleList(
            nn.Linear(embed_dims, num_heads * num_levels * p * 2) for p in self.num_points)
        self.attention_weights = nn.ModuleList(
            nn.Linear(embed_dims, num_heads * num_levels * p) for p in self.num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        m, nl = self.num_heads, self.num_levels
        for i in range(3):
            nn.init.zeros_(self.sampling_offsets[i].weight)
            k = self.num_points[i] // self.num_z_anchors[i]
            grid = direction_grid(m).view(m, 1, 1, 1, 2).repeat(1, nl, self.num_z_anchors[i], k, 1)
            grid = grid * torch.arange(1, k + 1, dtype=torch.float32).view(1, 1, 1, k, 1)
            self.sampling_offsets[i].bias.copy_(grid.reshape(-1))
            nn.init.zeros_(self.attention_weights[i].weight)
            nn.init.zeros_(self.attention_weights[i].bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)

    def forward(self, queries: list[torch.Tensor], value: torch.Tensor, reference_points: list[torch.Tensor],
                spatial_shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """queries [(Bv, n_i, C)] * 3; value (Bv, S, C); reference_points [(Bv, n_i, Z_i, 2)] * 3 (fp32)
        -> [(Bv, n_i, C)] * 3 (fp32)."""
        bv, s, c = value.shape
        m, nl = self.num_heads, self.num_levels
        value = self.value_proj(value).view(bv, s, m, c // m)
        z0 = self.num_z_anchors[0]
        offs, attns, refs, lens = [], [], [], []
        for i, q in enumerate(queries):
            pm, n = self.points_multiplier[i], q.shape[1]
            off = fp32_linear(self.sampling_offsets[i], q).view(bv, n, m, nl, pm, -1, 2)
            offs.append(off.permute(0, 1, 4, 2, 3, 5, 6).flatten(1, 2))  # (Bv, n*pm, M, L, P0, 2)
            att = fp32_linear(self.attention_weights[i], q).view(bv, n, m, -1).softmax(-1)
            att = att.view(bv, n, m, nl, pm, -1).permute(0, 1, 4, 2, 3, 5).flatten(1, 2)
            attns.append(att)  # (Bv, n*pm, M, L, P0)
            refs.append(reference_points[i].float().reshape(bv, n * pm, z0, 2))
            lens.append(n * pm)
        offsets = torch.cat(offs, 1)
        attn = torch.cat(attns, 1)
        ref = torch.cat(refs, 1)  # (Bv, Q, Z0, 2)
        q_all = offsets.shape[1]
        p0 = offsets.shape[-2]
        normaliser = device_constant(tuple((w, h) for h, w in spatial_shapes), value.device)
        offsets = offsets / normaliser[None, None, None, :, None, :]
        offsets = offsets.view(bv, q_all, m, nl, z0, p0 // z0, 2)
        loc = (ref[:, :, None, None, :, None, :] + offsets).view(bv, q_all, m, nl, p0, 2)
        out = multi_scale_deformable_attn(value, spatial_shapes, loc, attn, backend=self.backend)  # (Bv, Q, C)
        outs = torch.split(out, lens, dim=1)
        return [o.reshape(bv, -1, self.points_multiplier[i], c).sum(2) for i, o in enumerate(outs)]


class TPVImageCrossAttention(nn.Module):
    """query (B, n_hw + n_zh + n_wz, C) x image features -> same shape.

    ``deformable_attention`` (TPVMSDeformableAttention3D) runs on the rebatched queries, then camera average,
    ``output_proj``, dropout and the residual (the input query).
    """

    def __init__(self, embed_dims: int, plane_sizes: tuple[int, int, int], num_cams: int = 6,
                 dropout: float = 0.1, deformable_attention: TPVMSDeformableAttention3D | None = None):
        super().__init__()
        self.embed_dims, self.plane_sizes, self.num_cams = embed_dims, tuple(plane_sizes), num_cams
        self.dropout = nn.Dropout(dropout)
        self.deformable_attention = deformable_attention or TPVMSDeformableAttention3D(embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, value: torch.Tensor, rebatch: list[PlaneRebatch],
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (B, sum(plane_sizes), C); value (B*N, S, C) with row b*N + cam; rebatch: 3 plans."""
        bs, _, c = query.shape
        planes = torch.split(query, self.plane_sizes, dim=1)
        q_rb = [p.reshape(-1, c)[rb.flat_index] for p, rb in zip(planes, rebatch)]  # (B*N, L_i, C)
        outs = self.deformable_attention(q_rb, value, [rb.ref for rb in rebatch], spatial_shapes)
        slots = []
        for p, rb, out in zip(planes, rebatch, outs):
            out = torch.where(rb.valid[..., None], out, torch.zeros_like(out))
            slot = out.new_zeros(bs * p.shape[1], c).index_add(0, rb.flat_index.reshape(-1), out.reshape(-1, c))
            slots.append(slot.view(bs, p.shape[1], c) / rb.count[..., None])
        slots = self.output_proj(torch.cat(slots, 1))
        return self.dropout(slots) + query
