"""The ray-cast evaluation GT as first written (one (chunk * n_samples, 3) sample array through
grid_indices / flat_voxel_ids): the reference the vectorised shards.geometry.raycast_eval_gt must equal."""
from __future__ import annotations

import numpy as np

from shards.geometry import (
    EMPTY_CLASS,
    IGNORE_LABEL,
    GridSpec,
    _as_points,
    _check_labels,
    _majority_into,
    flat_voxel_ids,
    grid_indices,
)


def raycast_eval_gt_reference(
    xyz: np.ndarray,
    labels_noignore: np.ndarray,
    grid: GridSpec = GridSpec(),  # noqa: B008
    n_samples: int = 100,
    chunk: int = 8192,
) -> np.ndarray:
    """Ray-cast semantic evaluation ground truth (1.8-3).

    1. the grid starts at 255 (unobserved);
    2. only points strictly inside the volume on all three axes are kept (no clipping);
    3. their label 0 (ignore) becomes 255;
    4. every kept point p casts ``n_samples`` samples ``s * p``, ``s = linspace(0, 1, n_samples)`` (the ray
       from the LiDAR origin, endpoint included); each voxel hit by a sample becomes 17 (free);
    5. each voxel holding kept points gets the majority vote of their labels (255 takes part, ties to the
       smallest id), overwriting 17.

    Args:
        xyz: (N, 3) or (N, >=3) points in the LiDAR frame.
        labels_noignore: (N,) noIgnore labels 0..16.
        grid: the volume.
        n_samples: samples per ray (100 in the original).
        chunk: points per vectorised chunk (bounds memory to ~chunk * n_samples * 24 bytes).

    Returns:
        uint8 (X, Y, Z): 1..16 occupied, 17 observed free, 255 unobserved / ignore majority.
    """
    p = _as_points(xyz, "raycast_eval_gt")
    lab = _check_labels(labels_noignore, p.shape[0], "raycast_eval_gt")
    lo = np.asarray(grid.pc_min, np.float64)
    hi = np.asarray(grid.pc_max, np.float64)
    keep = np.all((p > lo) & (p < hi), axis=1)
    p, lab = p[keep], lab[keep].copy()
    lab[lab == 0] = IGNORE_LABEL

    out = np.full(int(np.prod(grid.shape)), IGNORE_LABEL, dtype=np.uint8)
    s = np.linspace(0, 1, n_samples)
    for start in range(0, p.shape[0], chunk):
        samples = (s[None, :, None] * p[start : start + chunk, None, :]).reshape(-1, 3)
        out[flat_voxel_ids(grid_indices(samples, grid, np.float64), grid)] = EMPTY_CLASS
    _majority_into(out, flat_voxel_ids(grid_indices(p, grid, np.float64), grid), lab)
    return out.reshape(grid.shape)


