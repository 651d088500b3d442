"""Pictures of the predicted occupancy: camera images, bird's-eye views and a 3D voxel view of one sample.

Pure functions on numpy / torch arrays; matplotlib is imported only by :func:`render_sample` (Agg backend,
no display needed). Class ids are those of the evaluation (pipeline.md §4): 1..16 the nuScenes-lidarseg
classes of :data:`p3d_common.labels.CLASS_NAMES`, 17 empty / free (never drawn), 255 unobserved, 0 ignore (noise).

Orientation of every top-down picture (:func:`bev_image`): image columns run along LiDAR +x (left to right),
image rows along LiDAR -y (the top row is the largest y), i.e. the LiDAR frame seen from above with x to the
right and y up. In nuScenes' LIDAR_TOP frame x points to the right of the car and y forwards, so the car
drives towards the top of the picture, matching the front camera row drawn above the back row.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from p3d_common.labels import CLASS_NAMES, EMPTY_CLASS
from p3d_common.labels import IGNORE_LABEL as UNOBSERVED

#: uint8 (18, 3) RGB per class id: 0 ignore/noise, 1..16 the nuScenes-lidarseg colours of the devkit's
#: colormap for the merged classes, 17 empty (the BEV background; never drawn in 3D).
CLASS_COLORS = np.array([
    (0, 0, 0),          # 0 ignore / noise
    (112, 128, 144),    # 1 barrier              slategrey
    (220, 20, 60),      # 2 bicycle              crimson
    (255, 127, 80),     # 3 bus                  coral
    (255, 158, 0),      # 4 car                  orange
    (233, 150, 70),     # 5 construction_vehicle darksalmon
    (255, 61, 99),      # 6 motorcycle           red
    (0, 0, 230),        # 7 pedestrian           blue
    (47, 79, 79),       # 8 traffic_cone         darkslategrey
    (255, 140, 0),      # 9 trailer              darkorange
    (255, 99, 71),      # 10 truck               tomato
    (0, 207, 191),      # 11 driveable_surface   nutonomy green
    (175, 0, 75),       # 12 other_flat
    (75, 0, 75),        # 13 sidewalk
    (112, 180, 60),     # 14 terrain
    (222, 184, 135),    # 15 manmade             burlywood
    (0, 175, 0),        # 16 vegetation          green
    (255, 255, 255),    # 17 empty (background of the BEV)
], dtype=np.uint8)

#: RGB of columns that hold no observed voxel at all (every voxel 255).
UNOBSERVED_COLOR = (190, 190, 190)

#: Display layout of the six cameras: front row, back row (names of shards.geometry.CAMERAS).
CAMERA_LAYOUT = (("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
                 ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"))


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def drawable(volume) -> np.ndarray:
    """bool mask of the voxels that are drawn: neither empty (17) nor unobserved (255). (X, Y, Z) -> (X, Y, Z)."""
    v = _numpy(volume)
    return (v != EMPTY_CLASS) & (v != UNOBSERVED)


def bev_image(volume, colors: np.ndarray = CLASS_COLORS, empty_color: Sequence[int] | None = None,
              unobserved_color: Sequence[int] = UNOBSERVED_COLOR) -> np.ndarray:
    """Top-down view of a label volume: the class of the highest drawn voxel of every (x, y) column.

    volume: int (X, Y, Z) class ids (numpy or torch), z index 0 at the bottom.
    colors: uint8 (>= 18, 3) RGB per class id (:data:`CLASS_COLORS`); ``empty_color`` defaults to
    ``colors[17]``.
    Returns uint8 (Y, X, 3): pixel ``[r, c]`` shows column ``x = c``, ``y = Y - 1 - r`` (x to the right, y up,
    as the LiDAR frame seen from above). Columns without a drawn voxel are ``empty_color`` when at least one
    of their voxels is observed (free), ``unobserved_color`` when all are 255.
    """
    v = _numpy(volume)
    if v.ndim != 3:
        raise ValueError(f"volume must be (X, Y, Z), got shape {v.shape}")
    colors = np.asarray(colors, dtype=np.uint8)
    v = v.astype(np.int64)
    if not np.all((v >= 0) & ((v < len(colors)) | (v == UNOBSERVED))):
        raise ValueError(f"volume holds class ids outside 0..{len(colors) - 1} and {UNOBSERVED}")
    z_count = v.shape[2]
    draw = drawable(v)
    has = draw.any(axis=2)  # (X, Y)
    top = z_count - 1 - np.argmax(draw[:, :, ::-1], axis=2)  # highest drawn z per column
    label = np.take_along_axis(v, top[..., None], axis=2)[..., 0]
    out = np.empty(v.shape[:2] + (3,), dtype=np.uint8)
    out[:] = colors[EMPTY_CLASS] if empty_color is None else np.asarray(empty_color, np.uint8)
    out[(v == UNOBSERVED).all(axis=2)] = np.asarray(unobserved_color, np.uint8)
    out[has] = colors[label[has]]
    # (X, Y, 3) -> (Y, X, 3) with y growing upwards.
    return np.ascontiguousarray(out.transpose(1, 0, 2)[::-1])


def teacher_pca_colors(features, max_fit: int = 20000, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """RGB colours of features from their 3-component PCA, robustly scaled: similar features, similar colours.

    features: float (M, C) (numpy or torch). The principal axes are fitted on at most ``max_fit`` rows (evenly
    strided, so the result is deterministic), each axis' sign is fixed (its largest loading positive), and
    each component is mapped linearly from its [low, high] percentiles to [0, 255] and clipped.
    Returns uint8 (M, 3). Fewer than 3 dimensions of variation leave the missing channels at 128.
    """
    f = _numpy(features).astype(np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (M, C), got shape {f.shape}")
    m = f.shape[0]
    out = np.full((m, 3), 128, dtype=np.uint8)
    if m < 2:
        return out
    fit = f[:: max(1, -(-m // max_fit))]
    mean = fit.mean(axis=0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    axes = vt[:3]
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    proj = (f - mean) @ axes.T  # (M, k), k <= 3
    lo = np.percentile(proj, low, axis=0)
    hi = np.percentile(proj, high, axis=0)
    span = hi - lo
    ok = span > 1e-12 * max(1.0, float(np.abs(proj).max()))
    scaled = np.clip((proj - lo) / np.where(ok, span, 1.0), 0.0, 1.0)
    out[:, : proj.shape[1]] = np.where(ok, np.round(255.0 * scaled), 128).astype(np.uint8)
    return out


def downsample_labels(volume, factor: int) -> np.ndarray:
    """Majority label of the drawn voxels in every ``factor x factor`` (x, y) block; z is kept.

    volume: int (X, Y, Z) -> int64 (ceil(X / f), ceil(Y / f), Z); a block without drawn voxel is empty (17).
    """
    v = _numpy(volume).astype(np.int64)
    if factor <= 1:
        return v
    x, y, z = v.shape
    px, py = -x % factor, -y % factor
    v = np.pad(v, ((0, px), (0, py), (0, 0)), constant_values=EMPTY_CLASS)
    blocks = v.reshape(v.shape[0] // factor, factor, v.shape[1] // factor, factor, z)
    blocks = blocks.transpose(0, 2, 4, 1, 3).reshape(v.shape[0] // factor, v.shape[1] // factor, z, -1)
    classes = np.arange(0, EMPTY_CLASS)
    counts = np.stack([(blocks == c).sum(-1) for c in classes], axis=-1)  # (X', Y', Z, 17)
    return np.where(counts.max(-1) > 0, classes[counts.argmax(-1)], EMPTY_CLASS)


def _images_hwc(images) -> np.ndarray:
    """uint8 (6, 3, H, W) or (6, H, W, 3) -> (6, H, W, 3)."""
    im = _numpy(images)
    if im.ndim != 4 or im.shape[0] != 6:
        raise ValueError(f"images must be (6, 3, H, W) or (6, H, W, 3), got {im.shape}")
    if im.shape[1] == 3 and im.shape[-1] != 3:
        im = im.transpose(0, 2, 3, 1)
    return im.astype(np.uint8, copy=False)


def _present_classes(*volumes) -> set[int]:
    found: set[int] = set()
    for vol in volumes:
        if vol is not None:
            found |= {int(c) for c in np.unique(_numpy(vol)) if 0 < c < EMPTY_CLASS}
    return found


def _draw_bev(ax, volume, title: str, extent, colors) -> None:
    ax.imshow(bev_image(volume, colors), extent=extent, interpolation="nearest")
    ax.plot([0], [0], marker="^", markersize=7, color="black", markeredgecolor="white")  # the ego car
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("x (m)" if extent else "x (voxels)", fontsize=8)
    ax.set_ylabel("y (m)  forward" if extent else "y (voxels)", fontsize=8)
    ax.tick_params(labelsize=7)


def _draw_voxels(ax, volume, colors, max_voxels: int, grid) -> None:
    v = _numpy(volume).astype(np.int64)
    factor = 1
    while factor < max(v.shape[:2]) and drawable(downsample_labels(v, factor)).sum() > max_voxels:
        factor += 1
    sub = downsample_labels(v, factor)
    filled = drawable(sub)
    face = np.zeros(sub.shape + (4,), dtype=np.float32)
    face[..., :3] = colors[np.where(filled, sub, 0)] / 255.0
    face[..., 3] = 1.0
    if grid is not None:
        lo, hi = np.asarray(grid.pc_min, float), np.asarray(grid.pc_max, float)
        vs = (hi - lo) / np.asarray(v.shape) * np.array([factor, factor, 1])
    else:
        lo, vs = np.zeros(3), np.array([factor, factor, 1.0])
    edges = np.meshgrid(*[lo[i] + vs[i] * np.arange(sub.shape[i] + 1) for i in range(3)], indexing="ij")
    if filled.any():
        ax.voxels(*edges, filled, facecolors=face, edgecolor=(0, 0, 0, 0.15), linewidth=0.2)
    else:
        ax.text2D(0.5, 0.5, "no voxel predicted occupied", transform=ax.transAxes, ha="center", fontsize=10)
    hi = lo + vs * np.asarray(sub.shape)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_zlim(lo[2], hi[2])
    span = hi - lo
    ax.set_box_aspect((span[0], span[1], max(span[2] * 3.0, 0.08 * span[0])), zoom=1.25)  # z exaggerated 3x
    ax.set_zticks([lo[2], hi[2]])
    ax.view_init(elev=35, azim=-100)  # seen from behind the car, slightly to its right
    ax.tick_params(labelsize=6, pad=0)
    unit = "m" if grid is not None else "voxels"
    ax.set_xlabel(f"x ({unit})", fontsize=7, labelpad=-4)
    ax.set_ylabel(f"y ({unit})", fontsize=7, labelpad=-4)
    ax.set_zlabel("z", fontsize=7, labelpad=-6)
    ax.text2D(0.5, 0.98, "prediction, 3D" + (f" ({factor}x{factor} blocks)" if factor > 1 else ""),
              transform=ax.transAxes, ha="center", va="top", fontsize=11)


def render_sample(images, prediction, gt=None, teacher_points=None, *, title: str | None = None,
                  grid=None, camera_names: Sequence[str] | None = None, show_3d: bool = True,
                  max_voxels_3d: int = 3000, colors: np.ndarray = CLASS_COLORS, dpi: int = 100):
    """One figure for one sample: six cameras, BEV of prediction and GT side by side, a legend, a 3D view.

    images: uint8 (6, 3, H, W) or (6, H, W, 3) RGB in ``camera_names`` order (default
    :data:`shards.geometry.CAMERAS`); drawn as front row FRONT_LEFT, FRONT, FRONT_RIGHT and back row
    BACK_LEFT, BACK, BACK_RIGHT.
    prediction: int (X, Y, Z) class ids (17 empty). gt: int (X, Y, Z) (17 free, 255 unobserved) or None.
    teacher_points: optional ``(cam (M,), rowcol (M, 2), rgb uint8 (M, 3))``: dots drawn on camera ``cam`` at
    (row, col) of the original image, e.g. teacher targets coloured by :func:`teacher_pca_colors`.
    grid: optional :class:`shards.geometry.GridSpec` for axes in metres (voxel indices otherwise).
    show_3d: add a 3D voxel view of the prediction; at most ``max_voxels_3d`` cubes (coarser x-y blocks,
    majority label, beyond that).
    Returns a matplotlib ``Figure`` (not shown; save it with ``fig.savefig``).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    ims, names, pred = _checked_inputs(images, prediction, gt, camera_names)
    colors = np.asarray(colors, np.uint8)
    h, w = ims.shape[1:3]

    fig_w = 18.0
    cam_h = fig_w / 3 * h / w
    bottom_h = 5.2
    fig = Figure(figsize=(fig_w, 2 * cam_h + bottom_h + (0.5 if title else 0.1)), dpi=dpi, layout="constrained")
    outer = fig.add_gridspec(2, 1, height_ratios=[2 * cam_h, bottom_h])
    _draw_cameras(fig, outer[0].subgridspec(2, 3, wspace=0.01, hspace=0.02), ims, names, teacher_points)

    ratios = [1, 1, 1.25, 0.75] if show_3d else [1, 1, 0.75]
    bottom = outer[1].subgridspec(1, len(ratios), width_ratios=ratios)
    _draw_top_views(fig, bottom, pred, gt, grid, colors)
    if show_3d:
        _draw_voxels(fig.add_subplot(bottom[2], projection="3d"), pred, colors, max_voxels_3d, grid)
    _draw_legend(fig.add_subplot(bottom[-1]), pred, gt, colors)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def _checked_inputs(images, prediction, gt, camera_names: Sequence[str] | None):
    """Panel inputs checked: (images uint8 (6, H, W, 3), the 6 camera names, prediction int (X, Y, Z))."""
    from shards.geometry import CAMERAS

    ims = _images_hwc(images)
    names = tuple(camera_names or CAMERAS)
    if len(names) != 6:
        raise ValueError(f"need 6 camera names, got {names}")
    pred = _numpy(prediction)
    if pred.ndim != 3:
        raise ValueError(f"prediction must be (X, Y, Z), got {pred.shape}")
    if gt is not None and _numpy(gt).shape != pred.shape:
        raise ValueError(f"gt {_numpy(gt).shape} and prediction {pred.shape} differ in shape")
    return ims, names, pred


