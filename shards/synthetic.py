"""A small synthetic dataset in the real nuScenes on-disk format, geometrically consistent.

One analytic 3D world per scene (a straight street: ground regions of several flat classes, and oriented
boxes for cars, trucks, a bus, pedestrians, cones, barriers, bicycles, poles, buildings, trees) is seen by

* a 32-beam LiDAR on the roof (ray cast against the ground plane and the boxes), giving ``.pcd.bin`` sweeps
  (x, y, z, intensity, ring) and per-point lidarseg labels of the object each ray hit;
* six cameras with nuScenes-like intrinsics/extrinsics, each rendered per pixel (ray cast from the pixel
  centre) from the ego pose at its own timestamp, as 1600x900 JPEGs.

The ego drives at about 10 m/s and the camera timestamps are tens of milliseconds away from the LiDAR
timestamp, so the ego-motion compensation of the devkit chain matters. The world is static, hence a LiDAR
point projected through ``lidar -> ego(t_lidar) -> global -> ego(t_cam) -> camera`` lands on a pixel of the
object it hit (up to parallax occlusion between the LiDAR and the camera, and JPEG blur at edges).

Tables follow the nuScenes schema (``v1.0-mini`` with lidarseg, ``v1.0-test`` without), scene names are real
mini / test scene names so ``nuscenes.utils.splits`` applies. Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from p3d_common.labels import LIDARSEG_CLASSES
from shards.geometry import CAMERAS, quaternion_to_matrix

__all__ = [
    "DEFAULT_MINI_SCENES",
    "DEFAULT_TEST_SCENES",
    "RENDER_COLORS",
    "make_synthetic_nuscenes",
    "matrix_to_quaternion",
]

#: Real v1.0-mini scene names: two of ``mini_train`` and one of ``mini_val``.
DEFAULT_MINI_SCENES: tuple[str, ...] = ("scene-0061", "scene-0553", "scene-0103")
#: Real test-split scene names.
DEFAULT_TEST_SCENES: tuple[str, ...] = ("scene-0077", "scene-0078")

# raw lidarseg ids used by the generator
NOISE, PED, BARRIER, CONE, BICYCLE, BUS, CAR, CONSTR, MOTO, TRAILER, TRUCK = (
    0,
    2,
    9,
    12,
    14,
    16,
    17,
    18,
    21,
    22,
    23,
)
ROAD, OTHER_FLAT, SIDEWALK, TERRAIN, MANMADE, VEGETATION, EGO = 24, 25, 26, 27, 28, 30, 31

#: Base RGB colour of every raw class the generator renders. Shading and texture only scale the colour
#: (chromaticity is kept), so a pixel's class can be told from its chromaticity.
RENDER_COLORS: dict[int, tuple[int, int, int]] = {
    ROAD: (105, 105, 108),
    SIDEWALK: (200, 150, 190),
    TERRAIN: (125, 175, 60),
    OTHER_FLAT: (185, 125, 60),
    MANMADE: (215, 190, 150),
    VEGETATION: (25, 125, 35),
    CAR: (225, 35, 35),
    TRUCK: (40, 80, 225),
    BUS: (245, 210, 20),
    PED: (170, 40, 210),
    CONE: (255, 120, 0),
    BARRIER: (30, 190, 200),
    BICYCLE: (120, 230, 180),
    MOTO: (235, 60, 150),
    TRAILER: (110, 60, 40),
    CONSTR: (200, 220, 40),
}
_BASE_COLORS = np.zeros((256, 3), np.float32)
for _c, _rgb in RENDER_COLORS.items():
    _BASE_COLORS[_c] = _rgb
_SKY_TOP = np.array([110, 160, 225], np.float32)
_SKY_HORIZON = np.array([190, 210, 235], np.float32)

_CATEGORY_DESCRIPTIONS = {
    "noise": "Any lidar return that does not correspond to a physical object.",
    "vehicle.ego": "The vehicle on which the sensors are mounted.",
}

# ----------------------------------------------------------------------------------------------------------
# small math helpers
# ----------------------------------------------------------------------------------------------------------


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _ry(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def matrix_to_quaternion(rot: np.ndarray) -> list[float]:
    """(3, 3) rotation matrix -> [w, x, y, z] unit quaternion with w >= 0 (Shepperd's method)."""
    m = np.asarray(rot, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"matrix_to_quaternion: expected (3, 3), got {m.shape}")
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    qa = np.asarray(q)
    qa = qa / np.linalg.norm(qa)
    if qa[0] < 0:
        qa = -qa
    return [float(x) for x in qa]


def _pose(rot: np.ndarray, trans: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = trans
    return out


def _record_matrix(rec: dict) -> np.ndarray:
    return _pose(quaternion_to_matrix(rec["rotation"]), np.asarray(rec["translation"], np.float64))


class _Tokens:
    """Deterministic 32-hex tokens derived from the seed and a running counter."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.count = 0

    def __call__(self, kind: str) -> str:
        self.count += 1
        return hashlib.md5(f"pop3d-synthetic|{self.seed}|{kind}|{self.count}".encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# the world
# ----------------------------------------------------------------------------------------------------------

ROAD_HALF = 7.0  # |y| < 7: road (two lanes each way), 7..10 sidewalk, beyond: terrain (scene-local frame)
SIDEWALK_OUT = 10.0


@dataclass
class _Box:
    """An upright box in the scene-local frame (x along the road, y to the left, z up, ground at z=0)."""

    cls: int
    center: np.ndarray  # (3,) box centre
    size: np.ndarray  # (3,) length (along its x), width, height
    yaw: float
    kind: str = "plain"  # texture: plain | building | vehicle
    annotate: bool = False


@dataclass
class _World:
    origin: np.ndarray  # (3,) global position of the scene-local origin
    heading: float  # global yaw of the scene-local x axis
    boxes: list[_Box] = field(default_factory=list)
    flat_patches: list[tuple[float, float, float, float]] = field(default_factory=list)  # x0, x1, y0, y1
    sun: np.ndarray = field(
        default_factory=lambda: np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
    )

    @property
    def local_to_global(self) -> np.ndarray:
        return _pose(_rz(self.heading), self.origin)


def _free(boxes: list[_Box], x: float, y: float, r: float) -> bool:
    for b in boxes:
        rb = 0.5 * float(np.hypot(b.size[0], b.size[1]))
        if np.hypot(b.center[0] - x, b.center[1] - y) < r + rb + 0.3:
            return False
    return True


def _make_world(rng: np.random.Generator, travel: float) -> _World:
    """Random street around the ego path x in [0, travel] on y = -1.75 (scene-local frame)."""
    world = _World(
        origin=np.array([rng.uniform(300, 1800), rng.uniform(600, 1600), 0.0]),
        heading=rng.uniform(-np.pi, np.pi),
    )
    boxes = world.boxes
    x_lo, x_hi = -60.0, travel + 80.0

    def ok_path(x: float, y: float, r: float) -> bool:  # keep the ego's lane free around its path
        return not (-3.8 - r < y < 0.3 + r and -10.0 - r < x < travel + 14.0 + r)

    def place(
        cls: int,
        size: tuple[float, float, float],
        y_range: tuple[float, float],
        n: int,
        *,
        yaw_jitter: float = 0.1,
        z0: float = 0.0,
        kind: str = "plain",
        annotate: bool = True,
        both_sides: bool = True,
        yaw_base: float = 0.0,
    ) -> None:
        for _ in range(n):
            for _attempt in range(30):
                x = rng.uniform(x_lo, x_hi)
                y = rng.uniform(*y_range) * (rng.choice([-1.0, 1.0]) if both_sides else 1.0)
                r = 0.5 * float(np.hypot(size[0], size[1]))
                if ok_path(x, y, r) and _free(boxes, x, y, r):
                    yaw = yaw_base + rng.normal(0.0, yaw_jitter) + (np.pi if rng.random() < 0.5 else 0.0)
                    boxes.append(
                        _Box(
                            cls,
                            np.array([x, y, z0 + size[2] / 2]),
                            np.array(size),
                            float(yaw),
                            kind,
                            annotate,
                        )
                    )
                    break

    # buildings first (large), on both sides behind the sidewalk and a strip of terrain
    for side in (-1.0, 1.0):
        x = x_lo + rng.uniform(0, 8)
        while x < x_hi:
            length = rng.uniform(10, 24)
            depth = rng.uniform(8, 16)
            height = rng.uniform(6, 22)
            y_in = rng.uniform(14.5, 19.0)
            if rng.random() < 0.8:
                boxes.append(
                    _Box(
                        MANMADE,
                        np.array([x + length / 2, side * (y_in + depth / 2), height / 2]),
                        np.array([length, depth, height]),
                        0.0,
                        "building",
                        False,
                    )
                )
            else:  # a driveway of 'other flat' leading to a gap between buildings
                world.flat_patches.append(
                    (x + 2, x + 2 + rng.uniform(4, 8), *sorted((side * ROAD_HALF, side * 14.0)))
                )
            x += length + rng.uniform(2, 8)
    # trees (trunk + canopy, both vegetation) and poles on the terrain strip
    for _ in range(10):
        for _attempt in range(30):
            x, y = rng.uniform(x_lo, x_hi), rng.choice([-1.0, 1.0]) * rng.uniform(11.0, 13.0)
            if _free(boxes, x, y, 1.6):
                h = rng.uniform(2.0, 3.0)
                c = rng.uniform(2.5, 4.0)
                boxes.append(_Box(VEGETATION, np.array([x, y, h / 2]), np.array([0.4, 0.4, h]), 0.0))
                boxes.append(
                    _Box(
                        VEGETATION,
                        np.array([x, y, h + c / 2]),
                        np.array([c, c, c]),
                        float(rng.uniform(0, np.pi / 2)),
                    )
                )
                break
    place(MANMADE, (0.3, 0.3, 6.0), (10.2, 10.6), 6, yaw_jitter=0.0, annotate=False)
    # vehicles: parked at the kerb and in the other lanes
    place(CAR, (4.6, 1.9, 1.6), (5.0, 5.6), 8, yaw_jitter=0.05, kind="vehicle")
    place(CAR, (4.5, 1.85, 1.55), (1.4, 2.1), 3, yaw_jitter=0.02, kind="vehicle", both_sides=False)
    place(TRUCK, (7.5, 2.4, 3.0), (4.8, 5.4), 1, yaw_jitter=0.03, kind="vehicle")
    place(BUS, (11.5, 2.6, 3.3), (1.5, 2.0), 1, yaw_jitter=0.02, kind="vehicle", both_sides=False)
    place(TRAILER, (6.0, 2.4, 2.6), (11.5, 13.0), 1, yaw_jitter=0.05, kind="vehicle")
    place(CONSTR, (5.5, 2.6, 3.2), (11.5, 13.0), 1, yaw_jitter=0.2, kind="vehicle")
    place(MOTO, (2.0, 0.8, 1.3), (6.2, 6.6), 2, yaw_jitter=0.1)
    # people and small things on the sidewalk / kerb
    place(PED, (0.6, 0.6, 1.75), (7.4, 9.6), 8, yaw_jitter=1.5)
    place(BICYCLE, (1.8, 0.6, 1.1), (7.3, 7.8), 3, yaw_jitter=0.1)
    place(CONE, (0.4, 0.4, 0.7), (6.0, 6.7), 6, yaw_jitter=0.5)
    place(BARRIER, (2.0, 0.5, 1.0), (6.3, 6.8), 4, yaw_jitter=0.05)
    return world


def _ground_class(x: np.ndarray, y: np.ndarray, world: _World) -> np.ndarray:
    """Raw lidarseg class of ground points at scene-local (x, y): (N,) uint8."""
    ay = np.abs(y)
    cls = np.where(ay < ROAD_HALF, ROAD, np.where(ay < SIDEWALK_OUT, SIDEWALK, TERRAIN)).astype(np.uint8)
    for x0, x1, y0, y1 in world.flat_patches:
        cls[(x >= x0) & (x < x1) & (y >= y0) & (y < y1)] = OTHER_FLAT
    return cls


# a fixed table of white noise in [0, 1): ground cells (mod its shape) and image grain (pixel rows, cols)
_NOISE = np.random.default_rng(20231208).random((1024, 1600), dtype=np.float32)


def _cell_noise(x: np.ndarray, y: np.ndarray, cells_per_m: float) -> np.ndarray:
    """Deterministic white noise in [0, 1) of the ground cell holding scene-local (x, y): (N,) float32."""
    i = np.floor(x * cells_per_m).astype(np.int64) & 1023
    j = np.floor(y * cells_per_m).astype(np.int64) % 1600
    return _NOISE[i, j]


def _grain(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Fixed per-pixel noise in [0, 1) for image rows r0:r1 and columns c0:c1: (r1 - r0, c1 - c0) float32."""
    nr, nc = _NOISE.shape
    if r1 <= nr and c1 <= nc:
        return _NOISE[r0:r1, c0:c1]
    return _NOISE[np.ix_(np.arange(r0, r1) % nr, np.arange(c0, c1) % nc)]


def _ground_shade(x: np.ndarray, y: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Multiplicative texture of the ground (lane markings, sidewalk tiles, grain): (N,) float32."""
    shade = np.where(
        cls == TERRAIN, 0.8 + 0.35 * _cell_noise(x, y, 3.0), 0.88 + 0.16 * _cell_noise(x, y, 8.0)
    )
    ay = np.abs(y)
    marking = (cls == ROAD) & (((ay < 0.08) & (np.mod(x, 6.0) < 3.0)) | (np.abs(ay - 6.75) < 0.08))
    shade = np.where(marking, 2.1, shade)
    tiles = (cls == SIDEWALK) & ((np.mod(x, 1.5) < 0.05) | (np.mod(y, 1.5) < 0.05))
    shade = np.where(tiles, 0.75, shade)
    return shade.astype(np.float32)


def _box_frame(box: _Box) -> tuple[np.ndarray, np.ndarray]:
    """Rotation (3, 3) of the box in the scene-local frame and its half size (3,)."""
    return _rz(box.yaw), box.size / 2.0


def _ray_box(o: np.ndarray, d: np.ndarray, box: _Box) -> np.ndarray:
    """Entry distance of rays ``o + t d`` into an upright box (slab test), in ``d``'s dtype.

    Args:
        o: (3,) scene-local ray origin.
        d: (3, ...) scene-local ray directions, component-first.
        box: the box (yaw-only rotation).

    Returns:
        (...) t, inf where the ray misses the box or starts inside it.
    """
    c, s = float(np.cos(box.yaw)), float(np.sin(box.yaw))
    rel = np.asarray(o, np.float64) - box.center
    o_box = (c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], float(rel[2]))
    d_box = (c * d[0] + s * d[1], -s * d[0] + c * d[1], d[2])
    tmin = tmax = None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for ol, dl, h in zip(o_box, d_box, box.size / 2.0):
            inv = 1.0 / dl
            t1 = (-float(h) - ol) * inv
            t2 = (float(h) - ol) * inv
            lo, hi = np.fmin(t1, t2), np.fmax(t1, t2)  # fmin/fmax skip the NaN of 0 * inf
            tmin = lo if tmin is None else np.fmax(tmin, lo)
            tmax = hi if tmax is None else np.fmin(tmax, hi)
    return np.where((tmax >= tmin) & (tmin > 1e-6), tmin, np.inf).astype(d.dtype)


# ----------------------------------------------------------------------------------------------------------
# sensors
# ----------------------------------------------------------------------------------------------------------

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


def _cast(world: _World, o: np.ndarray, d: np.ndarray, extra: Sequence[_Box] = ()) -> tuple[np.ndarray, ...]:
    """Cast rays (scene-local origin (3,), directions (3, N)) against the ground plane z = 0 and the boxes.

    Returns t (N,) (inf: nothing hit) and the hit id (N,) int32: -1 ground, -2 nothing, >= 0 index into
    ``world.boxes + extra``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.where(d[2] < -1e-9, -o[2] / d[2], np.inf)
    best_t = tg
    best_id = np.where(np.isfinite(tg), -1, -2).astype(np.int32)
    for i, box in enumerate(list(world.boxes) + list(extra)):
        t = _ray_box(o, d, box)
        closer = t < best_t
        if closer.any():
            best_t = np.where(closer, t, best_t)
            best_id[closer] = i
    return best_t, best_id


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


def _pixel_rays(K: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Camera-frame rays through the pixel centres (u = col, v = row) with z = 1: (x, y) as (2, H, W) float32."""
    H, W = hw
    Kinv = np.linalg.inv(K)
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    x = Kinv[0, 0] * u + Kinv[0, 1] * v + Kinv[0, 2]
    y = Kinv[1, 0] * u + Kinv[1, 1] * v + Kinv[1, 2]
    return np.stack([x, y]).astype(np.float32)


def _box_rect(
    box: _Box, cam_from_local: np.ndarray, K: np.ndarray, hw: tuple[int, int]
) -> tuple[int, ...] | None:
    """Pixel rectangle (r0, r1, c0, c1) covering the box's image (near-plane clipped), or None if unseen."""
    rot, half = _box_frame(box)
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float64)
    corners = (signs * half) @ rot.T + box.center
    pc = corners @ cam_from_local[:3, :3].T + cam_from_local[:3, 3]
    near = 0.05
    front = pc[:, 2] > near
    if not front.any():
        return None
    pts = [pc[front]]
    a, b = np.triu_indices(8, 1)
    edge = np.sum(np.abs(signs[a] - signs[b]), axis=1) == 2
    a, b = a[edge], b[edge]
    cross = front[a] != front[b]
    if cross.any():
        pa, pb = pc[a[cross]], pc[b[cross]]
        s = (near - pa[:, 2]) / (pb[:, 2] - pa[:, 2])
        pts.append(pa + s[:, None] * (pb - pa))
    p = np.concatenate(pts)
    uv = (p @ K.T)[:, :2] / p[:, 2:3]
    H, W = hw
    c0, c1 = int(np.floor(uv[:, 0].min())) - 1, int(np.ceil(uv[:, 0].max())) + 2
    r0, r1 = int(np.floor(uv[:, 1].min())) - 1, int(np.ceil(uv[:, 1].max())) + 2
    c0, c1, r0, r1 = max(c0, 0), min(c1, W), max(r0, 0), min(r1, H)
    if c0 >= c1 or r0 >= r1:
        return None
    return r0, r1, c0, c1


def _render(world: _World, cam_local: np.ndarray, K: np.ndarray, rays_cam: np.ndarray) -> np.ndarray:
    """Render one camera (pose camera -> scene-local, (4, 4)) by per-pixel ray casting: uint8 (H, W, 3) RGB.

    ``rays_cam`` (2, H, W) are the x, y of camera-frame directions with z = 1 (``_pixel_rays``), so the ray
    parameter t is the camera depth.
    """
    H, W = rays_cam.shape[1:]
    o = cam_local[:3, 3]
    R = cam_local[:3, :3]
    rx, ry = rays_cam
    d = np.empty((3, H, W), np.float32)  # scene-local directions, component-first
    for i in range(3):
        d[i] = float(R[i, 0]) * rx + float(R[i, 1]) * ry + float(R[i, 2])
    dz = d[2]
    img = np.empty((3, H, W), np.float32)
    # sky: a vertical gradient
    up = np.clip(dz * (3.0 / np.sqrt(d[0] * d[0] + d[1] * d[1] + 1e-6)), 0.0, 1.0)
    for ch in range(3):
        img[ch] = _SKY_HORIZON[ch] + float(_SKY_TOP[ch] - _SKY_HORIZON[ch]) * up
    depth = np.full((H, W), np.inf, np.float32)
    # ground plane z = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.float32(-o[2]) / dz
    gmask = (dz < -1e-6) & (tg < 400.0)
    t = tg[gmask]
    px = np.float32(o[0]) + t * d[0][gmask]
    py = np.float32(o[1]) + t * d[1][gmask]
    cls = _ground_class(px, py, world)
    shade = _ground_shade(px, py, cls)
    haze = np.clip((t - 90.0) / 250.0, 0.0, 0.6)
    for ch in range(3):
        col = _BASE_COLORS[cls, ch] * shade
        img[ch][gmask] = col + haze * (_SKY_HORIZON[ch] - col)
    depth[gmask] = t
    # boxes, z-buffered against the ground and each other
    local_to_cam = np.linalg.inv(cam_local)
    for box in world.boxes:
        rect = _box_rect(box, local_to_cam, K, (H, W))
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        dsub = d[:, r0:r1, c0:c1]
        tb = _ray_box(o, dsub, box)
        dsub_depth = depth[r0:r1, c0:c1]  # a view
        closer = tb < dsub_depth
        if not closer.any():
            continue
        tb = tb[closer]
        dsel = [dsub[i][closer] for i in range(3)]
        # hit position in the box frame
        c, s = float(np.cos(box.yaw)), float(np.sin(box.yaw))
        half = box.size / 2.0
        hx, hy, hz = (float(o[i] - box.center[i]) + tb * dsel[i] for i in range(3))
        bx, by, bz = c * hx + s * hy, -s * hx + c * hy, hz
        ax, ay, az = np.abs(bx) / half[0], np.abs(by) / half[1], np.abs(bz) / half[2]
        axis = np.where((ax >= ay) & (ax >= az), 0, np.where(ay >= az, 1, 2))
        coord = np.where(axis == 0, bx, np.where(axis == 1, by, bz))
        sun_box = _rz(box.yaw).T @ world.sun  # sun direction in the box frame
        lam = sun_box.astype(np.float32)[axis] * np.where(coord >= 0, 1.0, -1.0).astype(np.float32)
        shade = 0.55 + 0.45 * np.clip(lam, 0.0, 1.0)
        side = axis != 2
        if box.kind == "building":
            along = np.where(axis == 0, by, bx)
            win = side & (np.mod(along, 3.0) > 1.2) & (np.mod(bz + half[2], 3.2) > 1.4)
            shade = np.where(win, shade * 0.55, shade)
        elif box.kind == "vehicle":  # windows: a darker band on the upper part of the sides
            zrel = (bz + half[2]) / box.size[2]
            shade = np.where(side & (zrel > 0.6) & (zrel < 0.9), shade * 0.5, shade)
        shade = shade * (0.94 + 0.12 * _grain(r0, r1, c0, c1)[closer])
        for ch in range(3):
            img[ch, r0:r1, c0:c1][closer] = float(_BASE_COLORS[box.cls, ch]) * shade
        dsub_depth[closer] = tb
    out = np.empty((H, W, 3), np.uint8)
    for ch in range(3):
        out[..., ch] = np.clip(img[ch] + 0.5, 0, 255)
    return out


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------------

_VISIBILITY = [
    {"description": "visibility of whole object is between 0 and 40%", "token": "1", "level": "v0-40"},
    {"description": "visibility of whole object is between 40 and 60%", "token": "2", "level": "v40-60"},
    {"description": "visibility of whole object is between 60 and 80%", "token": "3", "level": "v60-80"},
    {"description": "visibility of whole object is between 80 and 100%", "token": "4", "level": "v80-100"},
]
_ATTRIBUTES = ("vehicle.parked", "vehicle.stopped", "pedestrian.standing", "cycle.without_rider")


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=0, sort_keys=True) + "\n")


def _static_tables(seed: int) -> dict[str, list[dict]]:
    tok = _Tokens(seed * 1000 + 7)
    category = [
        {
            "token": tok("category"),
            "name": name,
            "index": i,
            "description": _CATEGORY_DESCRIPTIONS.get(name, f"nuScenes-lidarseg class {name}."),
        }
        for i, name in enumerate(LIDARSEG_CLASSES)
    ]
    attribute = [{"token": tok("attribute"), "name": n, "description": n} for n in _ATTRIBUTES]
    sensor = [{"token": tok("sensor"), "channel": ch, "modality": "camera"} for ch in CAMERAS]
    sensor.append({"token": tok("sensor"), "channel": "LIDAR_TOP", "modality": "lidar"})
    return {"category": category, "attribute": attribute, "sensor": sensor, "visibility": _VISIBILITY}


def _attribute_for(cls: int, attrs: dict[str, str]) -> list[str]:
    if cls in (CAR, TRUCK, TRAILER, CONSTR):
        return [attrs["vehicle.parked"]]
    if cls == BUS:
        return [attrs["vehicle.stopped"]]
    if cls == PED:
        return [attrs["pedestrian.standing"]]
    if cls in (BICYCLE, MOTO):
        return [attrs["cycle.without_rider"]]
    return []


def _generate_version(
    root: Path,
    version: str,
    scenes: Sequence[str],
    samples_per_scene: int,
    seed: int,
    static: dict[str, list[dict]],
    with_lidarseg: bool,
    hw: tuple[int, int],
    n_azimuth: int,
    jpeg_quality: int,
    scene_offset: int,
) -> None:
    tok = _Tokens(seed * 1000 + (1 if with_lidarseg else 2))
    sensors = {s["channel"]: s for s in static["sensor"]}
    cat_by_index = {c["index"]: c for c in static["category"]}
    attrs = {a["name"]: a["token"] for a in static["attribute"]}
    t: dict[str, list[dict]] = {
        k: []
        for k in (
            "calibrated_sensor",
            "ego_pose",
            "log",
            "scene",
            "sample",
            "sample_data",
            "sample_annotation",
            "instance",
            "map",
            "lidarseg",
        )
    }
    rays_cache: dict[bytes, np.ndarray] = {}
    for s_idx, name in enumerate(scenes):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), s_idx])
        travel = 10.0 * 0.5 * max(samples_per_scene - 1, 0)
        world = _make_world(rng, travel)
        date = f"2018-07-{10 + (scene_offset + s_idx) % 18:02d}-11-{(13 * s_idx) % 60:02d}-{(7 * s_idx) % 60:02d}"
        logfile = f"n{900 + scene_offset + s_idx:03d}-{date}+0800"
        log = {
            "token": tok("log"),
            "logfile": logfile,
            "vehicle": f"n{900 + scene_offset + s_idx:03d}",
            "date_captured": date[:10],
            "location": ("singapore-onenorth", "boston-seaport")[s_idx % 2],
        }
        t["log"].append(log)
        map_token = tok("map")
        t["map"].append(
            {
                "token": map_token,
                "log_tokens": [log["token"]],
                "category": "semantic_prior",
                "filename": f"maps/{map_token}.png",
            }
        )
        calib = _make_calibration(rng, tok, sensors)
        t["calibrated_sensor"].extend(calib[ch] for ch in ("LIDAR_TOP", *CAMERAS))
        t0 = 1_531_000_000_000_000 + (scene_offset + s_idx) * 86_400_000_000 + int(rng.integers(0, 10**9))
        motion = _Motion(
            t0,
            -1.75,
            float(rng.uniform(8.5, 11.5)),
            float(rng.normal(0, 0.03)),
            float(np.deg2rad(rng.uniform(0.2, 0.6))),
        )
        scene_tok = tok("scene")
        rays_cache.clear()  # intrinsics differ per log; keep memory bounded
        sample_toks = [tok("sample") for _ in range(samples_per_scene)]
        prev_sd: dict[str, dict] = {}
        inst_anns: dict[int, list[dict]] = {}
        for k, stok in enumerate(sample_toks):
            ts = t0 + k * 500_000 + int(rng.integers(-2000, 2000))
            t["sample"].append(
                {
                    "token": stok,
                    "timestamp": ts,
                    "scene_token": scene_tok,
                    "prev": sample_toks[k - 1] if k > 0 else "",
                    "next": sample_toks[k + 1] if k + 1 < samples_per_scene else "",
                }
            )
            # LiDAR
            lid_pose = _ego_pose_record(tok, world, motion, ts)
            t["ego_pose"].append(lid_pose)
            ego_local = motion.local_pose(ts)
            lidar_local = ego_local @ _record_matrix(calib["LIDAR_TOP"])
            pts, labels, hits = _lidar_sweep(rng, world, lidar_local, ego_local, n_azimuth)
            fname = f"samples/LIDAR_TOP/{logfile}__LIDAR_TOP__{ts}.pcd.bin"
            (root / fname).write_bytes(pts.tobytes())
            sd_tok = tok("sample_data")
            records = [("LIDAR_TOP", sd_tok, lid_pose, fname, "pcd", 0, 0)]
            if with_lidarseg:
                lfile = f"lidarseg/{version}/{sd_tok}_lidarseg.bin"
                (root / lfile).write_bytes(labels.tobytes())
                t["lidarseg"].append({"token": sd_tok, "sample_data_token": sd_tok, "filename": lfile})
            # cameras
            for cam in CAMERAS:
                tc = ts + _CAM_DT_US[cam] + int(rng.integers(-1500, 1500))
                cam_pose = _ego_pose_record(tok, world, motion, tc)
                t["ego_pose"].append(cam_pose)
                cam_local = motion.local_pose(tc) @ _record_matrix(calib[cam])
                K = np.asarray(calib[cam]["camera_intrinsic"], np.float64)
                key = K.tobytes()
                if key not in rays_cache:
                    rays_cache[key] = _pixel_rays(K, hw)
                img = _render(world, cam_local, K, rays_cache[key])
                cfile = f"samples/{cam}/{logfile}__{cam}__{tc}.jpg"
                (root / cfile).write_bytes(_jpeg(img, jpeg_quality))
                records.append((cam, tok("sample_data"), cam_pose, cfile, "jpg", hw[0], hw[1]))
            for ch, tok_sd, pose, fn, fmt, h, w in records:
                rec = {
                    "token": tok_sd,
                    "sample_token": stok,
                    "ego_pose_token": pose["token"],
                    "calibrated_sensor_token": calib[ch]["token"],
                    "timestamp": pose["timestamp"],
                    "fileformat": fmt,
                    "is_key_frame": True,
                    "height": h,
                    "width": w,
                    "filename": fn,
                    "prev": "",
                    "next": "",
                }
                if ch in prev_sd:
                    rec["prev"] = prev_sd[ch]["token"]
                    prev_sd[ch]["next"] = tok_sd
                prev_sd[ch] = rec
                t["sample_data"].append(rec)
            # annotations (not in the test split, like nuScenes)
            if with_lidarseg:
                counts = np.bincount(
                    np.asarray([h for h in hits if h >= 0], np.int64), minlength=len(world.boxes) + 1
                )
                ego_xy = ego_local[:2, 3]
                for b_idx, box in enumerate(world.boxes):
                    if not box.annotate or np.hypot(*(box.center[:2] - ego_xy)) > 60.0:
                        continue
                    g = world.local_to_global
                    ann = {
                        "token": tok("sample_annotation"),
                        "sample_token": stok,
                        "instance_token": "",
                        "visibility_token": "4",
                        "attribute_tokens": _attribute_for(box.cls, attrs),
                        "translation": [float(v) for v in g[:3, :3] @ box.center + g[:3, 3]],
                        "size": [float(box.size[1]), float(box.size[0]), float(box.size[2])],
                        "rotation": matrix_to_quaternion(_rz(world.heading + box.yaw)),
                        "prev": "",
                        "next": "",
                        "num_lidar_pts": int(counts[b_idx]),
                        "num_radar_pts": 0,
                    }
                    inst_anns.setdefault(b_idx, []).append(ann)
        for b_idx, anns in sorted(inst_anns.items()):
            inst_tok = tok("instance")
            for a, b in itertools.pairwise(anns):
                a["next"], b["prev"] = b["token"], a["token"]
            for a in anns:
                a["instance_token"] = inst_tok
            t["sample_annotation"].extend(anns)
            t["instance"].append(
                {
                    "token": inst_tok,
                    "category_token": cat_by_index[world.boxes[b_idx].cls]["token"],
                    "nbr_annotations": len(anns),
                    "first_annotation_token": anns[0]["token"],
                    "last_annotation_token": anns[-1]["token"],
                }
            )
        t["scene"].append(
            {
                "token": scene_tok,
                "log_token": log["token"],
                "nbr_samples": samples_per_scene,
                "first_sample_token": sample_toks[0],
                "last_sample_token": sample_toks[-1],
                "name": name,
                "description": f"Synthetic street, seed {seed}",
            }
        )
        _write_png_map(root / f"maps/{map_token}.png")

    table_dir = root / version
    table_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in static.items():
        _write_json(table_dir / f"{name}.json", rows)
    for name, rows in t.items():
        if name == "lidarseg" and not with_lidarseg:
            continue
        _write_json(table_dir / f"{name}.json", rows)


