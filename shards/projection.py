"""Calibration chains and LiDAR-to-pixel projection of POP-3D (pipeline.md 1.4 and 2).

Pure, vectorised numpy functions in float64: LiDAR -> ego(t_lidar) -> global -> ego(t_cam) -> camera -> pixels;
a point is kept when ``depth > 1 m`` and ``0 < u < W - 1`` and ``0 < v < H - 1`` (strict), pixel
``(row, col) = round(v, u)``. :mod:`shards.geometry` re-exports every public name (one import for the data
geometry). Shapes use N for points and M for kept projections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "lidar_to_camera",
    "lidar_to_image",
    "project_all_cameras",
    "project_points",
    "quaternion_to_matrix",
    "transform_matrix",
]


def _as_points(xyz: np.ndarray, name: str) -> np.ndarray:
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] < 3:
        raise ValueError(f"{name}: expected points of shape (N, 3) (or (N, >=3)), got {xyz.shape}")
    return xyz[:, :3].astype(np.float64, copy=False)


# ----------------------------------------------------------------------------------------------------------
# Calibration chains (pipeline.md 1.4 and 2)
# ----------------------------------------------------------------------------------------------------------


def quaternion_to_matrix(rotation_wxyz: Sequence[float]) -> np.ndarray:
    """Rotation matrix of a (w, x, y, z) quaternion (normalised first, like pyquaternion).

    Args:
        rotation_wxyz: (4,) quaternion, scalar first (the nuScenes convention).

    Returns:
        (3, 3) float64.
    """
    q = np.asarray(rotation_wxyz, dtype=np.float64)
    if q.shape != (4,):
        raise ValueError(f"quaternion_to_matrix: expected a (w, x, y, z) quaternion, got shape {q.shape}")
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError(f"quaternion_to_matrix: degenerate quaternion {q.tolist()}")
    w, x, y, z = q / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ],
        dtype=np.float64,
    )


def transform_matrix(
    translation: Sequence[float], rotation_wxyz: Sequence[float], inverse: bool = False
) -> np.ndarray:
    """Homogeneous transform of a nuScenes pose / calibration record.

    Args:
        translation: (3,) metres.
        rotation_wxyz: (4,) quaternion (w, x, y, z).
        inverse: return the inverse transform ``[R^T | -R^T t]``.

    Returns:
        (4, 4) float64 mapping child-frame points to the parent frame (or back when ``inverse``).
    """
    t = np.asarray(translation, dtype=np.float64)
    if t.shape != (3,):
        raise ValueError(f"transform_matrix: expected a (3,) translation, got shape {t.shape}")
    rot = quaternion_to_matrix(rotation_wxyz)
    out = np.eye(4, dtype=np.float64)
    if inverse:
        out[:3, :3] = rot.T
        out[:3, 3] = -rot.T @ t
    else:
        out[:3, :3] = rot
        out[:3, 3] = t
    return out


def _record_tf(record: Mapping, name: str, inverse: bool) -> np.ndarray:
    try:
        return transform_matrix(record["translation"], record["rotation"], inverse=inverse)
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"lidar_to_camera: {name} record needs 'translation' and 'rotation', got {record!r}"
        ) from exc


def lidar_to_camera(lidar_cs: Mapping, lidar_pose: Mapping, cam_pose: Mapping, cam_cs: Mapping) -> np.ndarray:
    """LiDAR frame -> camera frame, with ego motion between the two timestamps (the devkit chain).

    lidar -> ego(t_lidar) [lidar calibrated_sensor] -> global [ego_pose of the lidar sample_data]
    -> ego(t_cam) [inverse ego_pose of the camera sample_data] -> camera [inverse camera calibrated_sensor],
    exactly ``NuScenesExplorer.map_pointcloud_to_image``.

    Args:
        lidar_cs, lidar_pose, cam_pose, cam_cs: nuScenes records with 'translation' (3,) and
            'rotation' (4,) (w, x, y, z).

    Returns:
        (4, 4) float64.
    """
    return (
        _record_tf(cam_cs, "camera calibrated_sensor", True)
        @ _record_tf(cam_pose, "camera ego_pose", True)
        @ _record_tf(lidar_pose, "lidar ego_pose", False)
        @ _record_tf(lidar_cs, "lidar calibrated_sensor", False)
    )


def _check_k(K: np.ndarray, name: str) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"{name}: expected a (3, 3) camera intrinsic matrix, got shape {K.shape}")
    return K


def _check_tf(T: np.ndarray, name: str) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f"{name}: expected a (4, 4) transform, got shape {T.shape}")
    return T


def lidar_to_image(K: np.ndarray, lidar2cam: np.ndarray) -> np.ndarray:
    """``K4 @ lidar2cam``: LiDAR points to (u*d, v*d, d, 1), K4 = 4x4 identity with K top-left.

    Args:
        K: (3, 3) camera intrinsics.
        lidar2cam: (4, 4) LiDAR -> camera transform.

    Returns:
        (4, 4) float64.
    """
    K4 = np.eye(4, dtype=np.float64)
    K4[:3, :3] = _check_k(K, "lidar_to_image")
    return K4 @ _check_tf(lidar2cam, "lidar_to_image")


def _project_uvd(
    xyz: np.ndarray, lidar2cam: np.ndarray, K: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuous pixel coordinates (u, v) and depth d of every point: (N,), (N,), (N,) float64."""
    cam = xyz @ lidar2cam[:3, :3].T + lidar2cam[:3, 3]
    pix = cam @ K.T  # (N, 3) = (u d, v d, d) for the standard K (last row 0 0 1), as view_points
    depth = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = pix[:, 0] / pix[:, 2]
        v = pix[:, 1] / pix[:, 2]
    return u, v, depth


