"""The analytic 3D world of one synthetic scene: a straight street with flat ground classes and upright boxes.

Everything is in the scene-local frame: x along the road, y to the left, z up, ground at z = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shards.synthetic.frames import _pose, _rz

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


@dataclass
class _Street:
    """Placing boxes at random on the street of one world: x in [x_lo, x_hi], the ego's lane kept free."""

    rng: np.random.Generator
    world: _World
    x_lo: float
    x_hi: float
    travel: float

    def ok_path(self, x: float, y: float, r: float) -> bool:
        """Outside the ego's lane around its path x in [0, travel] (with margins)."""
        return not (-3.8 - r < y < 0.3 + r and -10.0 - r < x < self.travel + 14.0 + r)

    def place(
        self,
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
        """Up to ``n`` boxes of class ``cls`` at |y| in ``y_range`` (30 tries each for a free spot)."""
        rng, boxes = self.rng, self.world.boxes
        for _ in range(n):
            for _attempt in range(30):
                x = rng.uniform(self.x_lo, self.x_hi)
                y = rng.uniform(*y_range) * (rng.choice([-1.0, 1.0]) if both_sides else 1.0)
                r = 0.5 * float(np.hypot(size[0], size[1]))
                if self.ok_path(x, y, r) and _free(boxes, x, y, r):
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


def _add_buildings(street: _Street) -> None:
    """Buildings on both sides behind the sidewalk and a strip of terrain, with driveways between some."""
    rng, world = street.rng, street.world
    for side in (-1.0, 1.0):
        x = street.x_lo + rng.uniform(0, 8)
        while x < street.x_hi:
            length = rng.uniform(10, 24)
            depth = rng.uniform(8, 16)
            height = rng.uniform(6, 22)
            y_in = rng.uniform(14.5, 19.0)
            if rng.random() < 0.8:
                world.boxes.append(
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


def _add_trees(street: _Street) -> None:
    """Trees (a trunk and a canopy, both vegetation) on the terrain strip."""
    rng, boxes = street.rng, street.world.boxes
    for _ in range(10):
        for _attempt in range(30):
            x, y = rng.uniform(street.x_lo, street.x_hi), rng.choice([-1.0, 1.0]) * rng.uniform(11.0, 13.0)
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


def _add_objects(street: _Street) -> None:
    """Poles, parked and moving-lane vehicles, people and small objects on the sidewalk and kerb."""
    place = street.place
    place(MANMADE, (0.3, 0.3, 6.0), (10.2, 10.6), 6, yaw_jitter=0.0, annotate=False)
    place(CAR, (4.6, 1.9, 1.6), (5.0, 5.6), 8, yaw_jitter=0.05, kind="vehicle")
    place(CAR, (4.5, 1.85, 1.55), (1.4, 2.1), 3, yaw_jitter=0.02, kind="vehicle", both_sides=False)
    place(TRUCK, (7.5, 2.4, 3.0), (4.8, 5.4), 1, yaw_jitter=0.03, kind="vehicle")
    place(BUS, (11.5, 2.6, 3.3), (1.5, 2.0), 1, yaw_jitter=0.02, kind="vehicle", both_sides=False)
    place(TRAILER, (6.0, 2.4, 2.6), (11.5, 13.0), 1, yaw_jitter=0.05, kind="vehicle")
    place(CONSTR, (5.5, 2.6, 3.2), (11.5, 13.0), 1, yaw_jitter=0.2, kind="vehicle")
    place(MOTO, (2.0, 0.8, 1.3), (6.2, 6.6), 2, yaw_jitter=0.1)
    place(PED, (0.6, 0.6, 1.75), (7.4, 9.6), 8, yaw_jitter=1.5)
    place(BICYCLE, (1.8, 0.6, 1.1), (7.3, 7.8), 3, yaw_jitter=0.1)
    place(CONE, (0.4, 0.4, 0.7), (6.0, 6.7), 6, yaw_jitter=0.5)
    place(BARRIER, (2.0, 0.5, 1.0), (6.3, 6.8), 4, yaw_jitter=0.05)


def _make_world(rng: np.random.Generator, travel: float) -> _World:
    """Random street around the ego path x in [0, travel] on y = -1.75 (scene-local frame)."""
    world = _World(
        origin=np.array([rng.uniform(300, 1800), rng.uniform(600, 1600), 0.0]),
        heading=rng.uniform(-np.pi, np.pi),
    )
    street = _Street(rng, world, -60.0, travel + 80.0, travel)
    _add_buildings(street)  # first: they are large
    _add_trees(street)
    _add_objects(street)
    return world


def _ground_class(x: np.ndarray, y: np.ndarray, world: _World) -> np.ndarray:
    """Raw lidarseg class of ground points at scene-local (x, y): (N,) uint8."""
    ay = np.abs(y)
    cls = np.where(ay < ROAD_HALF, ROAD, np.where(ay < SIDEWALK_OUT, SIDEWALK, TERRAIN)).astype(np.uint8)
    for x0, x1, y0, y1 in world.flat_patches:
        cls[(x >= x0) & (x < x1) & (y >= y0) & (y < y1)] = OTHER_FLAT
    return cls
