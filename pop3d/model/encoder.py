"""TPVFormer-04 encoder: reference points, their projection into the cameras, and the encoder layers."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..constants import device_constant
from .cross_view_attention import TPVCrossViewHybridAttention
from .image_cross_attention import (
    PlaneRebatch,
    TPVImageCrossAttention,
    TPVMSDeformableAttention3D,
    build_rebatch,
    rebatch_lengths,
)

PROJECTION_EPS = 1e-5


def reference_points_3d(h: int, w: int, z_extent: float, num_points: int) -> torch.Tensor:
    """Pillar anchors (1, P, h*w, 3) normalised to [0, 1]: ((col+.5)/w, (row+.5)/h, linspace(.5, Z-.5, P)/Z).

    ``z_extent`` is metric, so the P anchors sit 0.5 m inside both ends of the pillar (not voxel centres).
    """
    zs = torch.linspace(0.5, z_extent - 0.5, num_points, dtype=torch.float32).view(-1, 1, 1).expand(num_points, h, w)
    xs = torch.linspace(0.5, w - 0.5, w, dtype=torch.float32).view(1, 1, -1).expand(num_points, h, w)
    ys = torch.linspace(0.5, h - 0.5, h, dtype=torch.float32).view(1, -1, 1).expand(num_points, h, w)
    ref = torch.stack((xs / w, ys / h, zs / z_extent), -1)  # (P, h, w, 3)
    return ref.flatten(1, 2)[None]


def reference_points_2d(h: int, w: int) -> torch.Tensor:
    """Plane cell centres (1, h*w, 1, 2) as normalised (x, y) = ((col+.5)/w, (row+.5)/h)."""
    ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32),
                            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32), indexing="ij")
    return torch.stack((xs.reshape(-1) / w, ys.reshape(-1) / h), -1)[None, :, None, :]


def tpv_reference_points(tpv_h: int, tpv_w: int, tpv_z: int, pc_range: Sequence[float],
                         num_points_in_pillar: Sequence[int]) -> dict[str, torch.Tensor]:
    """The six geometry buffers of the official encoder (normalised world (x, y, z) for the 3D ones).

    ref_3d_hw (1, P0, H*W, 3): (x from w, y from h, z pillar); ref_3d_zh (1, P1, Z*H, 3): (x pillar, y from h,
    z from z); ref_3d_wz (1, P2, W*Z, 3): (x from w, y pillar, z from z); ref_2d_* (1, n, 1, 2).
    """
    hw = reference_points_3d(tpv_h, tpv_w, pc_range[5] - pc_range[2], num_points_in_pillar[0])
    zh = reference_points_3d(tpv_z, tpv_h, pc_range[3] - pc_range[0], num_points_in_pillar[1])[..., [2, 0, 1]]
    wz = reference_points_3d(tpv_w, tpv_z, pc_range[4] - pc_range[1], num_points_in_pillar[2])[..., [1, 2, 0]]
    return {"ref_3d_hw": hw, "ref_3d_zh": zh.contiguous(), "ref_3d_wz": wz.contiguous(),
            "ref_2d_hw": reference_points_2d(tpv_h, tpv_w), "ref_2d_zh": reference_points_2d(tpv_z, tpv_h),
            "ref_2d_wz": reference_points_2d(tpv_w, tpv_z)}


def point_sampling(ref_3d: torch.Tensor, pc_range: Sequence[float], lidar2img: torch.Tensor,
                   img_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Project normalised anchors into every camera, in fp32 (autocast disabled).

    Args:
        ref_3d: (1, D, nq, 3) normalised world points (the buffers above).
        lidar2img: (B, N, 4, 4) LiDAR -> (u*d, v*d, d, 1).
        img_hw: (H, W) used to normalise pixels (the padded size of camera 0, as in the original).
    Returns:
        reference_points_cam (B, N, nq, D, 2) normalised image (u, v), not clipped;
        mask (B, N, nq, D) bool: depth > 1e-5 and 0 < u, v < 1 (strict).
    """
    with torch.autocast(device_type=lidar2img.device.type, enabled=False):
        r = ref_3d[0].float()  # (D, nq, 3)
        x = r[..., 0] * (pc_range[3] - pc_range[0]) + pc_range[0]
        y = r[..., 1] * (pc_range[4] - pc_range[1]) + pc_range[1]
        z = r[..., 2] * (pc_range[5] - pc_range[2]) + pc_range[2]
        pts = torch.stack((x, y, z, torch.ones_like(x)), -1)  # (D, nq, 4)
        cam = torch.einsum("bnij,dqj->bnqdi", lidar2img.float(), pts)  # (B, N, nq, D, 4)
        depth = cam[..., 2:3]
        mask = depth > PROJECTION_EPS
        uv = cam[..., 0:2] / torch.clamp(depth, min=PROJECTION_EPS)
        uv = uv / device_constant((float(img_hw[1]), float(img_hw[0])), uv.device, uv.dtype)
        mask = mask & (uv[..., 1:2] > 0.0) & (uv[..., 1:2] < 1.0) & (uv[..., 0:1] < 1.0) & (uv[..., 0:1] > 0.0)
    return uv, mask.squeeze(-1)


