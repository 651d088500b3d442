"""Occ3D-nuScenes-format ground truth for the synthetic nuScenes dataroot, made from its own analytic world.

For every keyframe of a version with lidarseg, ``<dataroot>/gts/<scene_name>/<sample_token>/labels.npz`` with
the released arrays (200 x 200 x 16 voxels of 0.4 m over [-40, 40]^2 x [-1, 5.4] m in the ego frame of the
LiDAR keyframe):

* ``semantics`` uint8, from the world model: a voxel takes the class (nuScenes-lidarseg 16-class ids 1..16;
  the synthetic world has no 'others') of the box that covers most of its 3 x 3 x 3 sub-points, else the
  ground class if the ground surface crosses it, else 17 (free; also below the ground and inside the ego car);
* ``mask_lidar``: voxels crossed by a ray of the keyframe sweep (sampled every 0.1 m from the LiDAR to the
  return) or holding a return (returns off the ego car's body are dropped, as Occ3D does);
* ``mask_camera``: voxels whose centre projects into a camera image and which the camera ray towards that
  centre reaches before anything in the world (ground, boxes, the ego body) blocks it, i.e. the first surface
  hit lies inside the voxel or beyond it. Unlike Occ3D's, this mask is not intersected with the LiDAR mask (one
  sweep is sparse; Occ3D accumulates a whole scene's sweeps).

The world of each scene is rebuilt from the dataroot's tables (scene order, keyframe count, seed in the scene
description) with :mod:`shards.synthetic`'s own generator; the LiDAR returns are checked to fall in voxels of
their own class, so a mismatch (say a wrong seed) is an error, not silent nonsense.
"""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np

from p3d_common.labels import RAW_TO_NOIGNORE
from shards.geometry import transform_matrix
from shards.synthetic import _EGO_BOX, EGO, NOISE, _Box, _cast, _ground_class, _make_world

__all__ = ["make_synthetic_occ3d", "scene_labels"]

SHAPE = (200, 200, 16)
LO = np.array([-40.0, -40.0, -1.0])
VOXEL = 0.4
_SUB = (np.arange(3) + 0.5) / 3.0 - 0.5  # sub-point offsets in voxel units


def _tables(folder: Path) -> dict[str, list[dict]]:
    return {n: json.loads((folder / f"{n}.json").read_text())
            for n in ("scene", "sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor")}


