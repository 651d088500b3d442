"""Shared by bench_eval_gt.py and gpu_suite.py: synthetic val shards (schema 3: val stores its evaluation GT for
the paper grid) and the val loader's samples/s with and without the evaluation ground truth (ray cast + voxel
majority label): read from the shards, computed by the current ray cast, or by the first implementation
(tests/_raycast_ref.py, patched in for the "before" rows)."""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_synthetic_shards(work_dir: str, samples_per_scene: int = 2, img_hw: tuple[int, int] = (900, 1600),
                          n_azimuth: int = 1084, eval_gt_splits: list[str] | None = None,
                          name: str = "shards") -> str:
    """Synthetic nuScenes (v1.0-mini: 8 scenes) -> train/val shards under ``work_dir``; returns the shard dir.

    Full-size images and ~34k LiDAR points per sweep (1084 azimuths x 32 beams), as nuScenes. The val split
    stores its evaluation GT for the paper grid (``eval_gt_splits`` None, the builder's default; ``[]``: none).
    The dataroot is made once per ``work_dir``.
    """
    from shards.synthetic import make_synthetic_nuscenes
    from shards.writer import build_shards

    root = os.path.join(work_dir, "nuscenes")
    if not os.path.isdir(root):
        make_synthetic_nuscenes(root, seed=0, samples_per_scene=samples_per_scene, test_scenes=(), img_hw=img_hw,
                                n_azimuth=n_azimuth)
    out = os.path.join(work_dir, name)
    build_shards(str(root), ["v1.0-mini"], ["train", "val"], out, workers=1, samples_per_shard=2, progress=False,
                 eval_gt_splits=eval_gt_splits)
    return out


@contextlib.contextmanager
def computed_eval_gt() -> Iterator[None]:
    """Run the loader as if nothing were stored: the evaluation GT is always computed (in this process)."""
    import shards.sample as sample_mod

    saved = sample_mod.stored_eval_targets
    sample_mod.stored_eval_targets = lambda *a, **k: None
    try:
        yield
    finally:
        sample_mod.stored_eval_targets = saved


@contextlib.contextmanager
def reference_raycast() -> Iterator[None]:
    """Run the loader with the first ray-cast implementation (in this process: use num_workers=0 or fork)."""
    import sys

    import shards.evalgt as evalgt_mod

    sys.path.insert(0, ROOT)
    from tests._raycast_ref import raycast_eval_gt_reference

    saved = evalgt_mod.raycast_eval_gt
    evalgt_mod.raycast_eval_gt = raycast_eval_gt_reference
    try:
        yield
    finally:
        evalgt_mod.raycast_eval_gt = saved


@contextlib.contextmanager
def voxel_label_always() -> Iterator[None]:
    """The loader as before the first change: ``voxel_label`` computed for every sample with lidarseg."""
    import numpy as np

    import shards.sample as sample_mod
    from shards.geometry import grid_indices, voxel_majority_label

    saved = sample_mod.compute_targets

    def compute_targets(points, lidarseg, *args, **kwargs):
        out = saved(points, lidarseg, *args, **kwargs)
        if lidarseg is not None and out["voxel_label"] is None:
            labels = sample_mod.map_labels(lidarseg, sample_mod.RAW_TO_NOIGNORE)
            grid = args[3] if len(args) > 3 else kwargs.get("grid", sample_mod.DEFAULT_GRID)
            out["voxel_label"] = voxel_majority_label(grid_indices(points, grid, np.float64), labels, grid)
        return out

    sample_mod.compute_targets = compute_targets
    try:
        yield
    finally:
        sample_mod.compute_targets = saved


def loader_rate(shard_dir: str, split: str, eval_gt: bool, workers: int, passes: int = 1,
                grid=None) -> dict[str, Any]:
    """Samples/s of ``make_loader(split, batch_size=1)`` over ``passes`` passes (after the first batch)."""
    from shards.loader import list_shards, make_loader

    urls, _ = list_shards(shard_dir, split)
    kwargs = {} if grid is None else {"grid": grid}
    loader = make_loader(urls * passes, split, batch_size=1, num_workers=workers, eval_gt=eval_gt, shuffle=False,
                         **kwargs)
    t0 = time.perf_counter()
    n = 0
    t_first = None
    for batch in loader:
        if t_first is None:
            t_first = time.perf_counter()
        else:
            n += len(batch["tokens"])
        assert (batch["eval_gt"] is not None) == eval_gt
    t1 = time.perf_counter()
    return {"split": split, "eval_gt": eval_gt, "workers": workers, "samples": n,
            "seconds": t1 - (t_first or t0), "samples_per_s": n / max(t1 - (t_first or t0), 1e-9),
            "first_batch_s": (t_first or t1) - t0}


def raycast_ms(shard_dir: str, split: str = "val", max_samples: int = 4, grid=None) -> dict[str, Any]:
    """ms per sample of the current and the reference ray cast on the split's point clouds (read through
    the loader without eval GT), and whether their outputs are identical."""
    import sys

    import numpy as np

    from shards.geometry import raycast_eval_gt
    from shards.loader import list_shards, make_loader

    sys.path.insert(0, ROOT)
    from tests._raycast_ref import raycast_eval_gt_reference

    urls, _ = list_shards(shard_dir, split)
    clouds = []
    for batch in make_loader(urls, split, batch_size=1, num_workers=0, eval_gt=False, shuffle=False):
        if batch["labels"] is not None:
            clouds.append((batch["points"][0].numpy(), batch["labels"][0].numpy()))
        if len(clouds) >= max_samples:
            break
    kwargs = {} if grid is None else {"grid": grid}
    out: dict[str, Any] = {}
    results = {}
    for name, fn in (("reference", raycast_eval_gt_reference), ("vectorised", raycast_eval_gt)):
        t0 = time.perf_counter()
        results[name] = [fn(p, lab, **kwargs) for p, lab in clouds]
        out[f"{name}_ms_per_sample"] = 1e3 * (time.perf_counter() - t0) / max(len(clouds), 1)
    out.update(samples=len(clouds),
               identical=all(np.array_equal(a, b) for a, b in zip(results["reference"], results["vectorised"])),
               points_per_sample=float(np.mean([len(p) for p, _ in clouds])) if clouds else 0.0)
    return out
