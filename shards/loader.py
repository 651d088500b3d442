"""WebDataset loader: shards -> decoded samples -> the batch dict of ``docs/architecture.md``.

Pipeline (a ``webdataset.DataPipeline``, one copy per DataLoader worker)::

    shard list (manifest or glob; seeded shuffle per epoch, or seeded resampling)
      -> wds.split_by_node -> wds.split_by_worker
      -> tar reading (checks: tar end marker, required fields, sample count from the manifest)
      -> optional seeded sample shuffle buffer
      -> per-sample decode + geometry (:func:`process_sample`)
      -> batching with :func:`collate` (inside the workers)

Decoding: JPEG -> uint8 RGB (3, H, W) with OpenCV (``cv2.imdecode`` + BGR->RGB), the library
``mmcv.imread`` used in the original, so the pixels are the original's with the channels flipped. PIL and
``torchvision.io.decode_jpeg`` are libjpeg-turbo too and gave bit-identical pixels on the test images, but
were slower (benchmarks/bench_loading.py). OpenCV comes with nuscenes-devkit (``opencv-python``).

Errors are never skipped: a truncated or corrupt shard raises :class:`ShardReadError` whose message
starts with the shard's path (also through DataLoader workers, whose re-raised message carries it).
Every sample is verified before it is decoded (:mod:`shards.verify`: member checksums, key order and the
manifest's per-sample digest) and every failure names shard, sample key and member. ``source`` may be a
folder or the URL of one (:mod:`shards.remote`: http(s), fsspec, ``pipe:``).

Distributed use (HF accelerate): shards are split over ranks (``wds.split_by_node``) and then over
DataLoader workers (``wds.split_by_worker``), so each rank reads its own shards and the loader must NOT
be re-sharded by accelerate. Either do not pass it to ``accelerator.prepare`` (move the batch with
``accelerator.device``), or - if you must - create the Accelerator with
``DataLoaderConfiguration(dispatch_batches=False)`` *and* ``make_loader(..., split_nodes=False)``, because
accelerate (1.15, data_loader.py) wraps an IterableDataset in ``IterableDatasetShard`` when ``dispatch_batches=False`` (it
keeps every world_size-th batch), which would split the data twice. Without resampling there must be at
least ``world_size * max(1, num_workers)`` shards (checked, :class:`ValueError` otherwise); for training
on several GPUs prefer ``resampled=True`` with ``epoch_batches`` so every rank yields the same number of
batches (ranks with unequal batch counts hang DDP at the end of an epoch). Call
``loader.dataset.set_epoch(e)`` before each epoch to change the shard order (workers are not persistent,
so the new epoch reaches them).
"""

from __future__ import annotations

import glob
import math
import os
import random
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from p3d_common.labels import RAW_TO_NOIGNORE
from shards.errors import ShardReadError
from shards.geometry import (
    GridSpec,
    grid_indices,
    lidar_to_image,
    map_labels,
    occupancy_target,
    project_all_cameras,
    raycast_eval_gt,
    voxel_majority_label,
)
from shards.remote import is_remote, iter_tar_members
from shards.schema import CAMERA_FIELDS, check_fields, decode_arrays
from shards.verify import check_key, shard_index, verify_sample

#: The paper's voxel volume (100 x 100 x 8 over [-51.2, 51.2]^2 x [-5, 3] m).
DEFAULT_GRID = GridSpec()

#: Keys of the batch dict (docs/architecture.md), in documentation order.
BATCH_KEYS: tuple[str, ...] = (
    "tokens",
    "images",
    "lidar2img",
    "img_hw",
    "points",
    "grid_ind",
    "labels",
    "labels_raw",
    "occupancy",
    "voxel_label",
    "eval_gt",
    "proj_batch",
    "proj_cam",
    "proj_point",
    "proj_rowcol",
)


# ---------------------------------------------------------------------------------------------------------
# shard lists
# ---------------------------------------------------------------------------------------------------------


