"""Data geometry of POP-3D: voxel grid and voxel targets here; calibration chains and LiDAR-to-pixel projection
in :mod:`shards.projection`, re-exported here.

Everything here is a pure, vectorised numpy function (no Python loop over points). Transforms are
computed in float64. The rules reproduce the original POP-3D code (``generate_projections_nuscenes.py``
and ``dataloader/dataset_wrapper.py``), as documented in ``docs`` / ``pipeline.md`` sections 1.2 and 1.4-2:

* projection: lidar -> ego(t_lidar) -> global -> ego(t_cam) -> camera -> pixels, a point is kept when
  ``depth > 1 m`` and ``0 < u < W - 1`` and ``0 < v < H - 1`` (strict), pixel ``(row, col) = round(v, u)``;
* voxel grid: 100 x 100 x 8 over [-51.2, 51.2]^2 x [-5, 3] m in the LiDAR frame, float index
  ``(clip(p, min, max - 1e-3) - min) / voxel_size`` (out-of-range points are pulled onto the border);
* targets: occupancy, semantic majority vote, ray-cast evaluation ground truth.

Shapes use N for points, M for kept projections, (X, Y, Z) for the grid size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p3d_common.labels import EMPTY_CLASS, IGNORE_LABEL
from shards.projection import (  # noqa: F401 (re-exported: the data geometry has one import)
    _as_points,
    lidar_to_camera,
    lidar_to_image,
    project_all_cameras,
    project_points,
    quaternion_to_matrix,
    transform_matrix,
)

__all__ = [
    "CAMERAS",
    "GridSpec",
    "flat_voxel_ids",
    "grid_indices",
    "lidar_to_camera",
    "lidar_to_image",
    "map_labels",
    "occupancy_target",
    "project_all_cameras",
    "project_points",
    "quaternion_to_matrix",
    "raycast_eval_gt",
    "transform_matrix",
    "voxel_coords",
    "voxel_majority_label",
]

# The mmdet3d info order the official model's ``cams_embeds`` were trained with (pipeline.md 1.2).
CAMERAS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)


def map_labels(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map raw lidarseg ids through a look-up table.

    Args:
        raw: integer array of any shape, values in ``[0, len(lut))`` (e.g. uint8 (N,) lidarseg labels).
        lut: (L,) look-up table, e.g. ``p3d_common.labels.RAW_TO_NOIGNORE`` or ``RAW_TO_AGNOSTIC``.

    Returns:
        array of ``raw``'s shape with ``lut``'s dtype.
    """
    raw = np.asarray(raw)
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        raise TypeError(f"map_labels: labels must be integers, got dtype {raw.dtype}")
    if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
        raise ValueError(
            f"map_labels: label values must lie in [0, {len(lut) - 1}], got [{raw.min()}, {raw.max()}]"
        )
    return np.asarray(lut)[raw]


