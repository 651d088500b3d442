"""Camera images of the synthetic world: per-pixel ray casting, flat colours with shading and texture, JPEG.

The fixed noise table behind the ground texture and the image grain is built on first use (6.5 MB).
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

from shards.synthetic.frames import _rz
from shards.synthetic.raycast import _box_frame, _ray_box
from shards.synthetic.world import (
    BARRIER,
    BICYCLE,
    BUS,
    CAR,
    CONE,
    CONSTR,
    MANMADE,
    MOTO,
    OTHER_FLAT,
    PED,
    ROAD,
    SIDEWALK,
    TERRAIN,
    TRAILER,
    TRUCK,
    VEGETATION,
    _Box,
    _ground_class,
    _World,
)

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


@functools.cache
def _noise() -> np.ndarray:
    """A fixed table of white noise in [0, 1): ground cells (mod its shape) and image grain (pixel rows, cols).

    (1024, 1600) float32, read-only, built once on first use.
    """
    table = np.random.default_rng(20231208).random((1024, 1600), dtype=np.float32)
    table.setflags(write=False)
    return table


def __getattr__(name: str) -> object:  # ``_NOISE`` stays importable, built lazily
    if name == "_NOISE":
        return _noise()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def _cell_noise(x: np.ndarray, y: np.ndarray, cells_per_m: float) -> np.ndarray:
    """Deterministic white noise in [0, 1) of the ground cell holding scene-local (x, y): (N,) float32."""
    i = np.floor(x * cells_per_m).astype(np.int64) & 1023
    j = np.floor(y * cells_per_m).astype(np.int64) % 1600
    return _noise()[i, j]


def _grain(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Fixed per-pixel noise in [0, 1) for image rows r0:r1 and columns c0:c1: (r1 - r0, c1 - c0) float32."""
    noise = _noise()
    nr, nc = noise.shape
    if r1 <= nr and c1 <= nc:
        return noise[r0:r1, c0:c1]
    return noise[np.ix_(np.arange(r0, r1) % nr, np.arange(c0, c1) % nc)]


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
    img = np.empty((3, H, W), np.float32)
    depth = np.full((H, W), np.inf, np.float32)
    _draw_sky(img, d)
    _draw_ground(img, depth, world, o, d)
    local_to_cam = np.linalg.inv(cam_local)
    for box in world.boxes:  # z-buffered against the ground and each other
        rect = _box_rect(box, local_to_cam, K, (H, W))
        if rect is not None:
            _draw_box(img, depth, world, box, o, d, rect)
    out = np.empty((H, W, 3), np.uint8)
    for ch in range(3):
        out[..., ch] = np.clip(img[ch] + 0.5, 0, 255)
    return out


def _draw_sky(img: np.ndarray, d: np.ndarray) -> None:
    """A vertical gradient from the horizon colour to the top colour into ``img`` (3, H, W)."""
    up = np.clip(d[2] * (3.0 / np.sqrt(d[0] * d[0] + d[1] * d[1] + 1e-6)), 0.0, 1.0)
    for ch in range(3):
        img[ch] = _SKY_HORIZON[ch] + float(_SKY_TOP[ch] - _SKY_HORIZON[ch]) * up


def _draw_ground(img: np.ndarray, depth: np.ndarray, world: _World, o: np.ndarray, d: np.ndarray) -> None:
    """The ground plane z = 0 (class colour x texture, distance haze) where rays go down, within 400 m."""
    dz = d[2]
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


def _draw_box(img: np.ndarray, depth: np.ndarray, world: _World, box: _Box, o: np.ndarray, d: np.ndarray,
              rect: tuple[int, ...]) -> None:
    """One box inside its pixel rectangle where it is nearer than ``depth``: sun shading per face, windows
    on buildings and vehicles, grain."""
    r0, r1, c0, c1 = rect
    dsub = d[:, r0:r1, c0:c1]
    tb = _ray_box(o, dsub, box)
    dsub_depth = depth[r0:r1, c0:c1]  # a view
    closer = tb < dsub_depth
    if not closer.any():
        return
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


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