def list_shards(source: str | list[str], split: str) -> tuple[list[str], dict[str, int]]:
    """Shard paths of ``split`` and, when a manifest is available, their expected sample counts.

    Args:
        source: a directory holding ``manifest.json`` (preferred), a ``manifest.json`` path, a directory
            without manifest (``<split>-*.tar`` are globbed), a glob pattern, or a list of tar paths.
        split: split name (``train``/``val``/``test``).

    Returns:
        (paths in shard order, {path: num_samples} - empty when no manifest is used).
    """
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source], {}
    if is_remote(source) or source.endswith(".json") or os.path.exists(os.path.join(source, "manifest.json")):
        from shards.verify import manifest_shards

        return manifest_shards(source, split)
    pattern = os.path.join(source, f"{split}-*.tar") if os.path.isdir(source) else source
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ValueError(f"{pattern}: no shard found")
    return paths, {}


def _world() -> tuple[int, int]:
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    return rank, world


class _EpochState:
    """Seed and epoch shared by the stages of one pipeline copy (set with ``set_epoch``)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0


class _ShardSource:
    """First pipeline stage: yields ``{"url": path}`` for the epoch (shuffled / resampled, seeded)."""

    def __init__(self, urls: list[str], state: _EpochState, shuffle: bool, resampled: bool) -> None:
        self.urls, self.state, self.shuffle, self.resampled = list(urls), state, shuffle, resampled

    def __call__(self) -> Iterator[dict[str, str]]:
        s = self.state
        if self.resampled:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            rng = random.Random(f"{s.seed}/{s.epoch}/{rank}/{worker}")
            while True:
                yield {"url": rng.choice(self.urls)}
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{s.seed}/{s.epoch}").shuffle(urls)  # same order on every rank and worker
        for u in urls:
            yield {"url": u}


def _check_tar_end(path: str) -> None:
    """A complete tar is a multiple of 512 bytes and ends with two zero blocks."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read(1024)
    except OSError as exn:
        raise ShardReadError(f"{path}: cannot open shard: {exn}") from exn
    if size == 0 or size % 512 or len(tail) < 1024 or tail.strip(b"\0"):
        raise ShardReadError(f"{path}: truncated or corrupt tar shard ({size} bytes; no end-of-archive marker)")


def _tar_members(path: str, on_bytes: Any = None) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular members of a local or remote tar (:func:`shards.remote.iter_tar_members`)."""
    yield from iter_tar_members(path, on_bytes)


def _iter_tar_samples(path: str, on_bytes: Any = None) -> Iterator[dict[str, Any]]:
    """Group consecutive members ``<key>.<field>`` of a tar into ``{"__key__", "__url__", field: bytes}``."""
    current: dict[str, Any] | None = None
    for name, data in _tar_members(path, on_bytes):
        key, dot, fld = os.path.basename(name).partition(".")
        if not dot:
            continue
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": path}
        if fld in current:
            raise ValueError(f"duplicate member {name}")
        current[fld] = data
    if current is not None:
        yield current


class _TarSamples:
    """Pipeline stage: shard urls -> raw samples, raising :class:`ShardReadError` naming the shard."""

    def __init__(self, counts: dict[str, int], index: dict[str, list[tuple[str, str]]] | None = None) -> None:
        self.counts, self.index = counts, index or {}

    def __call__(self, src: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for item in src:
            url = item["url"]
            if not is_remote(url):
                _check_tar_end(url)
            n = 0
            try:
                for sample in _iter_tar_samples(url):
                    check_fields(sample, url)
                    check_key(sample, n, self.index.get(url))  # key order + the manifest's digest (shards.verify)
                    n += 1
                    yield sample
            except ShardReadError:
                raise
            except (tarfile.TarError, OSError, ValueError, EOFError) as exn:
                raise ShardReadError(f"{url}: cannot read shard after {n} samples: {type(exn).__name__}: {exn}") \
                    from exn
            expected = self.counts.get(url)
            if expected is not None and n != expected:
                raise ShardReadError(f"{url}: shard holds {n} samples, the manifest says {expected}")


class _TokenFilter:
    """Pipeline stage predicate: keep only samples whose key (the sample token) is in ``tokens``.

    Runs on the raw tar members, before any JPEG decode or geometry, so skipped samples cost only their
    tar read.
    """

    def __init__(self, tokens: set[str] | frozenset[str]) -> None:
        self.tokens = frozenset(tokens)

    def __call__(self, sample: dict[str, Any]) -> bool:
        return sample["__key__"] in self.tokens


class _SampleShuffle:
    """Seeded shuffle buffer (per epoch, rank and worker)."""

    def __init__(self, state: _EpochState, bufsize: int) -> None:
        self.state, self.bufsize = state, bufsize

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"buf/{self.state.seed}/{self.state.epoch}/{rank}/{worker}")
        buf: list[Any] = []
        for x in src:
            buf.append(x)
            if len(buf) >= self.bufsize:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


# ---------------------------------------------------------------------------------------------------------
# per sample
# ---------------------------------------------------------------------------------------------------------


def decode_jpeg_rgb(data: bytes, where: str = "") -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W) RGB tensor (OpenCV ``imdecode`` + BGR->RGB, as ``mmcv.imread``)."""
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ShardReadError(f"{where}: JPEG cannot be decoded ({len(data)} bytes)")
    return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)


