"""shards.geometry against float64 / brute-force Python references and the devkit's own helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nuscenes.utils.geometry_utils import transform_matrix as devkit_transform_matrix
from pyquaternion import Quaternion

from p3d_common.labels import CLASS_NAMES, RAW_TO_AGNOSTIC, RAW_TO_NOIGNORE
from shards.geometry import (
    CAMERAS,
    GridSpec,
    flat_voxel_ids,
    grid_indices,
    lidar_to_camera,
    lidar_to_image,
    map_labels,
    occupancy_target,
    project_all_cameras,
    project_points,
    quaternion_to_matrix,
    raycast_eval_gt,
    transform_matrix,
    voxel_majority_label,
)

GRID = GridSpec()


def _random_quat(rng: np.random.Generator) -> list[float]:
    q = rng.normal(size=4)
    return (q / np.linalg.norm(q)).tolist()


# --------------------------------------------------------------------------------------------------------
# constants and labels
# --------------------------------------------------------------------------------------------------------


def test_constants() -> None:
    assert CAMERAS == (
        "CAM_FRONT",
        "CAM_FRONT_RIGHT",
        "CAM_FRONT_LEFT",
        "CAM_BACK",
        "CAM_BACK_LEFT",
        "CAM_BACK_RIGHT",
    )
    assert GRID.size == (100, 100, 8)
    np.testing.assert_allclose(GRID.voxel_size, (1.024, 1.024, 1.0), rtol=0, atol=1e-12)
    assert len(CLASS_NAMES) == 18 and CLASS_NAMES[0] == "ignore" and CLASS_NAMES[17] == "empty"
    with pytest.raises(ValueError, match="GridSpec"):
        GridSpec(pc_min=(0, 0, 0), pc_max=(0, 1, 1))


def test_label_luts_follow_the_yaml_maps() -> None:
    expected = {
        9: 1,
        14: 2,
        15: 3,
        16: 3,
        17: 4,
        18: 5,
        21: 6,
        2: 7,
        3: 7,
        4: 7,
        6: 7,
        12: 8,
        22: 9,
        23: 10,
        24: 11,
        25: 12,
        26: 13,
        27: 14,
        28: 15,
        30: 16,
        32: 17,
    }
    for raw in range(33):
        assert RAW_TO_NOIGNORE[raw] == expected.get(raw, 0), raw
        assert RAW_TO_AGNOSTIC[raw] == (0 if raw == 32 else 1), raw
    assert RAW_TO_NOIGNORE.dtype == np.uint8 and RAW_TO_NOIGNORE.shape == (33,)
    raw = np.array([0, 17, 31, 24, 32], np.uint8)
    np.testing.assert_array_equal(map_labels(raw, RAW_TO_NOIGNORE), [0, 4, 0, 11, 17])
    np.testing.assert_array_equal(map_labels(raw, RAW_TO_AGNOSTIC), [1, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="map_labels"):
        map_labels(np.array([40]), RAW_TO_NOIGNORE)
    with pytest.raises(TypeError, match="map_labels"):
        map_labels(np.array([1.0]), RAW_TO_NOIGNORE)


# --------------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------------


def test_quaternion_and_transform_match_the_devkit() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = _random_quat(rng) if rng.random() < 0.8 else (3.0 * np.asarray(_random_quat(rng))).tolist()
        t = rng.normal(size=3) * 100
        np.testing.assert_allclose(quaternion_to_matrix(q), Quaternion(q).rotation_matrix, atol=1e-14)
        for inv in (False, True):
            ours = transform_matrix(t, q, inverse=inv)
            assert ours.dtype == np.float64 and ours.shape == (4, 4)
            np.testing.assert_allclose(
                ours, devkit_transform_matrix(t, Quaternion(q), inverse=inv), atol=1e-12
            )
    with pytest.raises(ValueError, match="quaternion"):
        quaternion_to_matrix([0, 0, 0, 0])
    with pytest.raises(ValueError, match="translation"):
        transform_matrix([1, 2], [1, 0, 0, 0])


def test_lidar_to_camera_is_the_devkit_step_chain() -> None:
    """The 4x4 chain equals the devkit's successive rotate/translate steps (float64 point cloud)."""
    rng = np.random.default_rng(1)
    recs = [
        {"translation": (rng.normal(size=3) * 10).tolist(), "rotation": _random_quat(rng)} for _ in range(4)
    ]
    lidar_cs, lidar_pose, cam_pose, cam_cs = recs
    pts = rng.normal(size=(3, 50)) * 20
    p = pts.copy()
    p = Quaternion(lidar_cs["rotation"]).rotation_matrix @ p + np.c_[lidar_cs["translation"]]
    p = Quaternion(lidar_pose["rotation"]).rotation_matrix @ p + np.c_[lidar_pose["translation"]]
    p = Quaternion(cam_pose["rotation"]).rotation_matrix.T @ (p - np.c_[cam_pose["translation"]])
    p = Quaternion(cam_cs["rotation"]).rotation_matrix.T @ (p - np.c_[cam_cs["translation"]])
    T = lidar_to_camera(lidar_cs, lidar_pose, cam_pose, cam_cs)
    np.testing.assert_allclose(T[:3, :3] @ pts + T[:3, 3:], p, atol=1e-9)
    with pytest.raises(ValueError, match="camera ego_pose"):
        lidar_to_camera(lidar_cs, lidar_pose, {"translation": [0, 0, 0]}, cam_cs)


