"""TPVAggregator (POP-3D version): fuse the three planes into voxel / point features, then two MLP heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..constants import device_constant


def build_decoder(num_layers: int, in_dims: int, hidden_dims: int, out_dims: int) -> nn.Sequential:
    """[Linear(in, hid), (Softplus, Linear(hid, hid)) * (n-2), Softplus, Linear(hid, out)]; n=1: [Linear(in, out)]."""
    if num_layers == 1:
        return nn.Sequential(nn.Linear(in_dims, out_dims))
    layers: list[nn.Module] = [nn.Linear(in_dims, hidden_dims)]
    for _ in range(num_layers - 2):
        layers += [nn.Softplus(), nn.Linear(hidden_dims, hidden_dims)]
    layers += [nn.Softplus(), nn.Linear(hidden_dims, out_dims)]
    return nn.Sequential(*layers)


class TPVAggregator(nn.Module):
    """Planes -> occupancy logits and CLIP-space features (scale 1, as in POP-3D).

    Voxel feature at (x=i, y=j, z=k): HW[j, i] + ZH[k, j] + WZ[i, k]. Point feature at continuous grid
    coordinates c = (c_x along W, c_y along H, c_z along Z): bilinear ``grid_sample`` (align_corners=False,
    zero padding) of each plane at c / size * 2 - 1, summed.
    """

    def __init__(self, tpv_h: int, tpv_w: int, tpv_z: int, num_classes: int, in_dims: int, hidden_dims: int,
                 out_dims: int, feature_dim: int, hidden_dims_ft: int, out_dims_ft: int,
                 dec_layers_occupancy: int = 2, dec_layers_features: int = 2, use_checkpoint: bool = False):
        super().__init__()
        self.tpv_h, self.tpv_w, self.tpv_z = tpv_h, tpv_w, tpv_z
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.use_checkpoint = use_checkpoint
        self.decoder = build_decoder(dec_layers_occupancy, in_dims, hidden_dims, out_dims)
        self.classifier = nn.Linear(out_dims, num_classes)
        self.decoder_ft = build_decoder(dec_layers_features, in_dims, hidden_dims_ft, out_dims_ft)
        self.classifier_ft = nn.Linear(out_dims_ft, feature_dim)

    def _mlp(self, decoder: nn.Module, classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled() and self.training:
            x = checkpoint(decoder, x, use_reentrant=False)
            return checkpoint(classifier, x, use_reentrant=False)
        return classifier(decoder(x))

    def _point_features(self, planes: tuple[torch.Tensor, ...], pts: torch.Tensor) -> torch.Tensor:
        """pts (B, n, 3) grid coordinates -> (B, C, n)."""
        hw, zh, wz = planes
        b, n, _ = pts.shape
        size = device_constant((self.tpv_w, self.tpv_h, self.tpv_z), pts.device)
        g = (pts.float() / size * 2 - 1).reshape(b, 1, n, 3)
        g_wz = torch.stack((g[..., 2], g[..., 0]), -1)  # slices, not list indices (no host->device index copy)
        f_hw = F.grid_sample(hw, g[..., 0:2].to(hw.dtype), align_corners=False).squeeze(2)
        f_zh = F.grid_sample(zh, g[..., 1:3].to(zh.dtype), align_corners=False).squeeze(2)
        f_wz = F.grid_sample(wz, g_wz.to(wz.dtype), align_corners=False).squeeze(2)
        return f_hw + f_zh + f_wz

    def forward(self, tpv_list: list[torch.Tensor], points: torch.Tensor | None = None,
                features: torch.Tensor | None = None, voxel_features: bool = True):
        """tpv_list [(B, H*W, C), (B, Z*H, C), (B, W*Z, C)]; points (B, n, 3); features (B, m, 3).

        Returns (logits_vox (B, K, W, H, Z), logits_pts (B, K, n, 1, 1) | None,
        logits_vox_fts (B, F, W, H, Z) | None, logits_pts_fts (B, m, F) | None).
        """
        hw, zh, wz = tpv_list
        b, _, c = hw.shape
        H, W, Z = self.tpv_h, self.tpv_w, self.tpv_z
        hw = hw.transpose(1, 2).reshape(b, c, H, W)
        zh = zh.transpose(1, 2).reshape(b, c, Z, H)
        wz = wz.transpose(1, 2).reshape(b, c, W, Z)
        planes = (hw, zh, wz)
        vox = (hw.transpose(2, 3)[..., None] + zh.permute(0, 1, 3, 2)[:, :, None] + wz[:, :, :, None, :])
        vox = vox.flatten(2)  # (B, C, W*H*Z), index (x*H + y)*Z + z

        logits_vox_fts = logits_pts_fts = None
        if features is not None:
            m = features.shape[1]
            f_pts = self._point_features(planes, features)
            fused = torch.cat([vox, f_pts], -1) if voxel_features else f_pts
            out = self._mlp(self.decoder_ft, self.classifier_ft, fused.transpose(1, 2)).transpose(1, 2)
            logits_pts_fts = out[:, :, out.shape[2] - m:].transpose(1, 2)
            if voxel_features:
                logits_vox_fts = out[:, :, :W * H * Z].reshape(b, self.feature_dim, W, H, Z)

        n = 0 if points is None else points.shape[1]
        fused = vox if points is None else torch.cat([vox, self._point_features(planes, points)], -1)
        logits = self._mlp(self.decoder, self.classifier, fused.transpose(1, 2)).transpose(1, 2)
        logits_vox = logits[:, :, :W * H * Z].reshape(b, self.num_classes, W, H, Z)
        logits_pts = None if points is None else logits[:, :, W * H * Z:].reshape(b, self.num_classes, n, 1, 1)
        return logits_vox, logits_pts, logits_vox_fts, logits_pts_fts