class FFN(nn.Module):
    """mmcv FFN (num_fcs=2): x + Drop(Linear(F->C)(Drop(ReLU(Linear(C->F)(x))))). Names ``layers.0.0``, ``layers.1``."""

    def __init__(self, embed_dims: int, feedforward_channels: int, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(dropout)),
            nn.Linear(feedforward_channels, embed_dims), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class TPVFormerLayer(nn.Module):
    """Post-norm layer: HW self-attn -> norm -> image cross-attn -> norm -> FFN -> norm.

    ``attentions`` = [TPVCrossViewHybridAttention, TPVImageCrossAttention], ``ffns`` = [FFN],
    ``norms`` = 3 x LayerNorm. Planes only share weights here; they are fused in the aggregator.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: Sequence[int],
                 num_z_anchors: Sequence[int], plane_sizes: tuple[int, int, int], ffn_dim: int, num_cams: int,
                 dropout: float, cvha_num_points: int = 4, backend: str = "auto"):
        super().__init__()
        self.plane_sizes = tuple(plane_sizes)
        cvha = TPVCrossViewHybridAttention(embed_dims, num_heads, 1, cvha_num_points, dropout, backend)
        msda3d = TPVMSDeformableAttention3D(embed_dims, num_heads, num_levels, tuple(num_points),
                                            tuple(num_z_anchors), backend)
        ica = TPVImageCrossAttention(embed_dims, plane_sizes, num_cams, dropout, msda3d)
        self.attentions = nn.ModuleList([cvha, ica])
        self.ffns = nn.ModuleList([FFN(embed_dims, ffn_dim, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(self, query: list[torch.Tensor], value: torch.Tensor, tpv_pos_hw: torch.Tensor | None,
                ref_2d: torch.Tensor, hw_shape: tuple[int, int], rebatch: list[PlaneRebatch],
                spatial_shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """query [(B, n_i, C)] * 3; value (B*N, S, C); ref_2d (2B, n_hw, 1, 2) -> [(B, n_i, C)] * 3."""
        q_hw = self.attentions[0](query[0], tpv_pos_hw, ref_2d, hw_shape)
        x = torch.cat([q_hw, query[1], query[2]], 1)
        x = self.norms[0](x)
        x = self.attentions[1](x, value, rebatch, spatial_shapes)
        x = self.norms[1](x)
        x = self.norms[2](self.ffns[0](x))
        return list(torch.split(x, self.plane_sizes, dim=1))


class TPVFormerEncoder(nn.Module):
    """``layers`` + the persistent geometry buffers ref_3d_{hw,zh,wz}, ref_2d_{hw,zh,wz}."""

    def __init__(self, tpv_h: int, tpv_w: int, tpv_z: int, pc_range: Sequence[float],
                 num_points_in_pillar: Sequence[int], num_layers: int, layer_kwargs: dict):
        super().__init__()
        self.tpv_h, self.tpv_w, self.tpv_z = tpv_h, tpv_w, tpv_z
        self.pc_range = tuple(float(v) for v in pc_range)
        for name, buf in tpv_reference_points(tpv_h, tpv_w, tpv_z, pc_range, num_points_in_pillar).items():
            self.register_buffer(name, buf)
        self.layers = nn.ModuleList(TPVFormerLayer(**layer_kwargs) for _ in range(num_layers))

    def geometry(self, lidar2img: torch.Tensor, img_hw: tuple[int, int]) -> list[PlaneRebatch]:
        """Per-forward camera geometry for the three planes (fp32, layer independent)."""
        projected = [point_sampling(ref, self.pc_range, lidar2img, img_hw)
                     for ref in (self.ref_3d_hw, self.ref_3d_zh, self.ref_3d_wz)]
        lengths = rebatch_lengths([mask for _, mask in projected])  # the forward's one host sync
        return [build_rebatch(ref_cam, mask, n) for (ref_cam, mask), n in zip(projected, lengths)]

    def forward(self, queries: list[torch.Tensor], value: torch.Tensor, tpv_pos_hw: torch.Tensor | None,
                lidar2img: torch.Tensor, img_hw: tuple[int, int],
                spatial_shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """queries [(B, n_i, C)] * 3; value (B*N, S, C) rows b*N + cam; lidar2img (B, N, 4, 4)."""
        bs = queries[0].shape[0]
        rebatch = self.geometry(lidar2img, img_hw)
        ref_2d = self.ref_2d_hw.expand(bs, -1, -1, -1)
        ref_2d = torch.cat([ref_2d, ref_2d], 0)
        for layer in self.layers:
            queries = layer(queries, value, tpv_pos_hw, ref_2d, (self.tpv_h, self.tpv_w), rebatch, spatial_shapes)
        return queries
