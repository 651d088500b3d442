"""The frozen live teacher inside the training loop: images + projections -> per-projection targets.

``LiveTeacher.forward(images uint8 (B, 6, 3, H, W) RGB, proj_batch (M,), proj_cam (M,), proj_rowcol (M, 2))
-> float32 (M, C)``: the feature of image ``proj_batch * 6 + proj_cam`` at pixel (row, col) of the ORIGINAL
image, as the original extraction saved it (preprocess -> network -> exact double-bilinear read).

Frozen for real: parameters have ``requires_grad=False``, the module is always in eval mode (``train(True)``
leaves it in eval), and forward runs under ``torch.inference_mode``. Keep it out of the student: do not
register it as a submodule of anything that is checkpointed or wrapped by DDP / ``accelerator.prepare``.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from p3d_common.banner import warn_meaningless
from p3d_common.safetensors_io import CheckpointError
from teacher.config import TeacherConfig  # re-exported: TeacherConfig lived here
from teacher.preprocess import DEFAULT_RESIZE_FIT, preprocess, rescale_size
from teacher.sampling import ExactSampler, sample_grid, sample_grid_dense

log = logging.getLogger(__name__)

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}
NUM_CAMERAS = 6


class LiveTeacher(nn.Module):
    """Frozen teacher ``net`` ((N, 3, H', W') normalised -> (N, C, h, w)) + preprocessing + point sampler."""

    def __init__(self, net: nn.Module, cfg: TeacherConfig):
        super().__init__()
        self.cfg = cfg
        self.net = net
        self.out_channels = int(net.out_channels)
        self._exact = ExactSampler()
        self._compiled = None
        for p in self.net.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LiveTeacher:
        """Always eval: the teacher's BatchNorm must never update or use batch statistics."""
        if mode:
            log.debug("LiveTeacher.train(True) ignored: the teacher stays in eval mode")
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _run_net(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, H', W') float32 normalised -> (n, C, h, w) float32 features."""
        on_cuda = x.device.type == "cuda"
        amp = AMP_DTYPES[self.cfg.amp_dtype] if on_cuda else None
        if on_cuda and self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self.net
        if on_cuda and self.cfg.compile:
            if self._compiled is None:
                self._compiled = torch.compile(self.net, dynamic=False)
            net = self._compiled
        with torch.autocast(device_type=x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = net(x)
        return out.float()

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 RGB (N, 3, H, W) -> (features float32 (N, C, h, w), network input size (H', W')).

        Materialises the low-resolution map of all N images; use for tools and tests.
        """
        with torch.inference_mode():
            x = preprocess(images.to(self.device), self.cfg.resize_fit, method=self.cfg.resize_method)
            return self._run_net(x), tuple(x.shape[-2:])

    def forward(self, images: torch.Tensor, proj_batch: torch.Tensor, proj_cam: torch.Tensor,
                proj_rowcol: torch.Tensor, sync_free: bool = False) -> torch.Tensor:
        """images uint8 (B, 6, 3, H, W) RGB; proj_batch, proj_cam (M,) int64; proj_rowcol (M, 2) int64 (row, col)
        in original pixels. Returns float32 (M, C) on the images' device, in projection order.

        Images go through the network ``chunk`` at a time and are sampled before the next chunk, so no
        full-resolution map and at most one chunk of low-resolution maps exist at once.

        ``sync_free=False`` (tools, tests): projections outside the batch raise ValueError, and only images
        that own at least one projection are run. ``sync_free=True`` (the training step): no host-device
        synchronisation: the range check is a device-side assert, every image of the batch is run (in
        nuScenes every camera sees LiDAR points), and each chunk's values are selected with ``where``.
        Both give the same targets.
        """
        if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"LiveTeacher: images must be uint8 (B, 6, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        b, ncam, _, h, w = images.shape
        m = proj_batch.shape[0]
        if proj_cam.shape != (m,) or proj_rowcol.shape != (m, 2) or proj_batch.dim() != 1:
            raise ValueError(f"LiveTeacher: projection shapes disagree: proj_batch {tuple(proj_batch.shape)}, "
                             f"proj_cam {tuple(proj_cam.shape)}, proj_rowcol {tuple(proj_rowcol.shape)}")
        dev = self.device
        out = torch.zeros(m, self.out_channels, dtype=torch.float32, device=dev)
        if m == 0:
            return out
        pb, pc, rc = proj_batch.to(dev).long(), proj_cam.to(dev).long(), proj_rowcol.to(dev).long()
        bad = (pb < 0) | (pb >= b) | (pc < 0) | (pc >= ncam) | (rc[:, 0] < 0) | (rc[:, 0] >= h) \
            | (rc[:, 1] < 0) | (rc[:, 1] >= w)
        img_id = pb * ncam + pc
        flat = images.reshape(b * ncam, 3, h, w)
        if sync_free:
            torch._assert_async(~bad.any(), "LiveTeacher: projection(s) outside the batch/images")
            return self._forward_all(flat, img_id, rc, out, (h, w))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"LiveTeacher: {int(bad.sum())} projection(s) outside the batch/images "
                             f"(B={b}, cams={ncam}, H={h}, W={w}); first: batch {int(pb[i])}, cam {int(pc[i])}, "
                             f"rowcol {rc[i].tolist()}")
        used = torch.unique(img_id)                        # sorted image ids with >= 1 projection
        chunk = int(self.cfg.chunk) or used.numel()
        net_hw = rescale_size((h, w), self.cfg.resize_fit)
        with torch.inference_mode():
            for start in range(0, used.numel(), chunk):
                ids = used[start:start + chunk]
                x = preprocess(flat[ids.to(flat.device)].to(dev), self.cfg.resize_fit,
                               method=self.cfg.resize_method)
                feats = self._run_net(x)                   # (n, C, h', w')
                local = torch.full((b * ncam,), -1, dtype=torch.long, device=dev)
                local[ids] = torch.arange(ids.numel(), device=dev)
                sel = torch.nonzero(local[img_id] >= 0).flatten()
                li = local[img_id[sel]]
                if self.cfg.sampler == "exact":
                    vals = self._exact(feats, li, rc[sel], net_hw, (h, w))
                else:
                    vals = sample_grid(feats, li, rc[sel], (h, w))
                out[sel] = vals
        return out

    def _forward_all(self, flat: torch.Tensor, img_id: torch.Tensor, rc: torch.Tensor, out: torch.Tensor,
                     hw: tuple[int, int]) -> torch.Tensor:
        """Sync-free forward: flat (N, 3, H, W) uint8, img_id (M,), rc (M, 2) -> out (M, C) filled."""
        n_img = flat.shape[0]
        chunk = int(self.cfg.chunk) or n_img
        net_hw = rescale_size(hw, self.cfg.resize_fit)
        with torch.inference_mode():
            for start in range(0, n_img, chunk):
                stop = min(start + chunk, n_img)
                x = preprocess(flat[start:stop].to(self.device), self.cfg.resize_fit,
                               method=self.cfg.resize_method)
                feats = self._run_net(x)                   # (n, C, h', w')
                li = (img_id - start).clamp(0, stop - start - 1)
                if self.cfg.sampler == "exact":
                    vals = self._exact(feats, li, rc, net_hw, hw)
                else:
                    vals = sample_grid_dense(feats, li, rc, hw)
                if start == 0 and stop == n_img:               # one chunk holds every image
                    out.copy_(vals)                            # (out is a normal tensor, usable in autograd)
                else:
                    in_chunk = (img_id >= start) & (img_id < stop)
                    out.copy_(torch.where(in_chunk[:, None], vals, out))
        return out


