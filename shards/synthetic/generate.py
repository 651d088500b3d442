"""Writing a synthetic nuScenes dataroot: scenes, keyframes, sensor files, annotations, tables.

:func:`make_synthetic_nuscenes` writes ``v1.0-mini`` (with lidarseg) and ``v1.0-test``; each version is one
:class:`_VersionWriter` that adds scene after scene (:meth:`_VersionWriter.add_scene`) and then writes its
tables. The order of the random draws and of the token counter is part of the output: the same seed gives
byte-identical files.
"""

from __future__ import annotations

import itertools
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.geometry import CAMERAS
from shards.synthetic.frames import _record_matrix, _rz, _Tokens, matrix_to_quaternion
from shards.synthetic.render import _jpeg, _pixel_rays, _render
from shards.synthetic.sensors import _CAM_DT_US, _ego_pose_record, _lidar_sweep, _make_calibration, _Motion
from shards.synthetic.tables import _attribute_for, _static_tables, _write_json, _write_png_map
from shards.synthetic.world import _make_world, _World

#: Real v1.0-mini scene names: two of ``mini_train`` and one of ``mini_val``.
DEFAULT_MINI_SCENES: tuple[str, ...] = ("scene-0061", "scene-0553", "scene-0103")
#: Real test-split scene names.
DEFAULT_TEST_SCENES: tuple[str, ...] = ("scene-0077", "scene-0078")

_TABLES = ("calibrated_sensor", "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation",
           "instance", "map", "lidarseg")


@dataclass
class _Scene:
    """What one scene's keyframes share: its world, random stream, log, calibration and ego motion."""

    rng: np.random.Generator
    world: _World
    logfile: str
    log_token: str
    map_token: str
    calib: dict[str, dict]
    motion: _Motion
    token: str
    sample_tokens: list[str]
    prev_sd: dict[str, dict] = field(default_factory=dict)  # channel -> its last sample_data record
    inst_anns: dict[int, list[dict]] = field(default_factory=dict)  # box index -> its annotations


