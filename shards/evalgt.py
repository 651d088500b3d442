"""The evaluation ground truth of a sample: computed once (the builder, schema 3) or on the fly (the loader).

Two uint8 (X, Y, Z) grids make the evaluation GT of a sample with lidarseg: the ray-cast semantic GT
(:func:`shards.geometry.raycast_eval_gt`, ~190 ms per nuScenes sample on one core) and the voxel majority
label (:func:`shards.geometry.voxel_majority_label`, ~16 ms). :func:`eval_targets` is the one computation;
``scripts/build_shards.py --eval-gt-splits`` stores its result as the members ``eval_gt.npy`` and
``voxel_label.npy`` with the grid in ``meta.json`` (``eval_gt_grid``), and the loader
(:func:`stored_eval_targets`) reads them back when that grid is the requested one. Otherwise (schema-2
shards, a split built without stored GT, another grid) the loader computes them and says so once per
process (:func:`note_computed`).

A stored member of the wrong dtype/shape, one of the pair missing, or a grid record that is malformed or
disagrees with the arrays is a :class:`shards.errors.SampleDecodeError` naming the shard, sample and
member: damaged stored GT is never silently recomputed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from shards.errors import SampleDecodeError
from shards.geometry import GridSpec, grid_indices, raycast_eval_gt, voxel_majority_label
from shards.schema import EVAL_GT_FIELD, EVAL_GT_GRID_KEY, META_FIELD, VOXEL_LABEL_FIELD, decode_npy

log = logging.getLogger("shards.evalgt")

#: The paper's grid (100 x 100 x 8 over [-51.2, -51.2, -5, 51.2, 51.2, 3] m): the builder's default.
PAPER_GRID = GridSpec()

_NOTED: list[str] = []  # the line note_computed said in this process (at most one)


def grid_record(grid: GridSpec) -> dict[str, list[float] | list[int]]:
    """The JSON record of a grid (``meta.json``'s ``eval_gt_grid`` and the manifest's split entry)."""
    return {"pc_min": [float(v) for v in grid.pc_min], "pc_max": [float(v) for v in grid.pc_max],
            "size": [int(v) for v in grid.size]}


def grid_of_record(rec: Any) -> GridSpec:
    """Inverse of :func:`grid_record`; ``ValueError`` for anything that is not a valid record."""
    if not isinstance(rec, dict) or set(rec) != {"pc_min", "pc_max", "size"}:
        raise ValueError(f"not a grid record {{pc_min, pc_max, size}}: {rec!r}")
    try:
        size = tuple(int(v) for v in rec["size"])
        if any(int(v) != v or isinstance(v, bool) for v in rec["size"]):
            raise ValueError
        return GridSpec(pc_min=tuple(float(v) for v in rec["pc_min"]),
                        pc_max=tuple(float(v) for v in rec["pc_max"]), size=size)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"not a grid record {{pc_min, pc_max, size}}: {rec!r}") from None


def same_grid(a: GridSpec, b: GridSpec) -> bool:
    """Whether two grids are the same volume and size (values compared as floats / ints)."""
    return grid_record(a) == grid_record(b)


def grid_text(grid: GridSpec) -> str:
    """``25x25x4 over [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]``."""
    lo, hi = grid_record(grid)["pc_min"], grid_record(grid)["pc_max"]
    return f"{'x'.join(str(v) for v in grid.shape)} over {[*lo, *hi]}"


def eval_targets(points: np.ndarray, labels: np.ndarray, grid: GridSpec, grid_ind: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation GT of one sample: (voxel_label, eval_gt), both uint8 (X, Y, Z).

    Args:
        points: float32 (N, >=3) in the LiDAR frame (as stored in ``lidar.npy``).
        labels: (N,) noIgnore labels 0..16 (``map_labels(lidarseg, RAW_TO_NOIGNORE)``).
        grid: the voxel volume.
        grid_ind: float64 (N, 3) ``grid_indices(points, grid, np.float64)`` when the caller has them
            (computed here otherwise).
    """
    g = grid_indices(points, grid, np.float64) if grid_ind is None else grid_ind
    return voxel_majority_label(g, labels, grid), raycast_eval_gt(points, labels, grid)