def compute_targets(
    points: np.ndarray,
    lidarseg: np.ndarray | None,
    cam_intrinsic: np.ndarray,
    lidar2cam: np.ndarray,
    img_hw: tuple[int, int],
    grid: GridSpec = DEFAULT_GRID,
    with_eval_gt: bool = True,
) -> dict[str, np.ndarray | None]:
    """Geometry of one sample (numpy; all rules in :mod:`shards.geometry`).

    Args:
        points: float32 (N, 4) x, y, z, intensity in the LiDAR frame.
        lidarseg: uint8 (N,) raw ids or None.
        cam_intrinsic: (6, 3, 3); lidar2cam: (6, 4, 4); img_hw: (H, W).
        grid: voxel volume.
        with_eval_gt: compute the evaluation targets: the ray-cast GT (~3.4M ray samples) and
            ``voxel_label``; both stay None without it (training samples).

    Returns:
        dict: ``lidar2img`` float32 (6, 4, 4); ``proj_cam``/``proj_point`` int64 (M,); ``proj_rowcol``
        int64 (M, 2); ``grid_ind`` float32 (N, 3); ``occupancy`` uint8 (X, Y, Z); ``labels`` int64 (N,) or
        None; ``voxel_label`` uint8 (X, Y, Z) or None; ``eval_gt`` uint8 (X, Y, Z) or None.
    """
    lidar2img = np.stack([lidar_to_image(k, t) for k, t in zip(cam_intrinsic, lidar2cam)]).astype(np.float32)
    cam, pidx, rowcol = project_all_cameras(points, lidar2cam, cam_intrinsic, img_hw)
    g64 = grid_indices(points, grid, np.float64)
    out: dict[str, np.ndarray | None] = {
        "lidar2img": lidar2img,
        "proj_cam": cam,
        "proj_point": pidx,
        "proj_rowcol": rowcol,
        "grid_ind": g64.astype(np.float32),
        "occupancy": occupancy_target(g64, grid),
        "labels": None,
        "voxel_label": None,
        "eval_gt": None,
    }
    if lidarseg is not None:
        labels = map_labels(lidarseg, RAW_TO_NOIGNORE)
        out["labels"] = labels.astype(np.int64)
        if with_eval_gt:  # evaluation targets only: training never reads them (voxel_label ~16 ms/sample)
            out["voxel_label"] = voxel_majority_label(g64, labels, grid)
            out["eval_gt"] = raycast_eval_gt(points, labels, grid)
    return out