def test_lidar_to_image_gives_homogeneous_pixels() -> None:
    rng = np.random.default_rng(2)
    K = np.array([[1260.0, 0, 800], [0, 1260.0, 450], [0, 0, 1]])
    T = transform_matrix(rng.normal(size=3), _random_quat(rng))
    L = lidar_to_image(K, T)
    x = np.c_[rng.normal(size=(20, 3)) * 10, np.ones(20)]
    cam = x @ T.T
    uvd = x @ L.T
    np.testing.assert_allclose(uvd[:, 2], cam[:, 2], atol=1e-9)
    np.testing.assert_allclose(uvd[:, :2] / uvd[:, 2:3], (cam[:, :3] @ K.T)[:, :2] / cam[:, 2:3], atol=1e-9)
    np.testing.assert_array_equal(uvd[:, 3], 1.0)


# --------------------------------------------------------------------------------------------------------
# projection rule
# --------------------------------------------------------------------------------------------------------


def test_project_points_rule_at_the_borders() -> None:
    """depth > 1, 0 < u < W-1, 0 < v < H-1 (strict), (row, col) = np.round((v, u)), points ascending."""
    H, W = 900, 1600
    K = np.array([[100.0, 0, 0], [0, 100.0, 0], [0, 0, 1]])  # u = 100 x / z, v = 100 y / z
    T = np.eye(4)

    def pt(u: float, v: float, z: float = 2.0) -> list[float]:
        return [u * z / 100.0, v * z / 100.0, z]

    cases = [
        (pt(0.0, 10), False),
        (pt(1e-6, 10), True),
        (pt(W - 1, 10), False),
        (pt(W - 1 - 1e-6, 10), True),
        (pt(10, 0.0), False),
        (pt(10, 1e-6), True),
        (pt(10, H - 1), False),
        (pt(10, H - 1 - 1e-6), True),
        (pt(10, 10, z=1.0), False),
        (pt(10, 10, z=1.0 + 1e-9), True),
        (pt(10, 10, z=-3.0), False),
        (pt(2.5, 3.5), True),
        (pt(0.5, 898.5), True),
        (pt(1598.49, 7.51), True),
        ([0.0, 0.0, 0.0], False),
    ]
    xyz = np.array([c[0] for c in cases])
    idx, rc = project_points(xyz, T, K, (H, W))
    assert idx.dtype == np.int64 and rc.dtype == np.int64 and rc.shape == (idx.size, 2)
    np.testing.assert_array_equal(idx, [i for i, (_, keep) in enumerate(cases) if keep])
    by_idx = dict(zip(idx.tolist(), rc.tolist()))
    assert by_idx[11] == [4, 2]  # round half to even, (row, col) = (3.5 -> 4, 2.5 -> 2)
    assert by_idx[12] == [898, 0]  # 898.5 -> 898, 0.5 -> 0
    assert by_idx[13] == [8, 1598]


def test_project_points_matches_a_float64_loop_reference() -> None:
    rng = np.random.default_rng(3)
    K = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]])
    T = transform_matrix(rng.normal(size=3), _random_quat(rng))
    xyz = rng.normal(size=(3000, 3)) * 15
    idx, rc = project_points(xyz.astype(np.float32), T, K)
    ref_idx, ref_rc = [], []
    for i, p in enumerate(xyz.astype(np.float32).astype(np.float64)):
        c = T[:3, :3] @ p + T[:3, 3]
        u, v, d = (K @ c)[0] / c[2], (K @ c)[1] / c[2], c[2]
        if d > 1.0 and 0 < u < 1599 and 0 < v < 899:
            ref_idx.append(i)
            ref_rc.append([round(v), round(u)])  # Python's round: half to even, like np.round
    assert len(ref_idx) > 50
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(rc, ref_rc)


