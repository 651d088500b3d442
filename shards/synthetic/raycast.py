"""Ray casting against the synthetic world: the slab test for one box and the closest hit over the world."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shards.synthetic.frames import _rz
from shards.synthetic.world import _Box, _World


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
