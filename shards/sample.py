"""One raw shard sample -> per-sample tensors (decode + geometry), and a list of them -> the batch dict.

Decoding: JPEG -> uint8 RGB (3, H, W) with OpenCV (``cv2.imdecode`` + BGR->RGB), the library
``mmcv.imread`` used in the original, so the pixels are the original's with the channels flipped. PIL and
``torchvision.io.decode_jpeg`` are libjpeg-turbo too and gave bit-identical pixels on the test images, but
were slower (benchmarks/bench_loading.py). OpenCV comes with nuscenes-devkit (``opencv-python``).

The evaluation GT (``eval_gt``, ``voxel_label``) is read from the shard where it is stored for the requested
grid (schema 3) and computed otherwise (:mod:`shards.evalgt`, one log line per process saying so).

Every sample is verified before it is decoded (:func:`shards.verify.verify_sample`); the batch layout is
``docs/architecture.md``'s (:data:`BATCH_KEYS`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from p3d_common.labels import RAW_TO_NOIGNORE
from shards.errors import ShardReadError
from shards.evalgt import eval_targets, stored_eval_targets
from shards.geometry import (
    GridSpec,
    grid_indices,
    lidar_to_image,
    map_labels,
    occupancy_target,
    project_all_cameras,
)
from shards.schema import CAMERA_FIELDS, decode_arrays
from shards.verify import verify_sample

#: The paper's voxel volume (100 x 100 x 8 over [-51.2, 51.2]^2 x [-5, 3] m).
DEFAULT_GRID = GridSpec()

#: Keys of the batch dict (docs/architecture.md), in documentation order.
BATCH_KEYS: tuple[str, ...] = (
    "tokens",
    "images",
    "lidar2img",
    "img_hw",
    "points",
    "grid_ind",
    "labels",
    "labels_raw",
    "occupancy",
    "voxel_label",
    "eval_gt",
    "lidar2ego",
    "proj_batch",
    "proj_cam",
    "proj_point",
    "proj_rowcol",
)


def decode_jpeg_rgb(data: bytes, where: str = "") -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W) RGB tensor (OpenCV ``imdecode`` + BGR->RGB, as ``mmcv.imread``)."""
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ShardReadError(f"{where}: JPEG cannot be decoded ({len(data)} bytes)")
    return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)


def compute_targets(
    points: np.ndarray,
    lidarseg: np.ndarray | None,
    cam_intrinsic: np.ndarray,
    lidar2cam: np.ndarray,
    img_hw: tuple[int, int],
    grid: GridSpec = DEFAULT_GRID,
    with_eval_gt: bool = True,
    stored: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray | None]:
    """Geometry of one sample (numpy; all rules in :mod:`shards.geometry`).

    Args:
        points: float32 (N, 4) x, y, z, intensity in the LiDAR frame.
        lidarseg: uint8 (N,) raw ids or None.
        cam_intrinsic: (6, 3, 3); lidar2cam: (6, 4, 4); img_hw: (H, W).
        grid: voxel volume.
        with_eval_gt: compute the evaluation targets: the ray-cast GT (~3.4M ray samples) and
            ``voxel_label``; both stay None without it (training samples).
        stored: (voxel_label, eval_gt) read from the shard for ``grid`` (schema 3): used instead of
            computing them (:mod:`shards.evalgt`).

    Returns:
        dict: ``lidar2img`` float32 (6, 4, 4); ``proj_cam``/``proj_point`` int64 (M,); ``proj_rowcol``
        int64 (M, 2); ``grid_ind`` float32 (N, 3); ``occupancy`` uint8 (X, Y, Z); ``labels`` int64 (N,) or
        None; ``voxel_label`` uint8 (X, Y, Z) or None; ``eval_gt`` uint8 (X, Y, Z) or None.
    """
    lidar2img = np.stack([lidar_to_image(k, t) for k, t in zip(cam_intrinsic, lidar2cam)]).astype(np.float32)
    cam, pidx, rowcol = project_all_cameras(points, lidar2cam, cam_intrinsic, img_hw)
    g64 = grid_indices(points, grid, np.float64)
    out: dict[str, np.ndarray | None] = {
        "lidar2img": lidar2img,
        "proj_cam": cam,
        "proj_point": pidx,
        "proj_rowcol": rowcol,
        "grid_ind": g64.astype(np.float32),
        "occupancy": occupancy_target(g64, grid),
        "labels": None,
        "voxel_label": None,
        "eval_gt": None,
    }
    if lidarseg is not None:
        labels = map_labels(lidarseg, RAW_TO_NOIGNORE)
        out["labels"] = labels.astype(np.int64)
        if with_eval_gt:  # evaluation targets only: training never reads them (voxel_label ~16 ms/sample)
            vl_eg = stored if stored is not None else eval_targets(points, labels, grid, g64)
            out["voxel_label"], out["eval_gt"] = vl_eg
    return out


