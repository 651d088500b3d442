"""Walk a nuScenes dataroot with the devkit and produce plain per-sample dicts.

Two steps, so that the (large) devkit object lives in one process only:

1. :func:`plan_split` (needs the devkit): one :class:`SampleRecord` per keyframe of a split - file
   paths, image sizes, intrinsics and the LiDAR-to-camera transforms, all plain Python / numpy, so a
   record pickles cheaply to a worker process. File problems found by ``stat`` (missing JPEG,
   ``.pcd.bin`` size not a multiple of 20 bytes, missing lidarseg file, lidarseg count != point count)
   are collected per sample, each naming the file.
2. :func:`load_sample` (no devkit): reads the bytes of one record: the six JPEGs as original bytes,
   the LiDAR sweep as float32 (N, 4), the lidarseg labels as uint8 (N,).

Split rule (:data:`SPLITS_BY_VERSION`): ``v1.0-mini`` provides ``train``/``val`` (the devkit's
``mini_train``/``mini_val`` scene lists), ``v1.0-trainval`` provides ``train``/``val``, ``v1.0-test``
provides ``test``. Any other (version, split) pair raises :class:`DataError` naming the allowed ones.

Missing scenes: the devkit's split lists name the scenes of the full dataset. A listed scene that is not
in the version's ``scene`` table is *not* an error: the real ``v1.0-mini`` holds 10 of the 850 trainval
scenes, so only scenes present in the version count, and the manifest reports the listed / present /
missing counts per split. A present scene whose files are missing on disk *is* an error (it names the
file). A split with no scene present at all is an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shards.schema import CAMERAS, SCHEMA_VERSION

#: (version -> {our split name -> devkit ``create_splits_scenes`` key}).
SPLITS_BY_VERSION: dict[str, dict[str, str]] = {
    "v1.0-mini": {"train": "mini_train", "val": "mini_val"},
    "v1.0-trainval": {"train": "train", "val": "val"},
    "v1.0-test": {"test": "test"},
}

LIDAR_CHANNEL = "LIDAR_TOP"
PCD_COLUMNS = 5  # x, y, z, intensity, ring index
JPEG_SOI = b"\xff\xd8\xff"


class DataError(ValueError):
    """Bad input data or arguments; the message names the file (or the argument) and the problem."""


def allowed_splits_text() -> str:
    """Human-readable list of the (version: splits) pairs accepted by :func:`devkit_split_name`."""
    return "; ".join(f"{v}: {', '.join(s)}" for v, s in SPLITS_BY_VERSION.items())


def devkit_split_name(version: str, split: str) -> str:
    """Map (version, split) to the devkit scene-list name, or raise :class:`DataError`."""
    if version not in SPLITS_BY_VERSION:
        raise DataError(f"unknown nuScenes version {version!r}; allowed: {allowed_splits_text()}")
    splits = SPLITS_BY_VERSION[version]
    if split not in splits:
        raise DataError(
            f"unknown split {split!r} for version {version!r}; allowed: {allowed_splits_text()}"
        )
    return splits[split]


def version_for_split(versions: list[str], split: str) -> str:
    """Pick the one version among ``versions`` that provides ``split`` (see :data:`SPLITS_BY_VERSION`)."""
    for v in versions:
        if v not in SPLITS_BY_VERSION:
            raise DataError(f"unknown nuScenes version {v!r}; allowed: {allowed_splits_text()}")
    hits = [v for v in versions if split in SPLITS_BY_VERSION[v]]
    if len(hits) != 1:
        what = "no" if not hits else "more than one"
        raise DataError(
            f"split {split!r}: {what} version among {versions} provides it; allowed: {allowed_splits_text()}"
        )
    return hits[0]


@dataclass
class SampleRecord:
    """Everything needed to read one keyframe without the devkit (picklable).

    Paths are relative to the dataroot. Arrays: ``cam_intrinsic`` float64 (6, 3, 3),
    ``lidar2cam`` float64 (6, 4, 4) (LiDAR at t_lidar -> camera at t_cam, ego motion included),
    ``lidar2ego`` float64 (4, 4) (LiDAR -> ego body frame: the LIDAR_TOP ``calibrated_sensor`` record),
    ``cam_hw`` int (6, 2) as (H, W).
    """

    token: str
    split: str
    version: str
    scene_name: str
    scene_token: str
    timestamp: int
    cam_files: list[str]
    cam_hw: np.ndarray
    lidar_file: str
    lidarseg_file: str | None
    cam_intrinsic: np.ndarray
    lidar2cam: np.ndarray
    lidar2ego: np.ndarray
    source_sizes: list[int] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        """The ``meta.json`` content of this sample (JSON types only)."""
        h, w = (int(x) for x in self.cam_hw[0])
        return {
            "schema_version": SCHEMA_VERSION,
            "version": self.version,
            "split": self.split,
            "sample_token": self.token,
            "scene_name": self.scene_name,
            "scene_token": self.scene_token,
            "timestamp": int(self.timestamp),
            "cameras": list(CAMERAS),
            "img_hw": [h, w],
            "cam_hw": [[int(a), int(b)] for a, b in self.cam_hw],
            "cam_files": list(self.cam_files),
            "lidar_file": self.lidar_file,
            "lidarseg_file": self.lidarseg_file,
            "has_lidarseg": self.lidarseg_file is not None,
        }


@dataclass
class SplitPlan:
    """Result of :func:`plan_split`: the records in order, scene counts and the problems found."""

    split: str
    version: str
    devkit_split: str
    records: list[SampleRecord]
    scenes_listed: int
    scenes_present: int
    has_lidarseg: bool
    problems: list[tuple[str, str]]  # (sample token, "path: problem")

    @property
    def scenes_missing(self) -> int:
        """Listed scenes absent from the version's scene table (not an error, see module doc)."""
        return self.scenes_listed - self.scenes_present


