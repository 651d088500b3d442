"""A loader-shaped training batch of one sample without shards: random images and LiDAR points seen by a
ring of six cameras, with their projections (tests/test_sync_count.py, benchmarks/gpu_suite.py)."""
from __future__ import annotations

import math

import torch


def camera_ring(h: int, w: int, n: int = 6) -> torch.Tensor:
    """(1, n, 4, 4) lidar2img of n outward cameras 1.5 m above the LiDAR, focal w/2, for (h, w) images."""
    mats = []
    for i in range(n):
        yaw = 2 * math.pi * i / n
        fwd = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
        right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])
        rot = torch.stack([right, torch.tensor([0.0, 0.0, -1.0]), fwd])
        ext = torch.eye(4)
        ext[:3, :3], ext[:3, 3] = rot, -rot @ torch.tensor([0.0, 0.0, 1.5])
        k = torch.eye(4)
        k[0, 0] = k[1, 1] = w / 2
        k[0, 2], k[1, 2] = w / 2, h / 2
        mats.append(k @ ext)
    return torch.stack(mats)[None]


def make_batch(cfg, seed: int = 0, h: int = 90, w: int = 160, n_points: int = 400) -> dict:
    """A loader-shaped batch of one sample: random images and points, their projections into the rig."""
    g = torch.Generator().manual_seed(seed)
    lidar2img = camera_ring(h, w)
    r = 3 + 40 * torch.rand(n_points, generator=g)
    th = 2 * math.pi * torch.rand(n_points, generator=g)
    pts = torch.stack([r * th.cos(), r * th.sin(), -1.5 + 2 * torch.rand(n_points, generator=g)], 1)
    cam = torch.einsum("nij,pj->npi", lidar2img[0], torch.cat([pts, torch.ones(n_points, 1)], 1))
    uv = cam[..., :2] / cam[..., 2:3].clamp(min=1e-5)
    ok = (cam[..., 2] > 0.1) & (uv[..., 0] >= 0) & (uv[..., 0] < w) & (uv[..., 1] >= 0) & (uv[..., 1] < h)
    proj_cam, proj_point = ok.nonzero(as_tuple=True)
    rowcol = uv[proj_cam, proj_point].flip(-1).long()
    m = cfg.model
    lo = torch.tensor(m.pc_range[:3])
    size = torch.tensor([m.tpv_w, m.tpv_h, m.tpv_z], dtype=torch.float32)
    vs = (torch.tensor(m.pc_range[3:]) - lo) / size
    grid_ind = ((pts.clamp(lo, torch.tensor(m.pc_range[3:]) - 1e-3) - lo) / vs).float()
    occ = torch.zeros(1, m.tpv_w, m.tpv_h, m.tpv_z, dtype=torch.uint8)
    ijk = grid_ind.long()
    occ[0, ijk[:, 0], ijk[:, 1], ijk[:, 2]] = 1
    occ[0, :2, :2] = 255
    return {"tokens": [f"tok{seed}"], "img_hw": (h, w),
            "images": torch.randint(0, 256, (1, 6, 3, h, w), dtype=torch.uint8, generator=g),
            "lidar2img": lidar2img, "points": [torch.cat([pts, torch.zeros(n_points, 1)], 1)],
            "grid_ind": [grid_ind], "proj_batch": torch.zeros_like(proj_cam), "proj_cam": proj_cam,
            "proj_point": proj_point, "proj_rowcol": rowcol, "occupancy": occ, "labels": None,
            "labels_raw": None, "voxel_label": None, "eval_gt": None}


def merge_batches(batches: list[dict]) -> dict:
    """Single-sample batches of :func:`make_batch` -> one batch of B samples, laid out as the loader's collate
    does (stacked tensors, per-sample lists, projections concatenated with their sample index), with the
    training loader's ``n_proj`` and, where every part has one, ``photometric`` (B, 6, 8)."""
    out = {"tokens": [t for b in batches for t in b["tokens"]], "img_hw": batches[0]["img_hw"],
           "labels": None, "labels_raw": None, "voxel_label": None, "eval_gt": None}
    for key in ("images", "lidar2img", "occupancy"):
        out[key] = torch.cat([b[key] for b in batches])
    for key in ("points", "grid_ind"):
        out[key] = [x for b in batches for x in b[key]]
    for key in ("proj_cam", "proj_point", "proj_rowcol"):
        out[key] = torch.cat([b[key] for b in batches])
    out["proj_batch"] = torch.cat([torch.full_like(b["proj_cam"], i) for i, b in enumerate(batches)])
    out["n_proj"] = [int(b["proj_cam"].shape[0]) for b in batches]
    if all("photometric" in b for b in batches):
        out["photometric"] = torch.cat([b["photometric"] for b in batches])
    return out
