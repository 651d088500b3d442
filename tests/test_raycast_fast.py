"""The vectorised ray cast gives exactly the first implementation's output (tests/_raycast_ref.py)."""
from __future__ import annotations

import numpy as np
import pytest

from shards.geometry import EMPTY_CLASS, IGNORE_LABEL, GridSpec, raycast_eval_gt
from tests._raycast_ref import raycast_eval_gt_reference

GRIDS = [GridSpec(), GridSpec(size=(200, 200, 16)), GridSpec((-3.0, -2.0, -1.0), (5.0, 2.5, 1.5), (7, 5, 3)),
         GridSpec((1.0, -4.0, 0.5), (6.0, -0.5, 2.0), (5, 7, 3))]  # the last one: the LiDAR outside the volume


def _cloud(rng: np.random.Generator, n: int, grid: GridSpec) -> np.ndarray:
    lo, hi = np.asarray(grid.pc_min), np.asarray(grid.pc_max)
    span = hi - lo
    return rng.uniform(lo - 0.2 * span, hi + 0.2 * span, (n, 3)).astype(np.float32)  # some points outside


@pytest.mark.parametrize("gi", range(len(GRIDS)))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_clouds_equal_reference(gi: int, seed: int) -> None:
    grid = GRIDS[gi]
    rng = np.random.default_rng(seed)
    xyz = _cloud(rng, 3000, grid)
    lab = rng.integers(0, 17, xyz.shape[0])
    want = raycast_eval_gt_reference(xyz, lab, grid)
    got = raycast_eval_gt(xyz, lab, grid)
    assert got.dtype == np.uint8 and got.shape == grid.shape
    np.testing.assert_array_equal(got, want)
    if gi < 2:  # the big grids have free, unobserved and occupied voxels
        assert (got == EMPTY_CLASS).any() and (got == IGNORE_LABEL).any() and (got < EMPTY_CLASS).any()


def test_small_chunks_and_sample_counts_equal_reference() -> None:
    grid = GRIDS[2]
    rng = np.random.default_rng(3)
    xyz = _cloud(rng, 700, grid)
    lab = rng.integers(0, 17, xyz.shape[0])
    for n_samples in (1, 2, 37, 100):
        want = raycast_eval_gt_reference(xyz, lab, grid, n_samples=n_samples, chunk=100)
        np.testing.assert_array_equal(raycast_eval_gt(xyz, lab, grid, n_samples=n_samples, chunk=64), want)


def test_edge_cases_equal_reference() -> None:
    """Points on voxel boundaries, within the 1e-3 clip band under pc_max, just inside / outside the volume,
    float64 input with extra columns, and the empty cloud."""
    grid = GridSpec()
    lo, hi = np.asarray(grid.pc_min), np.asarray(grid.pc_max)
    vs = np.asarray(grid.voxel_size)
    pts = []
    for i in range(-50, 51, 7):
        pts.append(lo + vs * (np.array([i, i // 2, 3]) % np.asarray(grid.size)))      # exact boundaries
    pts += [hi - 1e-4, hi - 5e-4, hi - 2e-3, lo + 1e-9, hi, lo, [0.0, 0.0, 0.0], [-1e-12, 1e-12, 0.0]]
    pts += [[51.19999, -51.19999, 2.9995], [-51.2, 10.0, 0.0], [10.0, 51.2, 0.0]]
    xyz = np.concatenate([np.asarray(pts, np.float64), np.ones((len(pts), 1))], 1)   # (N, 4)
    lab = np.arange(len(pts)) % 17
    np.testing.assert_array_equal(raycast_eval_gt(xyz, lab, grid), raycast_eval_gt_reference(xyz, lab, grid))
    empty = np.zeros((0, 3), np.float32)
    np.testing.assert_array_equal(raycast_eval_gt(empty, np.zeros(0, int), grid),
                                  raycast_eval_gt_reference(empty, np.zeros(0, int), grid))


def test_single_ray_marks_the_voxels_it_crosses() -> None:
    """Independent oracle: one point on the +x axis marks exactly the voxels between origin and it."""
    grid = GridSpec((-4.0, -4.0, -4.0), (4.0, 4.0, 4.0), (8, 8, 8))
    got = raycast_eval_gt(np.array([[3.5, 0.5, 0.5]]), np.array([5]), grid)
    assert got[7, 4, 4] == 5                                  # the point's voxel: its label
    assert all(got[i, 4, 4] == EMPTY_CLASS for i in range(4, 7))  # crossed on the way out
    assert (got == EMPTY_CLASS).sum() == 3 and (got == 5).sum() == 1