def open_nuscenes(dataroot: str, version: str) -> Any:
    """Open the devkit ``NuScenes`` object; turn its bare asserts into :class:`DataError` naming files.

    The devkit asserts that the number of lidarseg label files equals the number of lidarseg records,
    without saying which file is missing; we list the missing ones.
    """
    from nuscenes.nuscenes import NuScenes

    table_root = os.path.join(dataroot, version)
    if not os.path.isdir(table_root):
        raise DataError(f"{table_root}: nuScenes tables of version {version!r} not found")
    try:
        return NuScenes(version=version, dataroot=dataroot, verbose=False)
    except AssertionError as exn:
        import json

        seg_json = os.path.join(table_root, "lidarseg.json")
        if os.path.exists(seg_json):
            with open(seg_json) as f:
                recs = json.load(f)
            missing = [r["filename"] for r in recs if not os.path.exists(os.path.join(dataroot, r["filename"]))]
            if missing:
                shown = ", ".join(os.path.join(dataroot, m) for m in missing[:10])
                raise DataError(
                    f"missing lidarseg file(s) ({len(missing)}): {shown}"
                    + (" ..." if len(missing) > 10 else "")
                ) from exn
        raise DataError(f"{table_root}: the nuScenes devkit refused the tables: {exn}") from exn


def _lidar_to_camera(nusc: Any, lidar_sd: dict, cam_sd: dict) -> np.ndarray:
    """4x4 LiDAR(t_lidar) -> camera(t_cam) through the devkit records (ego motion included)."""
    from shards.geometry import lidar_to_camera

    return np.asarray(
        lidar_to_camera(
            nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"]),
            nusc.get("ego_pose", lidar_sd["ego_pose_token"]),
            nusc.get("ego_pose", cam_sd["ego_pose_token"]),
            nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"]),
        ),
        dtype=np.float64,
    )


def _lidar_to_ego(nusc: Any, lidar_sd: dict) -> np.ndarray:
    """4x4 LiDAR -> ego (body frame at t_lidar): the keyframe's LIDAR_TOP calibrated_sensor record."""
    from shards.geometry import transform_matrix

    cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
    return np.asarray(transform_matrix(cs["translation"], cs["rotation"]), dtype=np.float64)