@dataclass
class _VersionWriter:
    """Writes one version (``v1.0-mini`` or ``v1.0-test``) of the dataset under ``root``."""

    root: Path
    version: str
    seed: int
    static: dict[str, list[dict]]
    with_lidarseg: bool
    hw: tuple[int, int]
    n_azimuth: int
    jpeg_quality: int
    scene_offset: int
    tables: dict[str, list[dict]] = field(default_factory=lambda: {k: [] for k in _TABLES})

    def __post_init__(self) -> None:
        self.tok = _Tokens(self.seed * 1000 + (1 if self.with_lidarseg else 2))
        self.sensors = {s["channel"]: s for s in self.static["sensor"]}
        self.cat_by_index = {c["index"]: c for c in self.static["category"]}
        self.attrs = {a["name"]: a["token"] for a in self.static["attribute"]}
        self.rays_cache: dict[bytes, np.ndarray] = {}

    # ---- one scene ---------------------------------------------------------------------------------------

    def add_scene(self, s_idx: int, name: str, samples_per_scene: int) -> None:
        """Build scene ``name`` (index ``s_idx`` in this version) and write its keyframes and map."""
        scene = self._start_scene(s_idx, name, samples_per_scene)
        for k, stok in enumerate(scene.sample_tokens):
            self._add_keyframe(scene, k, stok)
        self._link_instances(scene)
        self.tables["scene"].append(
            {
                "token": scene.token,
                "log_token": scene.log_token,
                "nbr_samples": samples_per_scene,
                "first_sample_token": scene.sample_tokens[0],
                "last_sample_token": scene.sample_tokens[-1],
                "name": name,
                "description": f"Synthetic street, seed {self.seed}",
            }
        )
        _write_png_map(self.root / f"maps/{scene.map_token}.png")

    def _start_scene(self, s_idx: int, name: str, samples_per_scene: int) -> _Scene:
        """The scene's world, log + map records, calibration, ego motion and keyframe tokens."""
        tok, t, n = self.tok, self.tables, self.scene_offset + s_idx
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode()), s_idx])
        travel = 10.0 * 0.5 * max(samples_per_scene - 1, 0)
        world = _make_world(rng, travel)
        date = f"2018-07-{10 + n % 18:02d}-11-{(13 * s_idx) % 60:02d}-{(7 * s_idx) % 60:02d}"
        logfile = f"n{900 + n:03d}-{date}+0800"
        log = {
            "token": tok("log"),
            "logfile": logfile,
            "vehicle": f"n{900 + n:03d}",
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
        calib = _make_calibration(rng, tok, self.sensors)
        t["calibrated_sensor"].extend(calib[ch] for ch in ("LIDAR_TOP", *CAMERAS))
        t0 = 1_531_000_000_000_000 + n * 86_400_000_000 + int(rng.integers(0, 10**9))
        motion = _Motion(
            t0,
            -1.75,
            float(rng.uniform(8.5, 11.5)),
            float(rng.normal(0, 0.03)),
            float(np.deg2rad(rng.uniform(0.2, 0.6))),
        )
        scene_tok = tok("scene")
        self.rays_cache.clear()  # intrinsics differ per log; keep memory bounded
        sample_toks = [tok("sample") for _ in range(samples_per_scene)]
        return _Scene(rng, world, logfile, log["token"], map_token, calib, motion, scene_tok, sample_toks)

    # ---- one keyframe ------------------------------------------------------------------------------------

    def _add_keyframe(self, scene: _Scene, k: int, stok: str) -> None:
        """The sample record, the LiDAR sweep (+ lidarseg), six camera images, their sample_data records and,
        with lidarseg, the box annotations."""
        toks = scene.sample_tokens
        ts = scene.motion.t0 + k * 500_000 + int(scene.rng.integers(-2000, 2000))
        self.tables["sample"].append(
            {
                "token": stok,
                "timestamp": ts,
                "scene_token": scene.token,
                "prev": toks[k - 1] if k > 0 else "",
                "next": toks[k + 1] if k + 1 < len(toks) else "",
            }
        )
        ego_local, hits, lidar_record = self._write_lidar(scene, ts)
        records = [lidar_record] + [self._write_camera(scene, cam, ts) for cam in CAMERAS]
        self._add_sample_data(scene, stok, records)
        if self.with_lidarseg:  # annotations (not in the test split, like nuScenes)
            self._annotate(scene, stok, ego_local, hits)

    def _write_lidar(self, scene: _Scene, ts: int) -> tuple[np.ndarray, list[int], tuple]:
        """Ray cast and write the sweep (and its lidarseg labels): ego pose (4, 4) scene-local, the hit box id
        of every point, and the sweep's sample_data fields."""
        tok, root = self.tok, self.root
        lid_pose = _ego_pose_record(tok, scene.world, scene.motion, ts)
        self.tables["ego_pose"].append(lid_pose)
        ego_local = scene.motion.local_pose(ts)
        lidar_local = ego_local @ _record_matrix(scene.calib["LIDAR_TOP"])
        pts, labels, hits = _lidar_sweep(scene.rng, scene.world, lidar_local, ego_local, self.n_azimuth)
        fname = f"samples/LIDAR_TOP/{scene.logfile}__LIDAR_TOP__{ts}.pcd.bin"
        (root / fname).write_bytes(pts.tobytes())
        sd_tok = tok("sample_data")
        if self.with_lidarseg:
            lfile = f"lidarseg/{self.version}/{sd_tok}_lidarseg.bin"
            (root / lfile).write_bytes(labels.tobytes())
            self.tables["lidarseg"].append({"token": sd_tok, "sample_data_token": sd_tok, "filename": lfile})
        return ego_local, hits, ("LIDAR_TOP", sd_tok, lid_pose, fname, "pcd", 0, 0)

    def _write_camera(self, scene: _Scene, cam: str, ts: int) -> tuple:
        """Render and write one camera's JPEG at its own timestamp; returns its sample_data fields."""
        tc = ts + _CAM_DT_US[cam] + int(scene.rng.integers(-1500, 1500))
        cam_pose = _ego_pose_record(self.tok, scene.world, scene.motion, tc)
        self.tables["ego_pose"].append(cam_pose)
        cam_local = scene.motion.local_pose(tc) @ _record_matrix(scene.calib[cam])
        K = np.asarray(scene.calib[cam]["camera_intrinsic"], np.float64)
        key = K.tobytes()
        if key not in self.rays_cache:
            self.rays_cache[key] = _pixel_rays(K, self.hw)
        img = _render(scene.world, cam_local, K, self.rays_cache[key])
        cfile = f"samples/{cam}/{scene.logfile}__{cam}__{tc}.jpg"
        (self.root / cfile).write_bytes(_jpeg(img, self.jpeg_quality))
        return cam, self.tok("sample_data"), cam_pose, cfile, "jpg", self.hw[0], self.hw[1]

    def _add_sample_data(self, scene: _Scene, stok: str, records: list[tuple]) -> None:
        """One sample_data record per sensor file, chained to the same channel's previous keyframe."""
        for ch, tok_sd, pose, fn, fmt, h, w in records:
            rec = {
                "token": tok_sd,
                "sample_token": stok,
                "ego_pose_token": pose["token"],
                "calibrated_sensor_token": scene.calib[ch]["token"],
                "timestamp": pose["timestamp"],
                "fileformat": fmt,
                "is_key_frame": True,
                "height": h,
                "width": w,
                "filename": fn,
                "prev": "",
                "next": "",
            }
            if ch in scene.prev_sd:
                rec["prev"] = scene.prev_sd[ch]["token"]
                scene.prev_sd[ch]["next"] = tok_sd
            scene.prev_sd[ch] = rec
            self.tables["sample_data"].append(rec)

    def _annotate(self, scene: _Scene, stok: str, ego_local: np.ndarray, hits: list[int]) -> None:
        """A sample_annotation for every annotated box within 60 m of the ego, with its LiDAR point count."""
        world = scene.world
        counts = np.bincount(np.asarray([h for h in hits if h >= 0], np.int64), minlength=len(world.boxes) + 1)
        ego_xy = ego_local[:2, 3]
        for b_idx, box in enumerate(world.boxes):
            if not box.annotate or np.hypot(*(box.center[:2] - ego_xy)) > 60.0:
                continue
            g = world.local_to_global
            ann = {
                "token": self.tok("sample_annotation"),
                "sample_token": stok,
                "instance_token": "",
                "visibility_token": "4",
                "attribute_tokens": _attribute_for(box.cls, self.attrs),
                "translation": [float(v) for v in g[:3, :3] @ box.center + g[:3, 3]],
                "size": [float(box.size[1]), float(box.size[0]), float(box.size[2])],
                "rotation": matrix_to_quaternion(_rz(world.heading + box.yaw)),
                "prev": "",
                "next": "",
                "num_lidar_pts": int(counts[b_idx]),
                "num_radar_pts": 0,
            }
            scene.inst_anns.setdefault(b_idx, []).append(ann)

    def _link_instances(self, scene: _Scene) -> None:
        """One instance per annotated box: its annotations chained in time (prev / next)."""
        for b_idx, anns in sorted(scene.inst_anns.items()):
            inst_tok = self.tok("instance")
            for a, b in itertools.pairwise(anns):
                a["next"], b["prev"] = b["token"], a["token"]
            for a in anns:
                a["instance_token"] = inst_tok
            self.tables["sample_annotation"].extend(anns)
            self.tables["instance"].append(
                {
                    "token": inst_tok,
                    "category_token": self.cat_by_index[scene.world.boxes[b_idx].cls]["token"],
                    "nbr_annotations": len(anns),
                    "first_annotation_token": anns[0]["token"],
                    "last_annotation_token": anns[-1]["token"],
                }
            )

    # ---- the tables --------------------------------------------------------------------------------------

    def write_tables(self) -> None:
        """``<root>/<version>/<table>.json`` for the static and the generated tables."""
        table_dir = self.root / self.version
        table_dir.mkdir(parents=True, exist_ok=True)
        for name, rows in self.static.items():
            _write_json(table_dir / f"{name}.json", rows)
        for name, rows in self.tables.items():
            if name == "lidarseg" and not self.with_lidarseg:
                continue
            _write_json(table_dir / f"{name}.json", rows)


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
    """Write one version: every scene of ``scenes``, then the tables."""
    writer = _VersionWriter(root, version, seed, static, with_lidarseg, hw, n_azimuth, jpeg_quality, scene_offset)
    for s_idx, name in enumerate(scenes):
        writer.add_scene(s_idx, name, samples_per_scene)
    writer.write_tables()


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
    _check_scenes(samples_per_scene, mini_scenes, test_scenes, test_samples_per_scene)
    _prepare_root(root, overwrite)
    static = _static_tables(seed)
    common = {"seed": seed, "static": static, "hw": img_hw, "n_azimuth": n_azimuth, "jpeg_quality": jpeg_quality}
    _generate_version(root, "v1.0-mini", mini_scenes, samples_per_scene, with_lidarseg=True, scene_offset=0,
                      **common)
    if test_scenes:
        _generate_version(root, "v1.0-test", test_scenes, test_samples_per_scene, with_lidarseg=False,
                          scene_offset=len(mini_scenes), **common)
    return root


def _check_scenes(samples_per_scene: int, mini_scenes: Sequence[str], test_scenes: Sequence[str],
                  test_samples_per_scene: int) -> None:
    """ValueError for a keyframe count below 1, no mini scene, or a scene name given twice."""
    if samples_per_scene < 1 or (test_scenes and test_samples_per_scene < 1):
        raise ValueError("make_synthetic_nuscenes: samples_per_scene and test_samples_per_scene must be >= 1")
    if not mini_scenes:
        raise ValueError("make_synthetic_nuscenes: mini_scenes must name at least one scene")
    if len(set(mini_scenes) | set(test_scenes)) != len(mini_scenes) + len(test_scenes):
        raise ValueError(
            f"make_synthetic_nuscenes: scene names must be unique, got {mini_scenes} + {test_scenes}"
        )


def _prepare_root(root: Path, overwrite: bool) -> None:
    """Refuse (FileExistsError) or, with ``overwrite``, remove a previous synthetic dataset; make the folders."""
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
