"""nuScenes tables of the synthetic dataset: the static ones, attributes, and small file writers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from p3d_common.labels import LIDARSEG_CLASSES
from shards.geometry import CAMERAS
from shards.synthetic.frames import _Tokens
from shards.synthetic.world import BICYCLE, BUS, CAR, CONSTR, MOTO, PED, TRAILER, TRUCK

_CATEGORY_DESCRIPTIONS = {
    "noise": "Any lidar return that does not correspond to a physical object.",
    "vehicle.ego": "The vehicle on which the sensors are mounted.",
}

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


def _write_png_map(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 20), np.uint8), "L").save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
