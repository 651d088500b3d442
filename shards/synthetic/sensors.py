"""The sensor rig of the synthetic car: calibration, ego motion and poses, and the 32-beam LiDAR sweep."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shards.geometry import CAMERAS
from shards.synthetic.frames import _pose, _rx, _ry, _rz, _Tokens, matrix_to_quaternion
from shards.synthetic.raycast import _cast
from shards.synthetic.world import EGO, NOISE, ROAD, _Box, _ground_class, _World

# nuScenes-like rig: ego-frame mount (x fwd, y left, z up), yaw of the optical axis, focal, principal point
_CAM_RIG = {
    "CAM_FRONT": ((1.70, 0.016, 1.51), 0.0, 1266.4, (816.3, 491.5)),
    "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.50), -55.0, 1260.8, (807.9, 495.3)),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), 55.0, 1272.6, (826.6, 479.8)),
    "CAM_BACK": ((0.03, 0.0, 1.58), 180.0, 809.2, (829.2, 481.8)),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), 110.0, 1256.7, (817.8, 451.9)),
    "CAM_BACK_RIGHT": ((1.04, -0.48, 1.56), -110.0, 1259.5, (807.3, 501.2)),
}
# camera timestamp offsets from the LiDAR keyframe timestamp (the LiDAR sweeps past each camera), in us
_CAM_DT_US = {
    "CAM_FRONT": 12_000,
    "CAM_FRONT_RIGHT": 20_500,
    "CAM_FRONT_LEFT": 3_500,
    "CAM_BACK": 37_000,
    "CAM_BACK_LEFT": -21_000,
    "CAM_BACK_RIGHT": 28_500,
}
# camera axes (x right, y down, z forward) expressed in the ego frame
_CAM_BASE = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
_LIDAR_MOUNT = (0.943, 0.0, 1.84)
_EGO_BOX = _Box(EGO, np.array([1.4, 0.0, 0.72]), np.array([4.6, 1.85, 1.44]), 0.0)  # car body, ego frame
_BEAM_ELEV_DEG = np.linspace(10.67, -30.67, 32)
_MAX_RANGE = 80.0


def _make_calibration(rng: np.random.Generator, tok: _Tokens, sensors: dict[str, dict]) -> dict[str, dict]:
    """One calibrated_sensor record per channel (per log), with small per-log perturbations."""
    out = {}
    lid_rot = (
        _rz(np.deg2rad(-90.0 + rng.normal(0, 0.3)))
        @ _ry(np.deg2rad(rng.normal(0, 0.5)))
        @ _rx(np.deg2rad(rng.normal(0, 0.3)))
    )
    out["LIDAR_TOP"] = {
        "token": tok("calibrated_sensor"),
        "sensor_token": sensors["LIDAR_TOP"]["token"],
        "translation": [float(v + rng.normal(0, 0.01)) for v in _LIDAR_MOUNT],
        "rotation": matrix_to_quaternion(lid_rot),
        "camera_intrinsic": [],
    }
    for cam in CAMERAS:
        mount, yaw, f, (cx, cy) = _CAM_RIG[cam]
        rot = (
            _rz(np.deg2rad(yaw + rng.normal(0, 0.5)))
            @ _ry(np.deg2rad(rng.normal(0, 0.5)))
            @ _rx(np.deg2rad(rng.normal(0, 0.3)))
            @ _CAM_BASE
        )
        fk = f + rng.normal(0, 3.0)
        K = [[float(fk), 0.0, float(cx)], [0.0, float(fk), float(cy)], [0.0, 0.0, 1.0]]
        out[cam] = {
            "token": tok("calibrated_sensor"),
            "sensor_token": sensors[cam]["token"],
            "translation": [float(v + rng.normal(0, 0.01)) for v in mount],
            "rotation": matrix_to_quaternion(rot),
            "camera_intrinsic": K,
        }
    return out


@dataclass
class _Motion:
    """Ego motion in the scene-local frame: lane y0, speed v, yaw rate w, small pitch oscillation."""

    t0: int
    y0: float
    v: float
    w: float
    pitch_amp: float

    def local_pose(self, t_us: int) -> np.ndarray:
        t = (t_us - self.t0) * 1e-6
        yaw = self.w * t
        if abs(self.w) > 1e-9:
            x = self.v / self.w * np.sin(yaw)
            y = self.y0 + self.v / self.w * (1.0 - np.cos(yaw))
        else:
            x, y = self.v * t, self.y0
        pitch = self.pitch_amp * np.sin(2.0 * np.pi * 0.7 * t)
        return _pose(_rz(yaw) @ _ry(pitch), np.array([x, y, 0.0]))


def _ego_pose_record(tok: _Tokens, world: _World, motion: _Motion, t_us: int) -> dict:
    g = world.local_to_global @ motion.local_pose(t_us)
    return {
        "token": tok("ego_pose"),
        "timestamp": int(t_us),
        "rotation": matrix_to_quaternion(g[:3, :3]),
        "translation": [float(v) for v in g[:3, 3]],
    }


def _lidar_sweep(
    rng: np.random.Generator, world: _World, lidar_local: np.ndarray, ego_local: np.ndarray, n_azimuth: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Ray cast one sweep. Returns points (N, 5) float32 in the LiDAR frame, labels (N,) uint8, hit box ids."""
    el = np.deg2rad(_BEAM_ELEV_DEG)
    az = np.linspace(0.0, 2 * np.pi, n_azimuth, endpoint=False) + rng.uniform(0, 2 * np.pi / n_azimuth)
    az_g, el_g = np.meshgrid(az, el, indexing="ij")  # azimuth-major firing order
    ring = np.broadcast_to(np.arange(el.size), az_g.shape).reshape(-1)
    d_lidar = np.stack([np.cos(el_g) * np.cos(az_g), np.cos(el_g) * np.sin(az_g), np.sin(el_g)], -1).reshape(
        -1, 3
    )
    rot, o = lidar_local[:3, :3], lidar_local[:3, 3]
    d = d_lidar @ rot.T
    ego_box = _Box(
        EGO,
        ego_local[:3, :3] @ _EGO_BOX.center + ego_local[:3, 3],
        _EGO_BOX.size,
        float(np.arctan2(ego_local[1, 0], ego_local[0, 0])),
    )
    t, hit = _cast(world, o, np.ascontiguousarray(d.T), extra=[ego_box])
    keep = np.isfinite(t) & (t < _MAX_RANGE) & (t > 0.05)
    t, hit, d, ring = t[keep], hit[keep], d[keep], ring[keep]
    t = t + rng.normal(0.0, 0.005, t.shape)
    p_local = o + t[:, None] * d
    labels = np.empty(t.shape[0], np.uint8)
    g = hit == -1
    labels[g] = _ground_class(p_local[g, 0], p_local[g, 1], world)
    box_cls = np.array([b.cls for b in world.boxes] + [EGO], np.uint8)
    labels[~g] = box_cls[hit[~g]]
    # a few noise returns (dust), label 0
    n_noise = 12
    nd = rng.normal(size=(n_noise, 3))
    nd[:, 2] = np.abs(nd[:, 2]) * 0.3
    nd /= np.linalg.norm(nd, axis=1, keepdims=True)
    noise_pts = o + nd * rng.uniform(3.0, 15.0, (n_noise, 1))
    p_local = np.concatenate([p_local, noise_pts])
    labels = np.concatenate([labels, np.full(n_noise, NOISE, np.uint8)])
    ring = np.concatenate([ring, rng.integers(0, 32, n_noise)])
    hit = np.concatenate([hit, np.full(n_noise, -3, np.int32)])
    # to the LiDAR frame
    p_lidar = (p_local - o) @ rot
    intensity = np.clip(np.where(labels == ROAD, 8.0, 25.0) + rng.normal(0, 4.0, labels.shape), 0, 255)
    pts = np.concatenate([p_lidar, intensity[:, None], ring[:, None]], axis=1).astype(np.float32)
    return pts, labels, hit.tolist()