def project_points(
    xyz: np.ndarray,
    lidar2cam: np.ndarray,
    K: np.ndarray,
    img_hw: tuple[int, int] = (900, 1600),
    min_depth: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Project LiDAR points into one camera with the original POP-3D visibility rule (pipeline.md 2).

    Kept: ``depth > min_depth`` and ``0 < u < W - 1`` and ``0 < v < H - 1`` (strict). The pixel is
    ``(row, col) = np.round((v, u))`` (round half to even, as the original ``np.round``).

    Args:
        xyz: (N, 3) or (N, >=3) points in the LiDAR frame.
        lidar2cam: (4, 4) LiDAR -> camera transform (``lidar_to_camera``).
        K: (3, 3) camera intrinsics.
        img_hw: (H, W) of the original image.
        min_depth: metres; points at or closer than this are dropped.

    Returns:
        point_idx: int64 (M,) ascending indices into ``xyz``;
        rowcol: int64 (M, 2) pixel (row, col) in the original image.
    """
    p = _as_points(xyz, "project_points")
    T = _check_tf(lidar2cam, "project_points")
    K = _check_k(K, "project_points")
    H, W = int(img_hw[0]), int(img_hw[1])
    u, v, depth = _project_uvd(p, T, K)
    with np.errstate(invalid="ignore"):
        mask = (depth > min_depth) & (u > 0) & (u < W - 1) & (v > 0) & (v < H - 1)
    point_idx = np.flatnonzero(mask).astype(np.int64)
    rowcol = np.round(np.stack([v[point_idx], u[point_idx]], axis=1)).astype(np.int64)
    return point_idx, rowcol


def project_all_cameras(
    xyz: np.ndarray,
    lidar2cams: np.ndarray,
    Ks: np.ndarray,
    img_hw: tuple[int, int] = (900, 1600),
    min_depth: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``project_points`` for every camera, concatenated camera by camera (points ascending per camera).

    Args:
        xyz: (N, 3) or (N, >=3) points in the LiDAR frame.
        lidar2cams: (C, 4, 4) LiDAR -> camera transforms, in ``CAMERAS`` order.
        Ks: (C, 3, 3) intrinsics.
        img_hw: (H, W), shared by all cameras.
        min_depth: metres.

    Returns:
        cam_idx: int64 (M,) camera index; point_idx: int64 (M,); rowcol: int64 (M, 2).
    """
    T = np.asarray(lidar2cams, dtype=np.float64)
    K = np.asarray(Ks, dtype=np.float64)
    if T.ndim != 3 or T.shape[1:] != (4, 4) or K.shape != (T.shape[0], 3, 3):
        raise ValueError(
            f"project_all_cameras: expected lidar2cams (C, 4, 4) and Ks (C, 3, 3), got {T.shape} and {K.shape}"
        )
    p = _as_points(xyz, "project_all_cameras")
    cams, pts, pix = [], [], []
    for c in range(T.shape[0]):
        idx, rc = project_points(p, T[c], K[c], img_hw, min_depth)
        cams.append(np.full(idx.shape[0], c, dtype=np.int64))
        pts.append(idx)
        pix.append(rc)
    if not cams:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    return np.concatenate(cams), np.concatenate(pts), np.concatenate(pix)
