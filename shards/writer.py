"""Write nuScenes splits as deterministic, resumable WebDataset tar shards plus ``manifest.json``.

Layout of the output directory::

    <out>/<split>-000000.tar ...      one tar per ``samples_per_shard`` keyframes (last one shorter)
    <out>/manifest.json               schema version, splits, per shard name/count/bytes/sha256 and the
                                      (key, sha256 of checksums.json) of every sample, totals
    <out>/.progress/build.json        this folder's build id (names the temp files), format, schema
    <out>/.progress/<shard>.json      sidecar of a shard: plan digest, source fingerprint, sha256, keys
    <out>/.progress/lock              held (flock) while a build runs: a second build on --out is refused

Determinism: the same input gives the same bytes. Samples are ordered by the devkit split list (scene
order) and time; members are written in :data:`shards.schema.FIELD_ORDER`; every tar header has
mtime 0, uid/gid 0, uname/gname ``pop3d``, mode 0444, USTAR format; the manifest holds no timestamp
and no absolute path.

Ownership: the builder only touches files its records say it wrote: a shard name is its own when
``.progress/<name>.json`` exists or ``manifest.json`` (of this format) lists it; temp files are
``<name>.tmp-<build id>-<pid>`` with the build id of ``.progress/build.json``. Any other file is left
alone; one sitting at a name the build must write stops it (:class:`DataError` naming the file).

Resuming: a shard is written to its temp file, its sidecar is written (tmp + rename), then the shard is
renamed atomically. On start, this build id's leftover temp files are deleted; a shard is kept when its
sidecar exists, describes the same plan (schema, version, split, sample tokens, source file names and
sizes, calibration), the same source fingerprint (size + mtime of every source file, or with
``source_check="content"`` their sha256) and the file's size (and, with ``verify="sha256"``, its sha256)
matches. Everything else is (re)written, so an interrupted run followed by a restart gives the same
shards and manifest as an uninterrupted run, and a shard whose source changed is rewritten.

Errors: bad input raises :class:`shards.reader.DataError` naming the file and the problem. Finished shards
are never touched by a failing run. ``skip_bad=True`` drops samples with file problems instead, and
the manifest lists every skipped sample with its problem (``splits.<split>.skipped``).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from p3d_common.labels import RAW_TO_NOIGNORE
from shards.evalgt import PAPER_GRID, eval_targets, grid_record
from shards.geometry import GridSpec, map_labels
from shards.manifest import write_manifest
from shards.outdir import (
    FORMAT_NAME,
    SHARD_RE,
    atomic_write_json,
    build_id_of,
    build_lock,
    check_output_dir,
    clean_temp_files,
    delete_build,
    owned_names,
    refuse_foreign,
    sidecar_path,
    temp_name,
)
from shards.reader import (
    DataError,
    SampleRecord,
    SplitPlan,
    load_sample,
    open_nuscenes,
    plan_split,
    version_for_split,
)
from shards.schema import (
    CHECKSUM_FIELD,
    EVAL_GT_GRID_KEY,
    PROGRESS_DIR,
    SCHEMA_VERSION,
    encode_sample,
    shard_name,
)

TAR_USER = "pop3d"


@dataclass
class ShardTask:
    """One shard to write: its name, split, records, the digest of its plan and the grid of the evaluation GT
    it stores for its samples with lidarseg (None: none stored)."""

    split: str
    index: int
    name: str
    records: list[SampleRecord]
    plan_digest: str
    build_id: str = ""
    eval_gt_grid: GridSpec | None = None


def _plan_digest(split: str, version: str, index: int, records: list[SampleRecord], skip_bad: bool,
                 eval_gt_grid: GridSpec | None = None) -> str:
    h = hashlib.sha256()
    grid = None if eval_gt_grid is None else grid_record(eval_gt_grid)
    h.update(json.dumps([SCHEMA_VERSION, FORMAT_NAME, version, split, index, skip_bad, grid]).encode())
    for r in records:
        h.update(json.dumps([r.token, r.cam_files, r.lidar_file, r.lidarseg_file, r.source_sizes]).encode())
        h.update(r.cam_intrinsic.tobytes())
        h.update(r.lidar2cam.tobytes())
        h.update(r.lidar2ego.tobytes())
    return h.hexdigest()


def plan_shards(
    plan: SplitPlan, records: list[SampleRecord], samples_per_shard: int, skip_bad: bool = False,
    eval_gt_grid: GridSpec | None = None,
) -> list[ShardTask]:
    """Cut ``records`` (in order) into shards of ``samples_per_shard`` samples (storing the evaluation GT of
    ``eval_gt_grid`` for the samples with lidarseg, when given)."""
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    tasks = []
    for i, start in enumerate(range(0, len(records), samples_per_shard)):
        recs = records[start:start + samples_per_shard]
        tasks.append(ShardTask(plan.split, i, shard_name(plan.split, i), recs,
                               _plan_digest(plan.split, plan.version, i, recs, skip_bad, eval_gt_grid),
                               eval_gt_grid=eval_gt_grid))
    return tasks


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = TAR_USER
    ti.type = tarfile.REGTYPE
    return ti


def write_tar(path: str, samples: Iterable[dict[str, Any]]) -> list[list[str]]:
    """Write reader sample dicts to a deterministic WebDataset tar at ``path``.

    Returns:
        ``[[key, sha256 of the sample's checksums.json], ...]`` in order (the manifest's sample index).
    """
    index: list[list[str]] = []
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for sample in samples:
                key = sample["token"]
                if "." in key or "/" in key:
                    raise DataError(f"sample key {key!r} must not contain '.' or '/'")
                for fld, payload in encode_sample(sample):
                    tf.addfile(_tarinfo(f"{key}.{fld}", len(payload)), io.BytesIO(payload))
                    if fld == CHECKSUM_FIELD:
                        index.append([key, hashlib.sha256(payload).hexdigest()])
        f.flush()
        os.fsync(f.fileno())
    return index


def source_fingerprint(records: list[SampleRecord], dataroot: str, mode: str = "stat") -> str:
    """Digest of the source files of ``records``: (name, size, mtime_ns) each, or their sha256 (``content``)."""
    h = hashlib.sha256(mode.encode())
    for r in records:
        for rel in [*r.cam_files, r.lidar_file, *([r.lidarseg_file] if r.lidarseg_file else [])]:
            path = os.path.join(dataroot, rel)
            try:
                st = os.stat(path)
            except OSError:
                h.update(f"{rel}:missing".encode())
                continue
            h.update(f"{rel}:{st.st_size}:".encode())
            h.update(sha256_file(path).encode() if mode == "content" else str(st.st_mtime_ns).encode())
    return h.hexdigest()


def write_shard(task: ShardTask, dataroot: str, out_dir: str, skip_bad: bool = False,
                source_check: str = "stat") -> dict[str, Any]:
    """Write one shard: temp file, then its sidecar, then the atomic rename to its final name.

    Returns:
        ``{"name", "num_samples", "bytes", "sha256", "samples", "skipped"}``; ``samples`` is the manifest's
        ``[[key, digest], ...]``; ``skipped`` lists the samples dropped because a file was bad at read time
        (only with ``skip_bad``).

    Raises:
        DataError: a source file is bad; the temp file is removed, finished shards are untouched.
    """
    final = os.path.join(out_dir, task.name)
    tmp = temp_name(final, task.build_id)
    fingerprint = source_fingerprint(task.records, dataroot, source_check)
    skipped: list[dict[str, str]] = []

    def samples() -> Iterable[dict[str, Any]]:
        for r in task.records:
            try:
                sample = with_eval_gt(load_sample(r, dataroot), task.eval_gt_grid, dataroot)
            except DataError as exn:
                if not skip_bad:
                    raise
                skipped.append({"sample_token": r.token, "problem": str(exn)})
                continue
            yield sample

    try:
        index = write_tar(tmp, samples())
        entry = {"name": task.name, "num_samples": len(index), "bytes": os.path.getsize(tmp),
                 "sha256": sha256_file(tmp), "samples": index, "skipped": skipped}
        atomic_write_json(  # the record first: from here on the final name is this builder's
            sidecar_path(out_dir, task.name),
            {**entry, "split": task.split, "schema_version": SCHEMA_VERSION, "plan_digest": task.plan_digest,
             "source_check": source_check, "source_fingerprint": fingerprint}, task.build_id)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, final)
    return entry


def with_eval_gt(sample: dict[str, Any], grid: GridSpec | None, dataroot: str = "") -> dict[str, Any]:
    """A :func:`shards.reader.load_sample` dict with its evaluation GT of ``grid`` (schema 3): ``eval_gt`` and
    ``voxel_label`` (:func:`shards.evalgt.eval_targets`, on the float32 points as stored) and the grid in
    ``meta["eval_gt_grid"]``; with ``grid`` None or without lidarseg the record is ``null`` and nothing is added.
    Raises :class:`DataError` naming the lidarseg file when its labels are not nuScenes ids (0..31)."""
    store = grid is not None and sample.get("lidarseg") is not None
    meta = {**sample["meta"], EVAL_GT_GRID_KEY: grid_record(grid) if store else None}
    out = {**sample, "meta": meta}
    if store:
        try:
            labels = map_labels(sample["lidarseg"], RAW_TO_NOIGNORE)
            out["voxel_label"], out["eval_gt"] = eval_targets(np.asarray(sample["points"], dtype=np.float32),
                                                              labels, grid)
        except ValueError as exn:
            path = os.path.join(dataroot, sample["meta"].get("lidarseg_file") or "?")
            raise DataError(f"{path}: lidarseg labels cannot be used for the evaluation GT ({exn})") from None
    return out


def _write_shard_star(args: tuple[ShardTask, str, str, bool, str]) -> dict[str, Any]:
    return write_shard(*args)


_ENTRY_KEYS = ("name", "num_samples", "bytes", "sha256", "samples", "skipped")


def _finished_entry(task: ShardTask, out_dir: str, dataroot: str, verify: str, source_check: str
                    ) -> dict[str, Any] | None:
    """Manifest entry of an already finished shard whose sidecar, sources and file match, else None."""
    side = sidecar_path(out_dir, task.name)
    path = os.path.join(out_dir, task.name)
    if not (os.path.exists(side) and os.path.exists(path)):
        return None
    with open(side) as f:
        rec = json.load(f)
    if rec.get("plan_digest") != task.plan_digest or rec.get("bytes") != os.path.getsize(path):
        return None
    if any(k not in rec for k in _ENTRY_KEYS) or rec.get("source_check") != source_check:
        return None
    if rec.get("source_fingerprint") != source_fingerprint(task.records, dataroot, source_check):
        return None  # a source file changed since the shard was written
    if verify == "sha256" and rec.get("sha256") != sha256_file(path):
        return None
    return {k: rec[k] for k in _ENTRY_KEYS}


def _format_problems(problems: list[tuple[str, str]], limit: int = 10) -> str:
    lines = [f"  sample {tok}: {msg}" for tok, msg in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def build_shards(
    dataroot: str,
    versions: list[str] | str,
    splits: list[str],
    out_dir: str,
    workers: int = 1,
    samples_per_shard: int = 64,
    skip_bad: bool = False,
    verify: str = "sha256",
    progress: bool = True,
    source_check: str = "stat",
    eval_gt_splits: list[str] | None = None,
    eval_gt_grid: GridSpec = PAPER_GRID,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build (or resume) the shards of ``splits`` into ``out_dir`` and write ``manifest.json``.

    Args:
        dataroot: nuScenes root (holding ``samples/``, ``sweeps/``, ``lidarseg/``, ``<version>/``).
        versions: one or more nuScenes versions; each split is taken from the one version providing it
            (``v1.0-mini``: train/val, ``v1.0-trainval``: train/val, ``v1.0-test``: test).
        splits: split names, e.g. ``["train", "val", "test"]``.
        out_dir: output directory (created).
        workers: processes writing shards in parallel (1 = in this process).
        samples_per_shard: keyframes per tar shard.
        skip_bad: drop samples with file problems (listed in the manifest) instead of failing.
        verify: how finished shards are checked on resume: ``"sha256"`` (default) or ``"size"``.
        progress: show a tqdm progress bar.
        source_check: how a finished shard's sources are compared with the current ones on resume:
            ``"stat"`` (size + mtime, default) or ``"content"`` (sha256 of every source file).
        eval_gt_splits: splits whose samples with lidarseg store their evaluation GT (``eval_gt.npy``,
            ``voxel_label.npy``); default (None): ``val`` when it is built and has lidarseg; ``[]``: none.
            A split named here must be built and have lidarseg.
        eval_gt_grid: the grid of the stored evaluation GT (default: the paper's 100x100x8); the loader uses
            the stored arrays only for exactly this grid.
        overwrite: first delete what an earlier build (of any schema version) wrote into ``out_dir``
            (:func:`shards.outdir.delete_build`: its shards, records and manifest; nothing else), then build.

    Returns:
        The manifest dict (also written to ``<out_dir>/manifest.json``).

    Raises:
        DataError: unknown split/version, bad input files (named), foreign schema in ``out_dir``, a foreign
            file at a shard name to write, another build running on ``out_dir``.
    """
    if isinstance(versions, str):
        versions = [versions]
    if verify not in ("sha256", "size"):
        raise DataError(f"verify must be 'sha256' or 'size', got {verify!r}")
    if source_check not in ("stat", "content"):
        raise DataError(f"source_check must be 'stat' or 'content', got {source_check!r}")
    if not splits:
        raise DataError("no split requested")
    split_version = {s: version_for_split(list(versions), s) for s in dict.fromkeys(splits)}
    if eval_gt_splits is not None:
        unknown = [s for s in eval_gt_splits if s not in split_version]
        if unknown:
            raise DataError(f"--eval-gt-splits {unknown}: not among the --splits built now {list(split_version)}")
    os.makedirs(os.path.join(out_dir, PROGRESS_DIR), exist_ok=True)
    with build_lock(out_dir):
        if overwrite:
            deleted = delete_build(out_dir)
            if deleted:
                print(f"--overwrite: deleted {len(deleted)} file(s) of the earlier build in {out_dir}")
        check_output_dir(out_dir)
        build_id = build_id_of(out_dir)
        clean_temp_files(out_dir, build_id)
        return _build_locked(dataroot, split_version, out_dir, workers, samples_per_shard, skip_bad, verify,
                             progress, source_check, build_id, (eval_gt_splits, eval_gt_grid))


def _build_locked(dataroot: str, split_version: dict[str, str], out_dir: str, workers: int,
                  samples_per_shard: int, skip_bad: bool, verify: str, progress: bool, source_check: str,
                  build_id: str, eval_gt: tuple[list[str] | None, GridSpec]) -> dict[str, Any]:
    """:func:`build_shards` once the folder is locked and checked: plan, resume, write, manifest."""
    plans, tasks, skipped = _plan_build(dataroot, split_version, samples_per_shard, skip_bad, build_id, eval_gt)
    done, todo = _resume_check(tasks, out_dir, dataroot, split_version, verify, source_check)
    if done:
        print(f"reusing {len(done)} finished shard(s) in {out_dir} (checked: {verify}); {len(todo)} to write")
    _write_missing(todo, tasks, done, dataroot, out_dir, workers, skip_bad, progress, source_check, build_id)
    return write_manifest(plans, tasks, done, skipped, out_dir, split_version, samples_per_shard, build_id,
                          {t.split: None if t.eval_gt_grid is None else grid_record(t.eval_gt_grid) for t in tasks})


def _plan_build(dataroot: str, split_version: dict[str, str], samples_per_shard: int, skip_bad: bool,
                build_id: str, eval_gt: tuple[list[str] | None, GridSpec] = (None, PAPER_GRID)
                ) -> tuple[dict[str, SplitPlan], list[ShardTask], dict[str, list[dict[str, str]]]]:
    """Step 1: plan every split with the devkit (main process only) and cut it into shard tasks (those of the
    eval-GT splits, ``eval_gt`` = (splits or None for the default, grid), carry the grid).

    Returns (plans by split, all shard tasks stamped with ``build_id``, skipped samples by split). Raises
    :class:`DataError` on bad input files unless ``skip_bad``, and when a split has no sample left.
    """
    plans: dict[str, SplitPlan] = {}
    for version in dict.fromkeys(split_version.values()):
        nusc = open_nuscenes(dataroot, version)
        for split, v in split_version.items():
            if v == version:
                plans[split] = plan_split(nusc, split)
        del nusc
    all_problems = [p for s in split_version for p in plans[s].problems]
    if all_problems and not skip_bad:
        raise DataError(f"{len(all_problems)} bad input file(s):\n{_format_problems(all_problems)}")
    gt_splits = _eval_gt_splits(plans, eval_gt[0])

    tasks: list[ShardTask] = []
    skipped: dict[str, list[dict[str, str]]] = {}
    for split in split_version:
        plan = plans[split]
        bad = {tok for tok, _ in plan.problems}
        skipped[split] = [{"sample_token": t, "problem": m} for t, m in plan.problems]
        recs = [r for r in plan.records if r.token not in bad]
        if not recs:
            raise DataError(f"split {split!r}: no sample left to write")
        tasks += plan_shards(plan, recs, samples_per_shard, skip_bad, eval_gt[1] if split in gt_splits else None)
    for t in tasks:
        t.build_id = build_id
    return plans, tasks, skipped


def _eval_gt_splits(plans: dict[str, SplitPlan], requested: list[str] | None) -> set[str]:
    """The splits that store their evaluation GT: ``requested`` (each must have lidarseg), or by default
    ``val`` when it is built and has lidarseg (the split that is evaluated; also ``v1.0-mini``'s val)."""
    if requested is None:
        return {"val"} if "val" in plans and plans["val"].has_lidarseg else set()
    bad = [s for s in requested if not plans[s].has_lidarseg]
    if bad:
        raise DataError(f"--eval-gt-splits {bad}: no lidarseg in {[plans[s].version for s in bad]}, so there is no "
                        "evaluation GT to store; leave these splits out of --eval-gt-splits")
    return set(requested)


def _resume_check(tasks: list[ShardTask], out_dir: str, dataroot: str, split_version: dict[str, str], verify: str,
                  source_check: str) -> tuple[dict[str, dict[str, Any]], list[ShardTask]]:
    """Step 2: keep finished shards, refuse foreign files at our names, remove our shards no longer planned.

    Returns (manifest entries of finished shards by name, tasks still to write).
    """
    owned = owned_names(out_dir)
    refuse_foreign(out_dir, [t.name for t in tasks], owned)
    done: dict[str, dict[str, Any]] = {}
    todo: list[ShardTask] = []
    for t in tasks:
        e = _finished_entry(t, out_dir, dataroot, verify, source_check)
        if e is None:
            todo.append(t)
        else:
            done[t.name] = e
    planned = {t.name for t in tasks}
    for name in sorted(owned - planned):
        m = SHARD_RE.match(name)
        if m and m.group("split") in split_version:  # ours, of a split rebuilt now, no longer planned
            for p in (os.path.join(out_dir, name), sidecar_path(out_dir, name)):
                if os.path.exists(p):
                    os.remove(p)
    return done, todo


def _write_missing(todo: list[ShardTask], tasks: list[ShardTask], done: dict[str, dict[str, Any]], dataroot: str,
                   out_dir: str, workers: int, skip_bad: bool, progress: bool, source_check: str,
                   build_id: str) -> None:
    """Step 3: write the shards of ``todo`` (in a spawn pool when ``workers`` > 1), adding their entries to ``done``.

    On failure in the pool the workers are stopped and this build's temp files removed before re-raising.
    """
    from tqdm import tqdm

    bar = tqdm(total=sum(len(t.records) for t in tasks), initial=sum(e["num_samples"] for e in done.values()),
               unit="sample", desc=f"shards -> {out_dir}", disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for t in todo:
                e = write_shard(t, dataroot, out_dir, skip_bad, source_check)
                done[t.name] = e
                bar.update(e["num_samples"])
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, len(todo))) as pool:
                try:
                    jobs = [(t, dataroot, out_dir, skip_bad, source_check) for t in todo]
                    for e in pool.imap_unordered(_write_shard_star, jobs):
                        done[e["name"]] = e
                        bar.update(e["num_samples"])
                except BaseException:
                    pool.terminate()
                    pool.join()
                    clean_temp_files(out_dir, build_id)
                    raise
    finally:
        bar.close()


def read_manifest(path_or_dir: str) -> tuple[dict[str, Any], str]:
    """Load ``manifest.json`` (the file, its folder, or the URL of either); returns (manifest, shard root).

    Raises :class:`shards.errors.ShardReadError` naming the manifest (missing, not JSON, other schema).
    """
    from shards.verify import load_manifest

    return load_manifest(path_or_dir)