def test_project_all_cameras_concatenates_camera_by_camera() -> None:
    rng = np.random.default_rng(4)
    xyz = rng.normal(size=(2000, 3)) * 20
    Ts = np.stack([transform_matrix(rng.normal(size=3), _random_quat(rng)) for _ in range(6)])
    Ks = np.stack([np.array([[1000.0 + c, 0, 800], [0, 1000.0 + c, 450], [0, 0, 1]]) for c in range(6)])
    cam, idx, rc = project_all_cameras(xyz, Ts, Ks, (900, 1600))
    start = 0
    for c in range(6):
        i_c, rc_c = project_points(xyz, Ts[c], Ks[c], (900, 1600))
        sl = slice(start, start + i_c.size)
        np.testing.assert_array_equal(cam[sl], c)
        np.testing.assert_array_equal(idx[sl], i_c)
        np.testing.assert_array_equal(rc[sl], rc_c)
        start += i_c.size
    assert start == cam.size
    with pytest.raises(ValueError, match="project_all_cameras"):
        project_all_cameras(xyz, Ts, Ks[:5])
    with pytest.raises(ValueError, match="project_points"):
        project_points(xyz[:, :2], Ts[0], Ks[0])


# --------------------------------------------------------------------------------------------------------
# grid and targets
# --------------------------------------------------------------------------------------------------------


def _ref_index(p: np.ndarray, grid: GridSpec = GRID) -> tuple[int, int, int]:
    """Python-float reference of the clipped integer voxel index."""
    out = []
    for a in range(3):
        lo, hi = grid.pc_min[a], grid.pc_max[a]
        interval = (hi - lo) / grid.size[a]
        x = min(max(float(p[a]), lo), hi - 1e-3)
        out.append(math.floor((x - lo) / interval))
    return tuple(out)


def test_grid_indices_clip_at_the_borders() -> None:
    pts = np.array(
        [
            [-51.2, -51.2, -5.0],  # exactly the minimum -> 0
            [51.2, 51.2, 3.0],  # exactly the maximum -> clipped to max - 1e-3
            [-100.0, 200.0, 50.0],  # far outside -> border voxels
            [0.0, 0.0, 0.0],
            [51.199, -51.199, 2.999],  # inside, just below the clip value
        ]
    )
    g64 = grid_indices(pts, GRID, dtype=np.float64)
    g32 = grid_indices(pts)
    assert g32.dtype == np.float32 and g64.dtype == np.float64 and g32.shape == (5, 3)
    top = (np.array([51.2, 51.2, 3.0]) - 1e-3 + np.array([51.2, 51.2, 5.0])) / np.array([1.024, 1.024, 1.0])
    np.testing.assert_allclose(g64[0], 0.0, atol=0)
    np.testing.assert_allclose(g64[1], top, rtol=1e-12)
    np.testing.assert_allclose(g64[2], [0.0, top[1], top[2]], rtol=1e-12)
    np.testing.assert_allclose(g64[3], [50.0, 50.0, 5.0], rtol=1e-12)
    np.testing.assert_allclose(g32, g64, rtol=1e-6)
    assert np.all(np.floor(g64) >= 0) and np.all(np.floor(g64) < np.array(GRID.size))
    for p, g in zip(pts, g64):
        assert tuple(np.floor(g).astype(int)) == _ref_index(p)
    # the original's formula, float32 input promoted to float64
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(5000, 3)) * [40, 40, 4]).astype(np.float32)
    lo, hi = np.array([-51.2, -51.2, -5]), np.array([51.2, 51.2, 3])
    ref = (np.clip(x, lo, hi - 1e-3) - lo) / ((hi - lo) / np.array([100, 100, 8]))
    np.testing.assert_array_equal(grid_indices(x, dtype=np.float64), ref)
    with pytest.raises(ValueError, match="grid_indices"):
        grid_indices(np.zeros((4, 2)))