def _write_png_map(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 20), np.uint8), "L").save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def make_synthetic_nuscenes(
    out_dir: str | Path,
    seed: int = 0,
    samples_per_scene: int = 2,
    mini_scenes: Sequence[str] = DEFAULT_MINI_SCENES,
    test_scenes: Sequence[str] = DEFAULT_TEST_SCENES,
    test_samples_per_scene: int = 1,
    img_hw: tuple[int, int] = (900, 1600),
    n_azimuth: int = 1084,
    jpeg_quality: int = 90,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic nuScenes dataroot (``v1.0-mini`` with lidarseg + ``v1.0-test``) and return it.

    Args:
        out_dir: the dataroot to create (``samples/``, ``maps/``, ``lidarseg/v1.0-mini/``, ``v1.0-mini/``,
            ``v1.0-test/``).
        seed: everything is a deterministic function of it (same seed, byte-identical files).
        samples_per_scene: keyframes per mini scene (0.5 s apart).
        mini_scenes: real v1.0-mini scene names (``nuscenes.utils.splits.mini_train`` / ``mini_val``).
        test_scenes: real test-split scene names (``nuscenes.utils.splits.test``); may be empty.
        test_samples_per_scene: keyframes per test scene.
        img_hw: (H, W) of the camera images.
        n_azimuth: LiDAR azimuth steps per sweep (x 32 beams).
        jpeg_quality: JPEG quality of the images.
        overwrite: replace an existing synthetic dataset in ``out_dir``.

    Returns:
        the dataroot ``Path``, to pass as ``NuScenes(version=..., dataroot=...)``.
    """
    root = Path(out_dir)
    if samples_per_scene < 1 or (test_scenes and test_samples_per_scene < 1):
        raise ValueError("make_synthetic_nuscenes: samples_per_scene and test_samples_per_scene must be >= 1")
    if not mini_scenes:
        raise ValueError("make_synthetic_nuscenes: mini_scenes must name at least one scene")
    if len(set(mini_scenes) | set(test_scenes)) != len(mini_scenes) + len(test_scenes):
        raise ValueError(
            f"make_synthetic_nuscenes: scene names must be unique, got {mini_scenes} + {test_scenes}"
        )
    generated = ("samples", "maps", "lidarseg", "v1.0-mini", "v1.0-test")
    existing = [p for p in generated if (root / p).exists()]
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"make_synthetic_nuscenes: {root} already holds {existing}; pass overwrite=True (--overwrite)"
            )
        for p in existing:
            shutil.rmtree(root / p)
    for sub in ("maps", "lidarseg/v1.0-mini", "samples/LIDAR_TOP", *(f"samples/{c}" for c in CAMERAS)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    static = _static_tables(seed)
    _generate_version(
        root,
        "v1.0-mini",
        mini_scenes,
        samples_per_scene,
        seed,
        static,
        True,
        img_hw,
        n_azimuth,
        jpeg_quality,
        scene_offset=0,
    )
    if test_scenes:
        _generate_version(
            root,
            "v1.0-test",
            test_scenes,
            test_samples_per_scene,
            seed,
            static,
            False,
            img_hw,
            n_azimuth,
            jpeg_quality,
            scene_offset=len(mini_scenes),
        )
    return root