def _stat_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def check_record_files(rec: SampleRecord, dataroot: str) -> list[str]:
    """Cheap ``stat`` checks of one record's files; returns problems as ``"path: what"`` strings.

    Also fills ``rec.source_sizes`` (bytes of the 6 JPEGs, the ``.pcd.bin`` and the lidarseg file).
    """
    problems: list[str] = []
    sizes: list[int] = []
    for rel in rec.cam_files:
        p = os.path.join(dataroot, rel)
        s = _stat_size(p)
        if s is None:
            problems.append(f"{p}: camera JPEG is missing")
        elif s == 0:
            problems.append(f"{p}: camera JPEG is empty")
        sizes.append(s or 0)
    lp = os.path.join(dataroot, rec.lidar_file)
    ls = _stat_size(lp)
    n_points = None
    if ls is None:
        problems.append(f"{lp}: LiDAR .pcd.bin is missing")
    elif ls == 0 or ls % (PCD_COLUMNS * 4):
        problems.append(
            f"{lp}: LiDAR .pcd.bin is truncated: {ls} bytes is not a positive multiple of "
            f"{PCD_COLUMNS * 4} (N x {PCD_COLUMNS} float32)"
        )
    else:
        n_points = ls // (PCD_COLUMNS * 4)
    sizes.append(ls or 0)
    if rec.lidarseg_file is not None:
        sp = os.path.join(dataroot, rec.lidarseg_file)
        ss = _stat_size(sp)
        if ss is None:
            problems.append(f"{sp}: lidarseg label file is missing")
        elif n_points is not None and ss != n_points:
            problems.append(f"{sp}: lidarseg has {ss} labels but {lp} has {n_points} points")
        sizes.append(ss or 0)
    rec.source_sizes = sizes
    return problems


def plan_split(nusc: Any, split: str, check_files: bool = True) -> SplitPlan:
    """List the keyframes of ``split`` for the devkit object ``nusc`` (scene-list order, time order).

    Args:
        nusc: ``nuscenes.nuscenes.NuScenes`` of a version that provides ``split``.
        split: ``train``/``val``/``test`` (see :data:`SPLITS_BY_VERSION`).
        check_files: run :func:`check_record_files` on every record.

    Raises:
        DataError: unknown split for the version, or a split without any scene present.
    """
    from nuscenes.utils.splits import create_splits_scenes

    version = nusc.version
    dk_split = devkit_split_name(version, split)
    listed = create_splits_scenes()[dk_split]
    by_name = {s["name"]: s for s in nusc.scene}
    present = [by_name[n] for n in listed if n in by_name]
    if not present:
        raise DataError(
            f"split {split!r} ({dk_split}): none of its {len(listed)} scenes is in "
            f"{os.path.join(nusc.dataroot, version)}/scene.json"
        )
    has_seg = hasattr(nusc, "lidarseg") and len(getattr(nusc, "lidarseg", [])) > 0
    records: list[SampleRecord] = []
    problems: list[tuple[str, str]] = []
    for scene in present:
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            lidar_sd = nusc.get("sample_data", sample["data"][LIDAR_CHANNEL])
            cam_sds = [nusc.get("sample_data", sample["data"][c]) for c in CAMERAS]
            seg_file = None
            if has_seg:
                try:
                    seg_file = nusc.get("lidarseg", lidar_sd["token"])["filename"]
                except KeyError:
                    msg = (f"{nusc.dataroot}/{version}/lidarseg.json: no lidarseg record for LIDAR_TOP "
                           f"sample_data {lidar_sd['token']}")
                    problems.append((token, msg))
                    seg_file = "<missing lidarseg record>"
            rec = SampleRecord(
                token=token,
                split=split,
                version=version,
                scene_name=scene["name"],
                scene_token=scene["token"],
                timestamp=int(sample["timestamp"]),
                cam_files=[sd["filename"] for sd in cam_sds],
                cam_hw=np.array([[sd["height"], sd["width"]] for sd in cam_sds], dtype=np.int64),
                lidar_file=lidar_sd["filename"],
                lidarseg_file=seg_file,
                cam_intrinsic=np.stack(
                    [
                        np.asarray(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"],
                                   dtype=np.float64)
                        for sd in cam_sds
                    ]
                ),
                lidar2cam=np.stack([_lidar_to_camera(nusc, lidar_sd, sd) for sd in cam_sds]),
                lidar2ego=_lidar_to_ego(nusc, lidar_sd),
            )
            if len({tuple(hw) for hw in rec.cam_hw.tolist()}) != 1:
                msg = (f"{os.path.join(nusc.dataroot, rec.cam_files[0])}: cameras of sample {token} have "
                       f"different image sizes {rec.cam_hw.tolist()}")
                problems.append((token, msg))
            if check_files:
                problems += [(token, p) for p in check_record_files(rec, nusc.dataroot)]
            records.append(rec)
            token = sample["next"]
    return SplitPlan(
        split=split,
        version=version,
        devkit_split=dk_split,
        records=records,
        scenes_listed=len(listed),
        scenes_present=len(present),
        has_lidarseg=has_seg,
        problems=problems,
    )


