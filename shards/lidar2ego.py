"""The LiDAR -> ego calibration of every keyframe, read from a nuScenes dataroot's JSON tables.

The shards carry everything in the LiDAR frame; Occ3D-nuScenes' voxels are in the ego frame of the LiDAR
keyframe (the ego vehicle body frame: x forwards, y left, z up, origin at the rear axle). The transform between
the two is the LIDAR_TOP ``calibrated_sensor`` record of the keyframe, which this module reads straight from
``<dataroot>/<version>/{sensor,calibrated_sensor,sample_data}.json`` (no devkit, no other table).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shards.geometry import transform_matrix

__all__ = ["KNOWN_VERSIONS", "lidar2ego_by_sample"]

#: Versions looked for when none is named.
KNOWN_VERSIONS: tuple[str, ...] = ("v1.0-trainval", "v1.0-test", "v1.0-mini")


def _table(folder: Path, name: str) -> list[dict]:
    path = folder / f"{name}.json"
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (needed for the LiDAR -> ego calibration)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of records")  # noqa: TRY004 (bad file content)
    return rows


def _version_table(folder: Path) -> dict[str, np.ndarray]:
    channel = {s["token"]: s["channel"] for s in _table(folder, "sensor")}
    lidar_cs = {c["token"]: transform_matrix(c["translation"], c["rotation"])
                for c in _table(folder, "calibrated_sensor") if channel.get(c["sensor_token"]) == "LIDAR_TOP"}
    out: dict[str, np.ndarray] = {}
    for sd in _table(folder, "sample_data"):
        if sd.get("is_key_frame") and sd["calibrated_sensor_token"] in lidar_cs:
            out[sd["sample_token"]] = lidar_cs[sd["calibrated_sensor_token"]]
    return out


def lidar2ego_by_sample(dataroot: str | Path, versions: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{sample token: (4, 4) float64}`` mapping LiDAR points to the ego frame, for every keyframe.

    dataroot: the nuScenes folder; versions: table folders to read (default: those of :data:`KNOWN_VERSIONS`
    that exist). Raises FileNotFoundError naming the folder when none is there.
    """
    root = Path(dataroot)
    names = list(versions) if versions else [v for v in KNOWN_VERSIONS if (root / v).is_dir()]
    if not names:
        raise FileNotFoundError(f"{root}: no nuScenes table folder ({', '.join(KNOWN_VERSIONS)}) found")
    out: dict[str, np.ndarray] = {}
    for v in names:
        if not (root / v).is_dir():
            raise FileNotFoundError(f"{root / v}: no such nuScenes table folder")
        out.update(_version_table(root / v))
    return out