def stored_grid(fields: dict[str, Any], meta: dict[str, Any]) -> GridSpec | None:
    """The grid of a raw sample's stored evaluation GT (None: none stored); checks the record and the pair.

    Raises:
        SampleDecodeError: one of ``eval_gt.npy`` / ``voxel_label.npy`` without the other, stored GT without
            a grid record in ``meta.json``, or a malformed record (naming shard, sample and member).
    """
    where = f"{fields.get('__url__', '?')}: sample {fields.get('__key__', '?')}"
    have = [f for f in (EVAL_GT_FIELD, VOXEL_LABEL_FIELD) if f in fields]
    rec = meta.get(EVAL_GT_GRID_KEY)
    if not have and rec is None:
        return None
    if len(have) == 1:
        missing = VOXEL_LABEL_FIELD if have[0] == EVAL_GT_FIELD else EVAL_GT_FIELD
        raise SampleDecodeError(f"{where}: member {have[0]}: stored without {missing} (damaged shard); "
                                "rebuild the split with scripts/build_shards.py")
    if rec is None or not have:
        what = "records no eval_gt_grid" if rec is None else f"records {EVAL_GT_GRID_KEY} but the sample has no"
        member = EVAL_GT_FIELD if rec is None else META_FIELD
        raise SampleDecodeError(f"{where}: member {member}: meta.json {what} stored eval GT (damaged shard); "
                                "rebuild the split with scripts/build_shards.py")
    try:
        return grid_of_record(rec)
    except ValueError as exn:
        raise SampleDecodeError(f"{where}: member {META_FIELD}: {EVAL_GT_GRID_KEY}: {exn}") from None


def decode_stored(fields: dict[str, Any], grid: GridSpec) -> tuple[np.ndarray, np.ndarray]:
    """(voxel_label, eval_gt) of a raw sample storing them for ``grid``, each checked: uint8 of ``grid.shape``.

    Raises:
        SampleDecodeError: naming shard, sample and member, for undecodable bytes or another dtype/shape.
    """
    where = f"{fields.get('__url__', '?')}: sample {fields.get('__key__', '?')}"
    out = []
    for field in (VOXEL_LABEL_FIELD, EVAL_GT_FIELD):
        try:
            arr = decode_npy(fields[field])
        except Exception as exn:  # noqa: BLE001 - any undecodable member is one named error
            raise SampleDecodeError(f"{where}: member {field}: cannot be decoded ({type(exn).__name__}: "
                                    f"{exn})") from None
        if arr.dtype != np.uint8 or arr.shape != grid.shape:
            raise SampleDecodeError(f"{where}: member {field}: uint8 {grid.shape} expected for the recorded "
                                    f"{EVAL_GT_GRID_KEY} {grid_text(grid)}, got {arr.dtype.name} {arr.shape} "
                                    "(damaged shard); rebuild the split with scripts/build_shards.py")
        out.append(arr)
    return out[0], out[1]


def stored_eval_targets(fields: dict[str, Any], meta: dict[str, Any], grid: GridSpec
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored (voxel_label, eval_gt) of a raw sample when they are for ``grid``, else None (and the
    one log line of :func:`note_computed`). Stored members are checked even when another grid is requested."""
    have = stored_grid(fields, meta)
    if have is not None:
        stored = decode_stored(fields, have)
        if same_grid(have, grid):
            return stored
    note_computed(fields.get("__url__", "?"), meta, have, grid)
    return None


def note_computed(url: str, meta: dict[str, Any], have: GridSpec | None, grid: GridSpec) -> None:
    """Log once per process that the evaluation GT is computed on the fly, why, and how to store it."""
    split = meta.get("split", "val")
    reason = (f"schema-{meta.get('schema_version')} shards (no stored eval GT)" if have is None and
              meta.get("schema_version", 2) < 3 else
              "no stored eval GT" if have is None else f"stored eval GT is for {grid_text(have)}")
    if _NOTED:
        return
    lo, hi = grid_record(grid)["pc_min"], grid_record(grid)["pc_max"]
    line = (f"eval GT of {url} and the other shards like it ({reason}) is computed on the fly for the grid "
            f"{grid_text(grid)}: slower (~200 ms/sample at the paper grid); store it once with: python "
            f"scripts/build_shards.py ... --splits {split} --eval-gt-splits {split} --eval-gt-grid "
            f"{' '.join(str(v) for v in grid.shape)} --eval-gt-range {' '.join(f'{v:g}' for v in (*lo, *hi))}"
            + (" --out NEW_DIR" if have is None and meta.get("schema_version", 2) < 3 else ""))
    _NOTED.append(line)
    log.warning("%s", line)
