"""TPVFormer (POP-3D student): backbone -> FPN -> TPV head -> aggregator.

Top-level names as in the official checkpoint: ``tpv_head``, ``img_backbone``, ``img_neck``,
``tpv_aggregator`` (``grid_mask`` owns no state).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .aggregator import TPVAggregator
from .backbone import ResNet
from .config import RESNET_DEPTHS, StudentConfig
from .fpn import FPN
from .grid_mask import GridMask
from .tpv_head import TPVFormerHead


@dataclass
class StudentOutput:
    """The four official outputs (K = num_classes, F = feature_dim, grid W x H x Z).

    logits_vox (B, K, W, H, Z); logits_pts (B, K, n, 1, 1) or None without points;
    logits_vox_fts (B, F, W, H, Z) or None (no features, or voxel_features=False);
    logits_pts_fts (B, m, F) or None without features.
    """

    logits_vox: torch.Tensor
    logits_pts: torch.Tensor | None = None
    logits_vox_fts: torch.Tensor | None = None
    logits_pts_fts: torch.Tensor | None = None

    def as_dict(self) -> dict[str, torch.Tensor | None]:
        return {"logits_vox": self.logits_vox, "logits_pts": self.logits_pts,
                "logits_vox_fts": self.logits_vox_fts, "logits_pts_fts": self.logits_pts_fts}


class TPVFormer(nn.Module):
    """The POP-3D student network, built only from a :class:`StudentConfig`."""

    def __init__(self, cfg: StudentConfig | None = None):
        super().__init__()
        cfg = cfg or StudentConfig()
        self.cfg = cfg
        self.tpv_head = TPVFormerHead(cfg)
        self.img_backbone = ResNet(RESNET_DEPTHS[cfg.depth], cfg.base_channels, cfg.stem_channels,
                                   checkpoint_stages=(3,) if cfg.activation_checkpointing else ())
        self.img_neck = FPN(cfg.fpn_in_channels, cfg.dim, cfg.levels)
        self.tpv_aggregator = TPVAggregator(
            cfg.tpv_h, cfg.tpv_w, cfg.tpv_z, cfg.num_classes, in_dims=cfg.dim, hidden_dims=2 * cfg.dim,
            out_dims=cfg.dim, feature_dim=cfg.feature_dim, hidden_dims_ft=cfg.hidden_dims_ft,
            out_dims_ft=cfg.hidden_dims_ft, dec_layers_occupancy=cfg.dec_layers_occupancy,
            dec_layers_features=cfg.dec_layers_features, use_checkpoint=cfg.activation_checkpointing)
        self.grid_mask = GridMask(prob=cfg.grid_mask_prob)
        self.use_grid_mask = cfg.grid_mask

    def set_attention_backend(self, backend: str) -> None:
        """Switch the deformable-attention backend ('auto' | 'pytorch' | 'triton' | 'mmcv') of every attention module."""
        from .msda import BACKENDS
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.cfg.attention_backend = backend
        self.tpv_head.set_backend(backend)

    # ---- input checks --------------------------------------------------------------------------------
    def _check_inputs(self, imgs, lidar2img, img_shape, points, features) -> tuple[int, int]:
        n_cam = self.cfg.num_cams
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 5 or imgs.shape[2] != 3:
            raise ValueError(f"imgs must be a (B, {n_cam}, 3, H, W) tensor, got "
                             f"{tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs)}")
        b, n, _, h, w = imgs.shape
        if n != n_cam:
            raise ValueError(f"imgs has {n} cameras, the model was built for num_cams={n_cam}")
        if not imgs.is_floating_point():
            raise ValueError(f"imgs must be normalised float images, got dtype {imgs.dtype}")
        div = self.cfg.min_image_divisor
        if h % div or w % div:
            raise ValueError(f"image size {h}x{w} is not a multiple of {div} in both H and W; the backbone's C5 "
                             f"stride is {div} and the FPN adds upsampled maps, so pad the images at the bottom/"
                             f"right with zeros to {-(-h // div) * div}x{-(-w // div) * div} (as the original does)")
        if not isinstance(lidar2img, torch.Tensor) or tuple(lidar2img.shape) != (b, n_cam, 4, 4):
            got = tuple(lidar2img.shape) if isinstance(lidar2img, torch.Tensor) else type(lidar2img)
            raise ValueError(f"lidar2img must have shape (B={b}, {n_cam}, 4, 4), got {got}")
        if img_shape is None:
            img_hw = (h, w)
        else:
            if len(img_shape) not in (2, 3):
                raise ValueError(f"img_shape must be (H, W) or (H, W, C), got {img_shape!r}")
            img_hw = (int(img_shape[0]), int(img_shape[1]))
            if img_hw[0] <= 0 or img_hw[1] <= 0:
                raise ValueError(f"img_shape must be positive, got {img_shape!r}")
        for name, t in (("points", points), ("features", features)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != b
                                  or t.shape[2] != 3):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
                raise ValueError(f"{name} must have shape (B={b}, n, 3) (grid coordinates along W, H, Z), "
                                 f"got {got}")
        return img_hw

    # ---- forward -------------------------------------------------------------------------------------
    def extract_img_feat(self, imgs: torch.Tensor, use_grid_mask: bool | None = None,
                         grid_mask_generators: list[torch.Generator] | None = None) -> list[torch.Tensor]:
        """imgs (B, N, 3, H, W) -> [(B, N, C, h_l, w_l)] * levels. ``grid_mask_generators``: one per sample
        (GridMask drawn per sample); None: one draw for the batch from the global RNG."""
        b, n = imgs.shape[:2]
        x = imgs.flatten(0, 1)
        if self.use_grid_mask if use_grid_mask is None else use_grid_mask:
            x = self.grid_mask(x, generators=grid_mask_generators)
        feats = self.img_neck(self.img_backbone(x))
        return [f.view(b, n, *f.shape[1:]) for f in feats]

    def forward(self, imgs: torch.Tensor, lidar2img: torch.Tensor, img_shape: Sequence[int] | None = None,
                points: torch.Tensor | None = None, features: torch.Tensor | None = None,
                voxel_features: bool = True, use_grid_mask: bool | None = None,
                grid_mask_generators: list[torch.Generator] | None = None) -> StudentOutput:
        """imgs (B, N, 3, Hp, Wp) normalised float; lidar2img (B, N, 4, 4); img_shape (Hp, Wp) used to
        normalise projected pixels (defaults to the tensor size); points (B, n, 3) and features (B, m, 3) grid
        coordinates. GridMask runs only in training (per sample with ``grid_mask_generators``, B of them).

        Every output row b depends on sample b's inputs only (B > 1 equals B separate forwards, up to float
        summation order; in training, dropout draws one mask per batch tensor, so not per sample)."""
        img_hw = self._check_inputs(imgs, lidar2img, img_shape, points, features)
        if grid_mask_generators is not None and len(grid_mask_generators) != imgs.shape[0]:
            raise ValueError(f"grid_mask_generators: {len(grid_mask_generators)} for a batch of {imgs.shape[0]}")
        feats = self.extract_img_feat(imgs, use_grid_mask, grid_mask_generators)
        planes = self.tpv_head(feats, lidar2img, img_hw)
        return StudentOutput(*self.tpv_aggregator(planes, points, features, voxel_features))