def _random_cloud(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, 3)) * [30, 30, 3]
    x[: n // 10] *= 3  # some far outside
    x[n // 10 : n // 5] = np.round(x[n // 10 : n // 5] / 1.024) * 1.024  # some on voxel faces
    return x.astype(np.float32)


def test_occupancy_target_against_a_loop() -> None:
    rng = np.random.default_rng(6)
    xyz = _random_cloud(rng, 3000)
    g = grid_indices(xyz, dtype=np.float64)
    ref = np.zeros(GRID.size, np.uint8)
    for p in xyz:
        ref[_ref_index(p)] = 1
    occ = occupancy_target(g)
    assert occ.dtype == np.uint8 and occ.shape == GRID.size
    np.testing.assert_array_equal(occ, ref)
    # float32 indices floor differently for points lying on voxel faces (hence targets take float64 indices)
    g32 = grid_indices(xyz)
    differ = np.any(np.floor(g32) != np.floor(g), axis=1)
    assert differ.any()
    assert np.all(np.abs(g[differ] - np.round(g[differ])).min(axis=1) < 1e-4)
    np.testing.assert_array_equal(occupancy_target(g32[~differ]), occupancy_target(g[~differ]))
    with pytest.raises(ValueError, match="outside the grid"):
        occupancy_target(np.array([[100.0, 0.0, 0.0]]))


def _ref_majority(idx: list[tuple[int, int, int]], labels: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The original nb_process_label: per voxel a 256-bin histogram, np.argmax (first max wins)."""
    out = start.copy()
    hist: dict[tuple[int, int, int], np.ndarray] = {}
    for v, lab in zip(idx, labels):
        hist.setdefault(v, np.zeros(256, np.int64))[int(lab)] += 1
    for v, h in hist.items():
        out[v] = np.argmax(h)
    return out


def test_voxel_majority_label_against_a_loop_with_ties() -> None:
    rng = np.random.default_rng(7)
    xyz = _random_cloud(rng, 4000)
    xyz[:300] = xyz[0]  # one crowded voxel
    labels = rng.integers(0, 17, size=xyz.shape[0])
    # a hand-made tie in a fresh voxel: labels 9 and 4 twice each -> 4 wins; then 3 vs 3 of 12 and 2 -> 2
    tie_a = np.array([[10.1, 10.1, 0.5]] * 4, np.float32)
    tie_b = np.array([[-20.3, 5.2, -1.5]] * 6, np.float32)
    xyz = np.concatenate([xyz, tie_a, tie_b])
    labels = np.concatenate([labels, [9, 4, 9, 4], [12, 2, 12, 2, 2, 12]])
    g = grid_indices(xyz, dtype=np.float64)
    idx = [_ref_index(p) for p in xyz]
    ref = _ref_majority(idx, labels, np.full(GRID.size, 17, np.uint8))
    out = voxel_majority_label(g, labels)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref)
    assert out[_ref_index(tie_a[0])] == 4 and out[_ref_index(tie_b[0])] == 2
    np.testing.assert_array_equal(
        voxel_majority_label(g, labels[:, None], fill=0),
        _ref_majority(idx, labels, np.zeros(GRID.size, np.uint8)),
    )
    with pytest.raises(ValueError, match="voxel_majority_label"):
        voxel_majority_label(g, labels[:-1])


def _ref_raycast(xyz: np.ndarray, labels: np.ndarray, grid: GridSpec = GRID) -> np.ndarray:
    """Brute-force Python reference of pipeline.md 1.8-3."""
    out = np.full(grid.size, 255, np.uint8)
    keep = [all(grid.pc_min[a] < float(p[a]) < grid.pc_max[a] for a in range(3)) for p in xyz]
    pts = [np.asarray(p, np.float64) for p, k in zip(xyz, keep) if k]
    labs = [255 if int(lab) == 0 else int(lab) for lab, k in zip(labels, keep) if k]
    s = np.linspace(0, 1, 100)
    for p in pts:
        for si in s:
            out[_ref_index(si * p, grid)] = 17
    return _ref_majority([_ref_index(p, grid) for p in pts], np.asarray(labs, np.int64), out)


def test_raycast_eval_gt_hand_made_points() -> None:
    xyz = np.array(
        [
            [10.3, 0.2, 0.5],  # label 4, in range
            [10.4, 0.3, 0.6],  # same voxel, label 0 -> 255: tie 4 vs 255 -> 4
            [-5.5, 20.7, -1.2],  # label 0 alone -> 255 (ignore majority)
            [60.0, 0.0, 0.0],  # out of range in x: dropped, casts no ray
            [51.2, 3.0, 0.0],  # exactly on the border: dropped (strict)
            [0.2, -30.1, 2.5],  # label 16
        ],
        np.float32,
    )
    labels = np.array([4, 0, 0, 7, 7, 16])
    out = raycast_eval_gt(xyz, labels)
    np.testing.assert_array_equal(out, _ref_raycast(xyz, labels))
    assert out[_ref_index(xyz[0])] == 4
    assert out[_ref_index(xyz[2])] == 255
    assert out[_ref_index(xyz[5])] == 16
    assert out[_ref_index(np.array([5.0, 0.1, 0.25]))] == 17  # on the ray to point 0
    assert out[_ref_index(np.array([55.0, 0.0, 0.0]))] == 255  # beyond range: never observed
    assert out[_ref_index(np.array([45.0, 0.0, 0.0]))] == 255  # would be on the dropped point's ray
    assert set(np.unique(out)) == {4, 16, 17, 255}


def test_raycast_eval_gt_random_against_loop() -> None:
    rng = np.random.default_rng(8)
    xyz = _random_cloud(rng, 60)
    labels = rng.integers(0, 17, size=60)
    np.testing.assert_array_equal(raycast_eval_gt(xyz, labels, chunk=7), _ref_raycast(xyz, labels))


def test_flat_ids_are_c_order() -> None:
    g = np.array([[1.5, 2.5, 3.5], [99.9, 99.9, 7.9]])
    np.testing.assert_array_equal(flat_voxel_ids(g), [(1 * 100 + 2) * 8 + 3, 100 * 100 * 8 - 1])