def read_points(path: str) -> np.ndarray:
    """Read a nuScenes ``.pcd.bin`` (N x 5 float32) and return float32 (N, 4) x, y, z, intensity."""
    size = _stat_size(path)
    if size is None:
        raise DataError(f"{path}: LiDAR .pcd.bin is missing")
    if size == 0 or size % (PCD_COLUMNS * 4):
        raise DataError(
            f"{path}: LiDAR .pcd.bin is truncated: {size} bytes is not a positive multiple of {PCD_COLUMNS * 4}"
        )
    raw = np.fromfile(path, dtype="<f4")
    if raw.size * 4 != size:
        raise DataError(f"{path}: short read ({raw.size * 4} of {size} bytes)")
    return np.ascontiguousarray(raw.reshape(-1, PCD_COLUMNS)[:, :4])


def read_lidarseg(path: str, n_points: int, lidar_path: str = "") -> np.ndarray:
    """Read a lidarseg ``.bin`` (one uint8 per point) and check its length; returns uint8 (N,)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: lidarseg label file is missing")
    labels = np.fromfile(path, dtype=np.uint8)
    if labels.size != n_points:
        raise DataError(f"{path}: lidarseg has {labels.size} labels but {lidar_path or 'the sweep'} "
                        f"has {n_points} points")
    return labels


def read_jpeg_bytes(path: str) -> bytes:
    """Read a JPEG file's original bytes; checks it exists, is non-empty and starts with the SOI marker."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: camera JPEG is missing") from None
    if not data.startswith(JPEG_SOI):
        raise DataError(f"{path}: not a JPEG file (no SOI marker; {len(data)} bytes)")
    return data


def load_sample(rec: SampleRecord, dataroot: str) -> dict[str, Any]:
    """Read one record's files (no devkit needed).

    Returns:
        dict with ``token`` (str), ``meta`` (dict, see :meth:`SampleRecord.meta`), ``images``
        (list of 6 JPEG ``bytes``, :data:`CAMERAS` order, original bytes), ``points`` float32 (N, 4),
        ``lidarseg`` uint8 (N,) or None, ``cam_intrinsic`` float64 (6, 3, 3), ``lidar2cam`` float64 (6, 4, 4),
        ``lidar2ego`` float64 (4, 4).

    Raises:
        DataError: naming the file and the problem.
    """
    images = [read_jpeg_bytes(os.path.join(dataroot, f)) for f in rec.cam_files]
    lidar_path = os.path.join(dataroot, rec.lidar_file)
    points = read_points(lidar_path)
    seg = None
    if rec.lidarseg_file is not None:
        seg = read_lidarseg(os.path.join(dataroot, rec.lidarseg_file), len(points), lidar_path)
    return {
        "token": rec.token,
        "meta": rec.meta(),
        "images": images,
        "points": points,
        "lidarseg": seg,
        "cam_intrinsic": rec.cam_intrinsic,
        "lidar2cam": rec.lidar2cam,
        "lidar2ego": rec.lidar2ego,
    }


def iter_samples(dataroot: str, version: str, split: str) -> Iterator[dict[str, Any]]:
    """Yield the :func:`load_sample` dicts of one split, in scene-list then time order.

    Raises:
        DataError: bad split/version, or the first file problem found by the ``stat`` checks.
    """
    nusc = open_nuscenes(dataroot, version)
    plan = plan_split(nusc, split)
    if plan.problems:
        raise DataError(plan.problems[0][1])
    for rec in plan.records:
        yield load_sample(rec, dataroot)