def process_sample(
    fields: dict[str, Any], grid: GridSpec = DEFAULT_GRID, with_eval_gt: bool = True
) -> dict[str, Any]:
    """Raw WebDataset sample (``{field: bytes}``) -> per-sample tensors (inputs of :func:`collate`)."""
    verify_sample(fields)  # checksums of every member before any decode (names shard, key, member)
    url, key = fields.get("__url__", "?"), fields.get("__key__", "?")
    d = decode_arrays(fields)
    h, w = (int(x) for x in d["meta"]["img_hw"])
    images = torch.stack([decode_jpeg_rgb(b, f"{url}: sample {key}: member {CAMERA_FIELDS[c]}")
                          for c, b in enumerate(d["jpegs"])])
    if tuple(images.shape[-2:]) != (h, w):
        raise ShardReadError(f"{url}: sample {key}: decoded images {tuple(images.shape)} != meta img_hw {(h, w)}")
    pts = d["points"]
    seg = d["lidarseg"]
    if seg is not None and seg.shape != (pts.shape[0],):
        raise ShardReadError(f"{url}: sample {key}: {seg.shape[0]} labels for {pts.shape[0]} points")
    stored = stored_eval_targets(fields, d["meta"], grid) if with_eval_gt and seg is not None else None
    t = compute_targets(pts, seg, d["cam_intrinsic"], d["lidar2cam"], (h, w), grid, with_eval_gt, stored)

    def tt(x: np.ndarray | None) -> torch.Tensor | None:
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x))

    return {
        "token": d["token"],
        "image": images,
        "img_hw": (h, w),
        "points": torch.from_numpy(pts),
        "labels_raw": tt(seg),
        "lidar2ego": tt(d["lidar2ego"]),
        **{k: tt(v) for k, v in t.items()},
    }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sample dicts of :func:`process_sample` -> the batch dict (keys :data:`BATCH_KEYS`).

    Shapes: ``images`` uint8 (B, 6, 3, H, W); ``lidar2img`` float32 (B, 6, 4, 4); ``img_hw`` (H, W);
    ``points``/``grid_ind``/``labels``/``labels_raw``: lists of B tensors (N_b, 4)/(N_b, 3)/(N_b,)/(N_b,)
    (labels None where the split has no lidarseg); ``occupancy``/``voxel_label``/``eval_gt`` uint8
    (B, X, Y, Z) (the last two may be None); ``lidar2ego`` float64 (B, 4, 4) or None (schema-2 shards);
    ``proj_batch``/``proj_cam``/``proj_point`` int64 (M,),
    ``proj_rowcol`` int64 (M, 2), concatenated sample by sample.
    """
    if not samples:
        raise ValueError("collate: empty batch")
    hw = {s["img_hw"] for s in samples}
    if len(hw) != 1:
        raise ValueError(f"collate: samples of different image sizes {sorted(hw)} cannot be batched")

    def all_or_none(key: str) -> list[torch.Tensor] | None:
        vals = [s[key] for s in samples]
        if all(v is None for v in vals):
            return None
        if any(v is None for v in vals):
            raise ValueError(f"collate: {key} present for some samples only: {[s['token'] for s in samples]}")
        return vals

    def stack_or_none(key: str) -> torch.Tensor | None:
        vals = all_or_none(key)
        return None if vals is None else torch.stack(vals)

    return {
        "tokens": [s["token"] for s in samples],
        "images": torch.stack([s["image"] for s in samples]),
        "lidar2img": torch.stack([s["lidar2img"] for s in samples]),
        "img_hw": hw.pop(),
        "points": [s["points"] for s in samples],
        "grid_ind": [s["grid_ind"] for s in samples],
        "labels": all_or_none("labels"),
        "labels_raw": all_or_none("labels_raw"),
        "occupancy": torch.stack([s["occupancy"] for s in samples]),
        "voxel_label": stack_or_none("voxel_label"),
        "eval_gt": stack_or_none("eval_gt"),
        "lidar2ego": stack_or_none("lidar2ego"),
        "proj_batch": torch.cat(
            [torch.full((len(s["proj_point"]),), b, dtype=torch.int64) for b, s in enumerate(samples)]
        ),
        "proj_cam": torch.cat([s["proj_cam"] for s in samples]),
        "proj_point": torch.cat([s["proj_point"] for s in samples]),
        "proj_rowcol": torch.cat([s["proj_rowcol"] for s in samples]),
    }
