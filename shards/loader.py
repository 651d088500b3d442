"""WebDataset loader: shards -> decoded samples -> the batch dict of ``docs/architecture.md``.

Pipeline (a ``webdataset.DataPipeline``, one copy per DataLoader worker)::

    shard list (manifest or glob; seeded shuffle per epoch, or seeded resampling)
      -> wds.split_by_node -> wds.split_by_worker
      -> tar reading (checks: tar end marker, required fields, sample count from the manifest)
      -> optional seeded sample shuffle buffer
      -> per-sample decode + geometry (:func:`process_sample`)
      -> batching with :func:`collate` (inside the workers)

Tar reading is :mod:`shards.stream`; per-sample decode + geometry and the batch layout are :mod:`shards.sample`.

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
from collections.abc import Iterable, Iterator
from typing import Any

import webdataset as wds
from torch.utils.data import DataLoader

from shards.errors import ShardReadError
from shards.geometry import GridSpec
from shards.sample import BATCH_KEYS, DEFAULT_GRID, collate, compute_targets, decode_jpeg_rgb, process_sample
from shards.remote import is_remote
from shards.stream import _iter_tar_samples, _TarSamples
from shards.verify import check_key, shard_index

__all__ = ["BATCH_KEYS", "DEFAULT_GRID", "ShardDataset", "ShardReadError", "collate", "compute_targets",
           "decode_jpeg_rgb", "list_shards", "make_loader", "process_sample", "read_sample"]



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