# ----------------------------------------------------------------------------------------------------------
# Grid (pipeline.md 1.6)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridSpec:
    """The voxel volume in the LiDAR frame: bounds in metres and the number of voxels per axis (x, y, z)."""

    pc_min: tuple[float, float, float] = (-51.2, -51.2, -5.0)
    pc_max: tuple[float, float, float] = (51.2, 51.2, 3.0)
    size: tuple[int, int, int] = (100, 100, 8)

    def __post_init__(self) -> None:
        lo, hi, n = np.asarray(self.pc_min, float), np.asarray(self.pc_max, float), np.asarray(self.size)
        if lo.shape != (3,) or hi.shape != (3,) or n.shape != (3,):
            raise ValueError(f"GridSpec: pc_min, pc_max and size must have 3 entries, got {self}")
        if not np.all(hi > lo) or not np.all(n > 0):
            raise ValueError(f"GridSpec: need pc_max > pc_min and size > 0, got {self}")

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """(3,) voxel edge lengths in metres, ``(max - min) / size`` = (1.024, 1.024, 1.0) by default."""
        v = (np.asarray(self.pc_max, np.float64) - np.asarray(self.pc_min, np.float64)) / np.asarray(
            self.size
        )
        return (float(v[0]), float(v[1]), float(v[2]))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) as plain ints."""
        return (int(self.size[0]), int(self.size[1]), int(self.size[2]))


def grid_indices(xyz: np.ndarray, grid: GridSpec = GridSpec(), dtype: np.dtype = np.float32) -> np.ndarray:
    """Float voxel index of every point, out-of-range points clipped onto the border voxels.

    ``g = (clip(p, pc_min, pc_max - 1e-3) - pc_min) / voxel_size``, so ``g`` lies in ``[0, size)``.
    Computed in float64 exactly as the original ``Voxelize`` (which kept float64 up to the collate).
    The default return dtype is float32 (what the batch carries); pass ``dtype=np.float64`` for the
    original's bit-exact values. Note: casting to float32 can move a value lying within ~1e-5 voxel of a
    voxel boundary onto the boundary, so integer voxel coordinates for targets should be taken from the
    float64 result (``occupancy_target`` & co. accept both).

    Args:
        xyz: (N, 3) or (N, >=3) points in the LiDAR frame (extra columns are ignored).
        grid: the volume.
        dtype: output dtype.

    Returns:
        (N, 3) float voxel indices along (x, y, z).
    """
    p = _as_points(xyz, "grid_indices")
    lo = np.asarray(grid.pc_min, np.float64)
    hi = np.asarray(grid.pc_max, np.float64)
    interval = (hi - lo) / np.asarray(grid.size)
    g = (np.clip(p, lo, hi - 1e-3) - lo) / interval
    return g.astype(dtype, copy=False)


def voxel_coords(grid_ind: np.ndarray, grid: GridSpec = GridSpec()) -> np.ndarray:
    """Integer voxel coordinates ``floor(grid_ind)``, checked to lie inside the grid.

    Args:
        grid_ind: (N, 3) float voxel indices (``grid_indices``) or integer coordinates.
        grid: the volume.

    Returns:
        (N, 3) int64.
    """
    g = np.asarray(grid_ind)
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"voxel_coords: expected grid indices of shape (N, 3), got {g.shape}")
    ijk = np.floor(g).astype(np.int64) if np.issubdtype(g.dtype, np.floating) else g.astype(np.int64)
    if ijk.size and (ijk.min() < 0 or np.any(ijk.max(axis=0) >= np.asarray(grid.shape))):
        raise ValueError(
            f"voxel_coords: voxel indices outside the grid {grid.shape}: min {ijk.min(axis=0)}, "
            f"max {ijk.max(axis=0)} (use grid_indices, which clips)"
        )
    return ijk


def flat_voxel_ids(grid_ind: np.ndarray, grid: GridSpec = GridSpec()) -> np.ndarray:
    """C-order flat voxel id ``(i * Y + j) * Z + k`` of every point.

    Args:
        grid_ind: (N, 3) float voxel indices or integer coordinates.
        grid: the volume.

    Returns:
        (N,) int64 in ``[0, X * Y * Z)``.
    """
    ijk = voxel_coords(grid_ind, grid)
    return np.ravel_multi_index((ijk[:, 0], ijk[:, 1], ijk[:, 2]), grid.shape).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Targets (pipeline.md 1.8)
# ----------------------------------------------------------------------------------------------------------


def occupancy_target(grid_ind: np.ndarray, grid: GridSpec = GridSpec()) -> np.ndarray:
    """Binary occupancy (1.8-1): 1 where a voxel holds at least one (clipped) point, else 0.

    Args:
        grid_ind: (N, 3) float voxel indices of ALL points (clipped, ``grid_indices``).
        grid: the volume.

    Returns:
        uint8 (X, Y, Z).
    """
    occ = np.zeros(int(np.prod(grid.shape)), dtype=np.uint8)
    occ[flat_voxel_ids(grid_ind, grid)] = 1
    return occ.reshape(grid.shape)


def _majority_into(out_flat: np.ndarray, vox: np.ndarray, labels: np.ndarray) -> None:
    """Write, for every voxel in ``vox``, the most frequent label (ties -> smallest label) into ``out_flat``."""
    if vox.size == 0:
        return
    key = vox * 256 + labels
    uniq, counts = np.unique(key, return_counts=True)  # sorted by (voxel, label)
    u_vox, u_lab = uniq // 256, uniq % 256
    # order: voxel ascending, count descending, label ascending -> the first entry of each voxel wins
    order = np.lexsort((u_lab, -counts, u_vox))
    u_vox, u_lab = u_vox[order], u_lab[order]
    first = np.ones(u_vox.shape[0], dtype=bool)
    first[1:] = u_vox[1:] != u_vox[:-1]
    out_flat[u_vox[first]] = u_lab[first]


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if lab.shape != (n,):
        raise ValueError(f"{name}: expected {n} labels of shape ({n},), got {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"{name}: labels must be integers, got dtype {lab.dtype}")
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise ValueError(f"{name}: labels must lie in [0, 255], got [{lab.min()}, {lab.max()}]")
    return lab.astype(np.int64)


def voxel_majority_label(
    grid_ind: np.ndarray, labels: np.ndarray, grid: GridSpec = GridSpec(), fill: int = EMPTY_CLASS
) -> np.ndarray:
    """Semantic voxel label (1.8-2): majority vote of the labels of the points in each voxel.

    The vote is the argmax of a 256-bin histogram per voxel, ties going to the smallest label id (as the
    original ``nb_process_label``; its uint16 counters would wrap past 65535 points of one label in one
    voxel, ours do not). Vectorised with ``np.unique`` on (voxel, label) keys. Voxels without points keep
    ``fill``.

    Args:
        grid_ind: (N, 3) float voxel indices of all points (clipped).
        labels: (N,) or (N, 1) integer labels in [0, 255] (noIgnore classes for the semantic GT).
        grid: the volume.
        fill: value of voxels without points (17 = empty).

    Returns:
        uint8 (X, Y, Z).
    """
    vox = flat_voxel_ids(grid_ind, grid)
    lab = _check_labels(labels, vox.shape[0], "voxel_majority_label")
    out = np.full(int(np.prod(grid.shape)), fill, dtype=np.uint8)
    _majority_into(out, vox, lab)
    return out.reshape(grid.shape)


def raycast_eval_gt(
    xyz: np.ndarray,
    labels_noignore: np.ndarray,
    grid: GridSpec = GridSpec(),
    n_samples: int = 100,
    chunk: int = 512,
) -> np.ndarray:
    """Ray-cast semantic evaluation ground truth (1.8-3).

    1. the grid starts at 255 (unobserved);
    2. only points strictly inside the volume on all three axes are kept (no clipping);
    3. their label 0 (ignore) becomes 255;
    4. every kept point p casts ``n_samples`` samples ``s * p``, ``s = linspace(0, 1, n_samples)`` (the ray
       from the LiDAR origin, endpoint included); each voxel hit by a sample becomes 17 (free);
    5. each voxel holding kept points gets the majority vote of their labels (255 takes part, ties to the
       smallest id), overwriting 17.

    The samples' voxels are computed per axis on (chunk, n_samples) float64 blocks with in-place ops and
    int32 flat ids (the same float64 arithmetic as :func:`grid_indices`: clip, subtract, divide, floor), and
    marked in a boolean grid: ~6x faster than building (chunk * n_samples, 3) sample arrays, same output.

    Args:
        xyz: (N, 3) or (N, >=3) points in the LiDAR frame.
        labels_noignore: (N,) noIgnore labels 0..16.
        grid: the volume.
        n_samples: samples per ray (100 in the original).
        chunk: points per vectorised block (bounds memory to ~chunk * n_samples * 12 bytes).

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

    interval = (hi - lo) / np.asarray(grid.size)
    top = hi - 1e-3                                   # grid_indices' clip bound
    nx, ny, nz = grid.shape
    strides = (ny * nz, nz, 1)
    free = np.zeros(nx * ny * nz, dtype=bool)
    id_dtype = np.int32 if nx * ny * nz < 2**31 else np.int64
    s = np.linspace(0, 1, n_samples)
    # s * p_a lies between 0 and p_a (s in [0, 1], monotone rounding), so the clip can only bind on an axis
    # whose samples reach below pc_min or above pc_max - 1e-3: skip it where it cannot (same values).
    needs_clip = [not (lo[a] <= min(0.0, p[:, a].min(initial=0.0)) and max(0.0, p[:, a].max(initial=0.0)) <= top[a])
                  for a in range(3)]
    for start in range(0, p.shape[0], chunk):
        pc = p[start : start + chunk]
        flat = None
        for a in range(3):
            t = np.multiply.outer(pc[:, a], s)        # (c, S) = s * p_a, as the original's broadcast product
            if needs_clip[a]:
                np.clip(t, lo[a], top[a], out=t)
            t -= lo[a]
            t /= interval[a]
            ia = t.astype(id_dtype)                   # t >= 0, so truncation is floor
            if strides[a] != 1:
                ia *= strides[a]
            flat = ia if flat is None else np.add(flat, ia, out=flat)
        free[flat.ravel()] = True
    out = np.full(nx * ny * nz, IGNORE_LABEL, dtype=np.uint8)
    out[free] = EMPTY_CLASS
    _majority_into(out, flat_voxel_ids(grid_indices(p, grid, np.float64), grid), lab)
    return out.reshape(grid.shape)
