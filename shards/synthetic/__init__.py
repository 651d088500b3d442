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

Layout: ``world`` (the street and its boxes), ``raycast`` (slab test, closest hit), ``sensors`` (rig,
calibration, ego motion, LiDAR sweep), ``render`` (camera images), ``tables`` (static nuScenes tables),
``generate`` (:func:`make_synthetic_nuscenes`). Every name is re-exported here, the private world and
sensor builders included, for code that builds the same world (ground truth, tests).
"""

from __future__ import annotations

# ruff: noqa: F401  (the imports below are the re-exports)
from shards.synthetic.frames import _pose, _record_matrix, _rx, _ry, _rz, _Tokens, matrix_to_quaternion
from shards.synthetic.generate import (
    DEFAULT_MINI_SCENES,
    DEFAULT_TEST_SCENES,
    _generate_version,
    _Scene,
    _VersionWriter,
    make_synthetic_nuscenes,
)
from shards.synthetic.raycast import _box_frame, _cast, _ray_box
from shards.synthetic.render import (
    _BASE_COLORS,
    _SKY_HORIZON,
    _SKY_TOP,
    RENDER_COLORS,
    _box_rect,
    _cell_noise,
    _grain,
    _ground_shade,
    _jpeg,
    _noise,
    _pixel_rays,
    _render,
)
from shards.synthetic.sensors import (
    _BEAM_ELEV_DEG,
    _CAM_BASE,
    _CAM_DT_US,
    _CAM_RIG,
    _EGO_BOX,
    _LIDAR_MOUNT,
    _MAX_RANGE,
    _ego_pose_record,
    _lidar_sweep,
    _make_calibration,
    _Motion,
)
from shards.synthetic.tables import (
    _ATTRIBUTES,
    _CATEGORY_DESCRIPTIONS,
    _VISIBILITY,
    _attribute_for,
    _static_tables,
    _write_json,
    _write_png_map,
)
from shards.synthetic.world import (
    BARRIER,
    BICYCLE,
    BUS,
    CAR,
    CONE,
    CONSTR,
    EGO,
    MANMADE,
    MOTO,
    NOISE,
    OTHER_FLAT,
    PED,
    ROAD,
    ROAD_HALF,
    SIDEWALK,
    SIDEWALK_OUT,
    TERRAIN,
    TRAILER,
    TRUCK,
    VEGETATION,
    _Box,
    _free,
    _ground_class,
    _make_world,
    _World,
)

__all__ = [
    "DEFAULT_MINI_SCENES",
    "DEFAULT_TEST_SCENES",
    "RENDER_COLORS",
    "make_synthetic_nuscenes",
    "matrix_to_quaternion",
]


def __getattr__(name: str) -> object:  # ``_NOISE``: the noise table, built on first use
    if name == "_NOISE":
        return _noise()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