def process_sample(
    fields: dict[str, Any], grid: GridSpec = DEFAULT_GRID, with_eval_gt: bool = True
) -> dict[str, Any]:
    """Raw WebDataset sample (``{field: bytes}``) -> per-sample tensors (inputs of :func:`collate`)."""
    verify_sample(fields)  # checksums of every member before any decode (names shard, key, member)
    url, key = fields.get("__url__", "?"), fields.get("__key__", "?")
    d = decode_arrays(fields)
    h, w = (int(x) for x in d["meta"]["img_hw"])
    images = torch.stack([decode_jpeg_rgb(b, f"{url}: sample {key}: member {CAMERA_FIELDS[c]}")
                          for c, b in enumerate(d["jpegs"])])
    if tuple(images.shape[-2:]) != (h, w):
        raise ShardReadError(f"{url}: sample {key}: decoded images {tuple(images.shape)} != meta img_hw {(h, w)}")
    pts = d["points"]
    seg = d["lidarseg"]
    if seg is not None and seg.shape != (pts.shape[0],):
        raise ShardReadError(f"{url}: sample {key}: {seg.shape[0]} labels for {pts.shape[0]} points")
    t = compute_targets(pts, seg, d["cam_intrinsic"], d["lidar2cam"], (h, w), grid, with_eval_gt)

    def tt(x: np.ndarray | None) -> torch.Tensor | None:
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x))

    return {
        "token": d["token"],
        "image": images,
        "img_hw": (h, w),
        "points": torch.from_numpy(pts),
        "labels_raw": tt(seg),
        **{k: tt(v) for k, v in t.items()},
    }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sample dicts of :func:`process_sample` -> the batch dict (keys :data:`BATCH_KEYS`).

    Shapes: ``images`` uint8 (B, 6, 3, H, W); ``lidar2img`` float32 (B, 6, 4, 4); ``img_hw`` (H, W);
    ``points``/``grid_ind``/``labels``/``labels_raw``: lists of B tensors (N_b, 4)/(N_b, 3)/(N_b,)/(N_b,)
    (labels None where the split has no lidarseg); ``occupancy``/``voxel_label``/``eval_gt`` uint8
    (B, X, Y, Z) (the last two may be None); ``proj_batch``/``proj_cam``/``proj_point`` int64 (M,),
    ``proj_rowcol`` int64 (M, 2), concatenated sample by sample.
    """
    if not samples:
        raise ValueError("collate: empty batch")
    hw = {s["img_hw"] for s in samples}
    if len(hw) != 1:
        raise ValueError(f"collate: samples of different image sizes {sorted(hw)} cannot be batched")

    def all_or_none(key: str) -> list[torch.Tensor] | None:
        vals = [s[key] for s in samples]
        if all(v is None for v in vals):
            return None
        if any(v is None for v in vals):
            raise ValueError(f"collate: {key} present for some samples only: {[s['token'] for s in samples]}")
        return vals

    def stack_or_none(key: str) -> torch.Tensor | None:
        vals = all_or_none(key)
        return None if vals is None else torch.stack(vals)

    return {
        "tokens": [s["token"] for s in samples],
        "images": torch.stack([s["image"] for s in samples]),
        "lidar2img": torch.stack([s["lidar2img"] for s in samples]),
        "img_hw": hw.pop(),
        "points": [s["points"] for s in samples],
        "grid_ind": [s["grid_ind"] for s in samples],
        "labels": all_or_none("labels"),
        "labels_raw": all_or_none("labels_raw"),
        "occupancy": torch.stack([s["occupancy"] for s in samples]),
        "voxel_label": stack_or_none("voxel_label"),
        "eval_gt": stack_or_none("eval_gt"),
        "proj_batch": torch.cat(
            [torch.full((len(s["proj_point"]),), b, dtype=torch.int64) for b, s in enumerate(samples)]
        ),
        "proj_cam": torch.cat([s["proj_cam"] for s in samples]),
        "proj_point": torch.cat([s["proj_point"] for s in samples]),
        "proj_rowcol": torch.cat([s["proj_rowcol"] for s in samples]),
    }


# ---------------------------------------------------------------------------------------------------------
# dataset / loader
# ---------------------------------------------------------------------------------------------------------


class _Process:
    def __init__(self, grid: GridSpec, with_eval_gt: bool) -> None:
        self.grid, self.with_eval_gt = grid, with_eval_gt

    def __call__(self, fields: dict[str, Any]) -> dict[str, Any]:
        return process_sample(fields, self.grid, self.with_eval_gt)


class ShardDataset(wds.DataPipeline):
    """The WebDataset pipeline of one split (an ``IterableDataset`` yielding batch dicts)."""

    def __init__(
        self,
        urls: list[str],
        counts: dict[str, int],
        batch_size: int,
        grid: GridSpec = DEFAULT_GRID,
        with_eval_gt: bool = False,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        resampled: bool = False,
        split_nodes: bool = True,
        drop_last: bool = False,
        tokens: set[str] | None = None,
        index: dict[str, list[tuple[str, str]]] | None = None,
    ) -> None:
        self.state = _EpochState(seed)
        stages: list[Any] = [_ShardSource(urls, self.state, shuffle, resampled)]
        if split_nodes and not resampled:
            stages.append(wds.split_by_node)
        if not resampled:
            stages.append(wds.split_by_worker)
        stages.append(_TarSamples(counts, index))
        if tokens is not None:
            stages.append(wds.select(_TokenFilter(tokens)))
        if shuffle_buffer > 1:
            stages.append(_SampleShuffle(self.state, shuffle_buffer))
        stages.append(wds.map(_Process(grid, with_eval_gt)))
        stages.append(wds.batched(batch_size, collation_fn=collate, partial=not drop_last))
        super().__init__(*stages)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard shuffle / resampling / shuffle-buffer seeds)."""
        self.state.epoch = int(epoch)