def _draw_cameras(fig, cams, ims: np.ndarray, names: tuple[str, ...], teacher_points) -> None:
    """Camera panels: the 2 x 3 grid ``cams`` in :data:`CAMERA_LAYOUT` order, teacher points as dots on top.

    ims: uint8 (6, H, W, 3) in ``names`` order; teacher_points: ``(cam (M,), rowcol (M, 2), rgb (M, 3))`` or None.
    """
    h, w = ims.shape[1:3]
    if teacher_points is not None:
        t_cam, t_rc, t_rgb = (_numpy(a) for a in teacher_points)
    for r, row in enumerate(CAMERA_LAYOUT):
        for c, name in enumerate(row):
            ax = fig.add_subplot(cams[r, c])
            if name not in names:
                raise ValueError(f"camera {name} missing from {names}")
            i = names.index(name)
            step = max(1, w // 800)  # decimate large images; extent keeps original pixel coordinates
            ax.imshow(ims[i, ::step, ::step], extent=(0, w, h, 0), interpolation="bilinear")
            if teacher_points is not None:
                sel = t_cam == i
                ax.scatter(t_rc[sel, 1], t_rc[sel, 0], c=t_rgb[sel] / 255.0, s=3, linewidths=0)
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_axis_off()
            ax.set_title(name.removeprefix("CAM_").replace("_", " ").lower(), fontsize=10, pad=2)


def _draw_top_views(fig, bottom, pred: np.ndarray, gt, grid, colors: np.ndarray) -> None:
    """Top-view panels: prediction in ``bottom[0]``, ground truth (or a note that there is none) in ``bottom[1]``.

    pred, gt: int (X, Y, Z); axes in metres when ``grid`` is given, voxel indices otherwise.
    """
    extent = None
    if grid is not None:
        extent = (grid.pc_min[0], grid.pc_max[0], grid.pc_min[1], grid.pc_max[1])
    n_pred = int(drawable(pred).sum())
    _draw_bev(fig.add_subplot(bottom[0]), pred, f"prediction, top view ({n_pred} occupied voxels)", extent, colors)
    ax_gt = fig.add_subplot(bottom[1])
    if gt is not None:
        _draw_bev(ax_gt, gt, "ground truth, top view", extent, colors)
    else:
        ax_gt.text(0.5, 0.5, "no ground truth\n(split without lidarseg)", ha="center", va="center", fontsize=11)
        ax_gt.set_axis_off()


def _draw_legend(ax_leg, pred: np.ndarray, gt, colors: np.ndarray) -> None:
    """Legend panel: every class, greyed "(absent)" where neither prediction nor GT holds it; empty, unobserved."""
    from matplotlib.patches import Patch

    ax_leg.set_axis_off()
    present = _present_classes(pred, gt)
    handles = [Patch(facecolor=colors[k] / 255.0, edgecolor="black", linewidth=0.4,
                     label=CLASS_NAMES[k] + ("" if k in present else "  (absent)"))
               for k in range(1, EMPTY_CLASS)]
    handles.append(Patch(facecolor=colors[EMPTY_CLASS] / 255.0, edgecolor="black", linewidth=0.4,
                         label="empty / free"))
    handles.append(Patch(facecolor=np.asarray(UNOBSERVED_COLOR) / 255.0, edgecolor="black", linewidth=0.4,
                         label="unobserved"))
    leg = ax_leg.legend(handles=handles, loc="center", fontsize=9, frameon=False, title="classes",
                        handlelength=1.4)
    for text, k in zip(leg.get_texts(), range(1, EMPTY_CLASS)):
        if k not in present:
            text.set_color("0.55")