def build_teacher(kind: str = "maskclip_plus", weights: str | None = None,
                  resize_fit: tuple[int, int] = DEFAULT_RESIZE_FIT, device: str | torch.device = "cpu",
                  dtype: str = "bfloat16", **cfg_kwargs) -> LiveTeacher:
    """Build the frozen teacher from a converted ``.safetensors`` (or RANDOM weights when ``weights`` is None).

    ``dtype`` is the CUDA autocast dtype (``bfloat16`` | ``float16`` | ``none``); weights stay fp32.
    Extra keyword arguments go to :class:`TeacherConfig` (chunk, sampler, fold_bn, channels_last, compile,
    random_arch = dict of DeepLabArch / open_clip vision sizes for random-weight builds).
    """
    cfg = TeacherConfig(kind=kind, weights=None if weights is None else str(weights), resize_fit=resize_fit,
                        amp_dtype=dtype, **cfg_kwargs)
    return build_teacher_from_config(cfg, device)


def build_teacher_from_config(cfg: TeacherConfig, device: str | torch.device = "cpu") -> LiveTeacher:
    """:func:`build_teacher` from a validated :class:`TeacherConfig`."""
    device = torch.device(device)
    if cfg.weights is not None and not os.path.isfile(cfg.weights):
        raise CheckpointError(f"teacher.weights: {cfg.weights}: no such file (convert the released checkpoint "
                              f"with scripts/convert_weights.py, or set teacher.weights: null for random weights)")
    if cfg.weights is None:
        warn_meaningless(f"TEACHER WITH RANDOM WEIGHTS ({cfg.kind}): no weights file given. The distillation "
                         "targets are MEANINGLESS; convert the released checkpoint and set teacher.weights for "
                         "real training.", log)
    if cfg.kind == "maskclip_plus":
        from teacher.checkpoint import load_maskclip_plus
        from teacher.deeplab import DeepLabArch, MaskClipPlusDeepLab

        if cfg.weights is None:
            net = MaskClipPlusDeepLab(DeepLabArch(**cfg.random_arch)).eval()
            if cfg.fold_bn:
                net.fold_batchnorm()
        else:
            net = load_maskclip_plus(cfg.weights, fold_bn=cfg.fold_bn)
    else:
        from teacher.vit import build_maskclip_vit

        net = build_maskclip_vit(cfg.weights, model_cfg=cfg.random_arch or None)
    net = net.to(device).eval()
    if device.type == "cuda" and cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return LiveTeacher(net, cfg)
