"""The label taxonomy: raw nuScenes-lidarseg ids, the 16 semantic classes, 'empty', and the ignore values.

Two label spaces are used (docs/pipeline.md §1.7):

* raw lidarseg ids 0..31 (one uint8 per point; 32 is the 'empty' id of the original's label maps, never in
  the data), named by :data:`LIDARSEG_CLASSES`;
* noIgnore classes, named by :data:`CLASS_NAMES` (index = class id): 0 = ignore (noise and the unmapped raw
  classes), 1..16 = the standard lidarseg classes, 17 = empty (free space).

Voxel ground truth and losses mark "not scored" with :data:`IGNORE_LABEL` (255).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "EMPTY_CLASS",
    "IGNORE_CLASS",
    "IGNORE_LABEL",
    "LIDARSEG_CLASSES",
    "NUM_SEMANTIC_CLASSES",
    "RAW_TO_AGNOSTIC",
    "RAW_TO_NOIGNORE",
    "SEMANTIC_CLASSES",
]

#: The 32 raw nuScenes-lidarseg classes, position = raw id (the ``index`` field of category.json).
LIDARSEG_CLASSES: tuple[str, ...] = (
    "noise",
    "animal",
    "human.pedestrian.adult",
    "human.pedestrian.child",
    "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer",
    "human.pedestrian.stroller",
    "human.pedestrian.wheelchair",
    "movable_object.barrier",
    "movable_object.debris",
    "movable_object.pushable_pullable",
    "movable_object.trafficcone",
    "static_object.bicycle_rack",
    "vehicle.bicycle",
    "vehicle.bus.bendy",
    "vehicle.bus.rigid",
    "vehicle.car",
    "vehicle.construction",
    "vehicle.emergency.ambulance",
    "vehicle.emergency.police",
    "vehicle.motorcycle",
    "vehicle.trailer",
    "vehicle.truck",
    "flat.driveable_surface",
    "flat.other",
    "flat.sidewalk",
    "flat.terrain",
    "static.manmade",
    "static.other",
    "static.vegetation",
    "vehicle.ego",
)

#: noIgnore class names, index = class id: 0 = ignore, 1..16 = the standard 16 lidarseg classes, 17 = empty.
CLASS_NAMES: tuple[str, ...] = (
    "ignore",
    "barrier",
    "bicycle",
    "bus",
    "car",
    "construction_vehicle",
    "motorcycle",
    "pedestrian",
    "traffic_cone",
    "trailer",
    "truck",
    "driveable_surface",
    "other_flat",
    "sidewalk",
    "terrain",
    "manmade",
    "vegetation",
    "empty",
)
IGNORE_CLASS = 0  #: noIgnore id of 'ignore' (noise and unmapped raw classes)
EMPTY_CLASS = 17  #: noIgnore id of 'empty' (free space)
NUM_SEMANTIC_CLASSES = 16
SEMANTIC_CLASSES: tuple[int, ...] = tuple(range(1, NUM_SEMANTIC_CLASSES + 1))  #: the class ids 1..16
IGNORE_LABEL = 255  #: value of a voxel that is not scored (unobserved GT, the loss's ignore_index)

_NOIGNORE_PAIRS = {
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


def _build_noignore() -> np.ndarray:
    lut = np.zeros(33, dtype=np.uint8)  # everything not listed -> 0 (ignore)
    for raw, cls in _NOIGNORE_PAIRS.items():
        lut[raw] = cls
    lut.setflags(write=False)
    return lut


def _build_agnostic() -> np.ndarray:
    lut = np.ones(33, dtype=np.uint8)  # every raw id 0..31 -> 1 (occupied), including noise and ego
    lut[32] = 0  # 'empty'
    lut.setflags(write=False)
    return lut


#: uint8 (33,): raw lidarseg id (0..31, 32 = empty) -> noIgnore class (0 ignore, 1..16, 17 empty).
RAW_TO_NOIGNORE: np.ndarray = _build_noignore()
#: uint8 (33,): raw lidarseg id -> class-agnostic occupancy label (0..31 -> 1, 32 -> 0).
RAW_TO_AGNOSTIC: np.ndarray = _build_agnostic()