def _centres() -> np.ndarray:
    axes = [LO[d] + VOXEL * (np.arange(SHAPE[d]) + 0.5) for d in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _to(T: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p @ T[:3, :3].T + T[:3, 3]


def _voxel_index(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) ego points -> flat voxel ids (N,) and in-volume mask (N,)."""
    ijk = np.floor((p - LO) / VOXEL).astype(np.int64)
    ok = np.all((ijk >= 0) & (ijk < np.asarray(SHAPE)), axis=1)
    flat = np.ravel_multi_index(tuple(np.clip(ijk, 0, np.asarray(SHAPE) - 1).T), SHAPE)
    return flat, ok


# ---------------------------------------------------------------------------------------------------------
# semantics
# ---------------------------------------------------------------------------------------------------------

def _overlaps(box_rot: np.ndarray, half: np.ndarray, centre: np.ndarray, voxel_centres: np.ndarray) -> np.ndarray:
    """Separating-axis test of one oriented box (ego frame: rotation (3, 3), half sizes (3,), centre (3,)) against
    axis-aligned voxels (N, 3) of edge VOXEL: (N,) bool, touching counts as overlapping."""
    e = np.eye(3)
    b = box_rot.T  # rows: the box axes in the ego frame
    axes = [*e, *b] + [np.cross(e[i], b[j]) for i in range(3) for j in range(3)]
    axes = np.array([a for a in axes if np.linalg.norm(a) > 1e-9])
    r_vox = (VOXEL / 2) * np.abs(axes).sum(1)  # (A,)
    r_box = (np.abs(axes @ b.T) * half).sum(1)  # (A,)
    dist = np.abs((centre - voxel_centres) @ axes.T)  # (N, A)
    return np.all(dist <= r_vox + r_box + 1e-9, axis=1)


def _box_semantics(world, local_from_ego: np.ndarray, sem: np.ndarray) -> None:
    """Write box classes into ``sem`` (X, Y, Z): the box covering most of a voxel's 3 x 3 x 3 sub-points, else
    (thin boxes, surfaces near a voxel face) the first box that overlaps the voxel at all."""
    best = np.zeros(SHAPE, np.int32)
    ego_from_local = np.linalg.inv(local_from_ego)
    subs = np.stack(np.meshgrid(_SUB, _SUB, _SUB, indexing="ij"), -1).reshape(-1, 3) * VOXEL  # (27, 3)
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], np.float64)
    touched: list[tuple[np.ndarray, int]] = []
    for box in world.boxes:
        c, s = np.cos(box.yaw), np.sin(box.yaw)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        corners = _to(ego_from_local, (signs * box.size / 2) @ rot.T + box.center)
        if np.any(corners.max(0) < LO) or np.any(corners.min(0) >= LO + VOXEL * np.asarray(SHAPE)):
            continue
        lo = np.floor((corners.min(0) - LO) / VOXEL).astype(int).clip(0, np.asarray(SHAPE) - 1)
        hi = np.floor((corners.max(0) - LO) / VOXEL).astype(int).clip(0, np.asarray(SHAPE) - 1)
        ii, jj, kk = np.meshgrid(*[np.arange(lo[d], hi[d] + 1) for d in range(3)], indexing="ij")
        idx = np.stack([ii, jj, kk], -1).reshape(-1, 3)
        centres = LO + VOXEL * (idx + 0.5)
        pts = _to(local_from_ego, (centres[:, None, :] + subs[None]).reshape(-1, 3)) - box.center
        bx = c * pts[:, 0] + s * pts[:, 1]
        by = -s * pts[:, 0] + c * pts[:, 1]
        half = box.size / 2
        inside = (np.abs(bx) <= half[0]) & (np.abs(by) <= half[1]) & (np.abs(pts[:, 2]) <= half[2])
        count = inside.reshape(-1, subs.shape[0]).sum(1)
        i, j, k = idx.T
        better = count > best[i, j, k]
        best[i[better], j[better], k[better]] = count[better]
        sem[i[better], j[better], k[better]] = RAW_TO_NOIGNORE[box.cls]
        ov = _overlaps(ego_from_local[:3, :3] @ rot, half, _to(ego_from_local, box.center[None])[0], centres)
        touched.append((idx[ov & (count == 0)], int(RAW_TO_NOIGNORE[box.cls])))
    for idx, cls in touched:
        i, j, k = idx.T
        free = sem[i, j, k] == 17
        sem[i[free], j[free], k[free]] = cls


def _ground_semantics(world, local_from_ego: np.ndarray, sem: np.ndarray) -> None:
    """Free voxels that the ground plane (scene-local z = 0) crosses take the ground class under their centre."""
    R, t = local_from_ego[:3, :3], local_from_ego[:3, 3]
    centres = _centres()
    corner = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], np.float64) * VOXEL / 2
    zc = centres @ R[2] + t[2]  # scene-local height of each centre (linear: corners differ by constants)
    dz = corner @ R[2]
    crosses = (zc + dz.min() <= 0) & (zc + dz.max() >= 0) & (sem.reshape(-1) == 17)
    p = _to(local_from_ego, centres[crosses])
    sem.reshape(-1)[np.nonzero(crosses)[0]] = RAW_TO_NOIGNORE[_ground_class(p[:, 0], p[:, 1], world)]


# ---------------------------------------------------------------------------------------------------------
# visibility
# ---------------------------------------------------------------------------------------------------------

def _lidar_mask(points_ego: np.ndarray, origin: np.ndarray, step: float = 0.1) -> np.ndarray:
    """Voxels crossed by the segments origin -> point, or holding a point: bool (X, Y, Z)."""
    mask = np.zeros(int(np.prod(SHAPE)), bool)
    d = points_ego - origin
    dist = np.linalg.norm(d, axis=1)
    for s in range(0, len(points_ego), 4096):
        dd, dl = d[s:s + 4096], dist[s:s + 4096]
        n = np.ceil(dl / step).astype(np.int64) + 1
        ray = np.repeat(np.arange(len(dd)), n)
        frac = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(np.maximum(n - 1, 1), n)
        p = origin + dd[ray] * frac[:, None]
        flat, ok = _voxel_index(p)
        mask[flat[ok]] = True
    return mask.reshape(SHAPE)


def _camera_mask(world, local_from_ego: np.ndarray, cams: list[tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        tuple[int, int]]]) -> np.ndarray:
    """cams: (cam -> scene-local (4, 4), ego(t_cam) -> scene-local (4, 4), K (3, 3), (H, W)) per camera."""
    centres = _centres()
    local = _to(local_from_ego, centres)
    visible = np.zeros(len(centres), bool)
    ego_from_local = np.linalg.inv(local_from_ego)
    for cam_local, ego_local_cam, K, (H, W) in cams:
        pc = _to(np.linalg.inv(cam_local), local)
        z = pc[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = K[0, 0] * pc[:, 0] / z + K[0, 2]
            v = K[1, 1] * pc[:, 1] / z + K[1, 2]
        cand = np.nonzero((z > 0.1) & (u >= 0) & (u < W) & (v >= 0) & (v < H) & ~visible)[0]
        if cand.size == 0:
            continue
        o = cam_local[:3, 3]
        d = local[cand] - o
        dist = np.linalg.norm(d, axis=1)
        dn = d / dist[:, None]
        R = ego_local_cam[:3, :3]
        ego_box = _Box(EGO, R @ _EGO_BOX.center + ego_local_cam[:3, 3], _EGO_BOX.size,
                       float(np.arctan2(R[1, 0], R[0, 0])))
        t_hit, _ = _cast(world, o, np.ascontiguousarray(dn.T), extra=[ego_box])
        # entry distance of each ray into its voxel's box (axis-aligned in the ego frame)
        o_e = _to(ego_from_local, o[None])[0]
        d_e = dn @ ego_from_local[:3, :3].T
        c_e = centres[cand]
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (c_e - VOXEL / 2 - o_e) / d_e
            t2 = (c_e + VOXEL / 2 - o_e) / d_e
        t_enter = np.nanmax(np.fmin(t1, t2), axis=1)
        visible[cand[t_hit >= t_enter - 1e-4]] = True
    return visible.reshape(SHAPE)


# ---------------------------------------------------------------------------------------------------------
# one scene / the dataroot
# ---------------------------------------------------------------------------------------------------------

def scene_labels(root: Path, tables: dict[str, list[dict]], scene_index: int, seed: int
                 ) -> dict[str, dict[str, np.ndarray]]:
    """``{sample token: {semantics, mask_lidar, mask_camera, check}}`` for one scene of a version's tables."""
    scene = tables["scene"][scene_index]
    n = int(scene["nbr_samples"])
    rng = np.random.default_rng([seed, zlib.crc32(scene["name"].encode()), scene_index])
    world = _make_world(rng, 10.0 * 0.5 * max(n - 1, 0))
    l2g = np.eye(4)
    c, s = np.cos(world.heading), np.sin(world.heading)
    l2g[:3, :3] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    l2g[:3, 3] = world.origin
    g2l = np.linalg.inv(l2g)
    channel = {x["token"]: x["channel"] for x in tables["sensor"]}
    cs = {x["token"]: x for x in tables["calibrated_sensor"]}
    poses = {x["token"]: x for x in tables["ego_pose"]}
    by_sample: dict[str, dict[str, dict]] = {}
    for sd in tables["sample_data"]:
        if sd["is_key_frame"]:
            by_sample.setdefault(sd["sample_token"], {})[channel[cs[sd["calibrated_sensor_token"]]["sensor_token"]]] = sd
    lidarseg = {x["sample_data_token"]: x["filename"] for x in tables.get("lidarseg", [])}
    out = {}
    for sample in (x for x in tables["sample"] if x["scene_token"] == scene["token"]):
        sds = by_sample[sample["token"]]
        lid = sds["LIDAR_TOP"]

        def rec_tf(rec):
            return transform_matrix(rec["translation"], rec["rotation"])

        local_from_ego = g2l @ rec_tf(poses[lid["ego_pose_token"]])
        lidar2ego = rec_tf(cs[lid["calibrated_sensor_token"]])
        sem = np.full(SHAPE, 17, np.uint8)
        _box_semantics(world, local_from_ego, sem)
        _ground_semantics(world, local_from_ego, sem)
        pts = np.fromfile(root / lid["filename"], np.float32).reshape(-1, 5)[:, :3].astype(np.float64)
        labels = np.fromfile(root / lidarseg[lid["token"]], np.uint8)
        keep = labels != EGO
        p_ego = _to(lidar2ego, pts[keep])
        mask_lidar = _lidar_mask(p_ego, lidar2ego[:3, 3])
        cams = []
        for ch, sd in sds.items():
            if ch == "LIDAR_TOP":
                continue
            ego_local_cam = g2l @ rec_tf(poses[sd["ego_pose_token"]])
            cam_cs = cs[sd["calibrated_sensor_token"]]
            cams.append((ego_local_cam @ rec_tf(cam_cs), ego_local_cam, np.asarray(cam_cs["camera_intrinsic"]),
                         (int(sd["height"]), int(sd["width"]))))
        mask_camera = _camera_mask(world, local_from_ego, cams)
        # check: returns of world objects fall in voxels of their own class
        obj = labels[keep] != NOISE
        flat, ok = _voxel_index(p_ego[obj])
        hit_cls = sem.reshape(-1)[flat[ok]]
        agree = float(np.mean(hit_cls == RAW_TO_NOIGNORE[labels[keep][obj][ok]])) if ok.any() else 0.0
        out[sample["token"]] = {"semantics": sem, "mask_lidar": mask_lidar.astype(np.uint8),
                                "mask_camera": mask_camera.astype(np.uint8), "agreement": agree}
    return out


def make_synthetic_occ3d(dataroot: str | Path, seed: int | None = None, min_agreement: float = 0.8,
                         overwrite: bool = False, out: str | Path | None = None,
                         scenes: set[str] | None = None) -> list[Path]:
    """Write ``<dataroot>/gts/<scene>/<token>/labels.npz`` for every keyframe of the versions with lidarseg.

    seed: the synthetic generator's seed (default: read from each scene's description). out: the ``gts`` folder
    to write (default ``<dataroot>/gts``); scenes: only these scene names (default all). Raises ValueError when
    the rebuilt world disagrees with the LiDAR labels (fewer than ``min_agreement`` of the returns in voxels of
    their class), FileExistsError when ``gts/`` exists and ``overwrite`` is off. Returns the files written.
    """
    from p3d_common.atomic import atomic_path

    root = Path(dataroot)
    gts = Path(out) if out is not None else root / "gts"
    if gts.exists() and any(gts.iterdir()) and not overwrite:
        raise FileExistsError(f"{gts} already exists; pass overwrite=True (--overwrite)")
    written: list[Path] = []
    for folder in sorted(p for p in root.glob("v1.0-*") if (p / "lidarseg.json").is_file()):
        tables = _tables(folder)
        tables["lidarseg"] = json.loads((folder / "lidarseg.json").read_text())
        for s_idx, scene in enumerate(tables["scene"]):
            if scenes is not None and scene["name"] not in scenes:
                continue
            m = re.search(r"seed (-?\d+)", scene.get("description", ""))
            scene_seed = seed if seed is not None else (int(m.group(1)) if m else None)
            if scene_seed is None:
                raise ValueError(f"{folder}/scene.json: scene {scene['name']} names no seed; pass seed=")
            for token, lab in scene_labels(root, tables, s_idx, scene_seed).items():
                if lab["agreement"] < min_agreement:
                    raise ValueError(f"{root}: scene {scene['name']} sample {token}: only "
                                     f"{100 * lab['agreement']:.1f}% of the LiDAR returns fall in voxels of their "
                                     f"class; the rebuilt world does not match (wrong seed?)")
                path = gts / scene["name"] / token / "labels.npz"
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.savez_compressed(f, semantics=lab["semantics"], mask_lidar=lab["mask_lidar"],
                                        mask_camera=lab["mask_camera"])
                written.append(path)
    return written