def _identity(x: Any) -> Any:
    return x


def make_loader(
    source: str | list[str],
    split: str,
    batch_size: int = 1,
    num_workers: int = 0,
    grid: GridSpec = DEFAULT_GRID,
    shuffle: bool | None = None,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = False,
    epoch_batches: int | None = None,
    eval_gt: bool | None = None,
    split_nodes: bool = True,
    drop_last: bool = False,
    pin_memory: bool = False,
    tokens: set[str] | None = None,
) -> DataLoader:
    """A DataLoader over the shards of ``split`` yielding the batch dict of docs/architecture.md.

    Args:
        source: shard directory with ``manifest.json`` / manifest path / glob / list of tar paths.
        split: ``train``/``val``/``test``.
        batch_size: samples per batch (batched inside the workers).
        num_workers: DataLoader worker processes (each reads whole shards).
        grid: voxel volume.
        shuffle: shuffle the shard order each epoch (seeded by ``seed`` and the epoch); default: train only.
        shuffle_buffer: >1 adds a seeded sample shuffle buffer of that size.
        seed, epoch: seeds; change the epoch later with ``loader.dataset.set_epoch(e)``.
        resampled: draw shards with replacement forever (per rank/worker seeds); use ``epoch_batches``.
        epoch_batches: batches per epoch of this rank (required with ``resampled``).
        eval_gt: compute the ray-cast evaluation GT; default: on except for ``train``.
        split_nodes: split shards over distributed ranks (turn off only when something else shards).
        drop_last: drop a last incomplete batch of each worker.
        pin_memory: DataLoader ``pin_memory``.
        tokens: keep only the samples with these sample tokens (None: all). Other samples are dropped
            right after the tar read, before JPEG decode and geometry; the manifest sample-count check
            still covers every sample of a shard.

    Raises:
        ValueError: no shards, or fewer shards than ``world_size * max(1, num_workers)`` without resampling.
    """
    urls, counts = list_shards(source, split)
    if shuffle is None:
        shuffle = split == "train"
    if eval_gt is None:
        eval_gt = split != "train"
    _, world = _world()
    readers = (world if split_nodes else 1) * max(1, num_workers)
    if not resampled and len(urls) < readers:
        raise ValueError(
            f"{source}: split {split!r} has {len(urls)} shard(s) but {readers} readers (world_size {world} x "
            f"num_workers {max(1, num_workers)}) need at least one each; rebuild with a smaller "
            "--samples-per-shard, lower num_workers, or pass resampled=True with epoch_batches"
        )
    if resampled and not epoch_batches:
        raise ValueError("resampled=True needs epoch_batches (the stream is infinite)")
    ds = ShardDataset(urls, counts, batch_size, grid, eval_gt, shuffle, shuffle_buffer, seed, resampled,
                      split_nodes, drop_last, tokens, index=shard_index(source, split))
    ds.set_epoch(epoch)
    if epoch_batches:
        ds = ds.with_epoch(math.ceil(epoch_batches / max(1, num_workers)))
    return DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                      pin_memory=pin_memory, persistent_workers=False)


def read_sample(source: str | list[str], split: str, grid: GridSpec = DEFAULT_GRID, index: int | None = None,
                token: str | None = None, eval_gt: bool = True) -> dict[str, Any]:
    """The batch dict (batch size 1) of one sample: number ``index`` in shard order, or the sample ``token``.

    Only the chosen sample is decoded and processed (the others are skipped as raw tar members).
    Raises LookupError naming the shards when there is no such sample.
    """
    if (index is None) == (token is None):
        raise ValueError("read_sample: give exactly one of index and token")
    paths, _ = list_shards(source, split)
    manifest_keys = shard_index(source, split)
    seen = 0
    for path in paths:
        for pos, raw in enumerate(_iter_tar_samples(path)):
            check_key(raw, pos, manifest_keys.get(path))
            if raw["__key__"] == token or (token is None and seen == index):
                return collate([process_sample(raw, grid, eval_gt)])
            seen += 1
    what = f"token {token}" if token is not None else f"index {index}"
    raise LookupError(f"{source}: split {split!r} has no sample with {what} ({seen} samples)")
