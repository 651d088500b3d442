"""Sample order that does not depend on the process count, and resume that skips at the tar level.

Training. A global optimiser step consumes ``S = world * grad_accum * batch_size`` *slots*. At epoch ``e``
the shard list is shuffled with the seed ``(seed, e)`` (the same on every rank); slot ``j`` reads the shards
``shuffled[j::S]`` one after another, samples in tar order. Step ``p`` of the epoch takes sample ``p`` of
every slot; element ``k`` of the batch of micro-step ``a`` of rank ``r`` reads slot
``j = (r * accum + a) * batch_size + k``. So any (processes, grad_accum, batch_size) with the same product
(1 x 4 x 1, 2 x 2 x 1, 2 x 1 x 2, 1 x 1 x 4, ...) sees the same global batches, and the sample of
``(epoch, step, slot)`` is a function of the manifest alone (optionally the samples of a slot are also
shuffled inside blocks of consecutive positions, seeded the same way): a resumed run starts at the right shard and
sample by arithmetic, opening only the shard it needs and seeking over tar headers (nothing decoded).

Steps per epoch: every slot holds ``floor(K / S)`` or ``ceil(K / S)`` of the K shards, so every slot has at
least the sum of the ``floor(K / S)`` smallest shard counts; that many steps per epoch, in every epoch and
on every rank (fewer than ``N / S`` only by the shards that do not divide evenly).

Evaluation: rank ``r`` of ``world`` reads the shards ``r::world`` in manifest order; with ``max_samples``
only the samples whose index in the whole split is below it. Counts summed over ranks equal one process's.

DataLoader workers: worker ``w`` of ``W`` produces items ``w, w + W, ...`` of the rank's item list, which is
the order in which the DataLoader hands them out (round robin), so the order does not depend on ``W``
either; each item carries its tag, and :func:`check_order` lets the consumer verify it.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

#: One unit of work: (shard path, sample index inside the shard, tag handed back with the batch).
Item = tuple[str, int, tuple]


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (e.g. seed, epoch, sample token, purpose); the same on every machine."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_shard_order(urls: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The shard order of ``epoch`` (seeded by (seed, epoch) only)."""
    order = list(urls)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def steps_per_epoch(counts: Sequence[int], n_slots: int) -> int:
    """Steps every slot can serve in every epoch: the sum of the ``floor(K / S)`` smallest shard counts."""
    per_slot = len(counts) // n_slots
    return sum(sorted(counts)[:per_slot])


def check_slots(n_shards: int, n_slots: int, where: str) -> None:
    if n_shards < n_slots:
        raise ValueError(
            f"{where}: {n_shards} training shard(s) for {n_slots} slots (processes x grad_accum_steps x "
            "batch_size); every slot reads its own shards: rebuild the shards with a smaller "
            "--samples-per-shard, or use fewer processes / accumulation steps / a smaller batch")


def block_permutation(n: int, block: int, seed: int, epoch: int, slot: int) -> list[int]:
    """Position p -> the position it reads: a seeded permutation inside each block of ``block`` consecutive
    positions (``block`` <= 1: identity). Seeded by (seed, epoch, slot, block index) only."""
    if block <= 1:
        return list(range(n))
    out: list[int] = []
    for start in range(0, n, block):
        idx = list(range(start, min(start + block, n)))
        random.Random(f"blk/{seed}/{epoch}/{slot}/{start // block}").shuffle(idx)
        out.extend(idx)
    return out


def train_items(urls: Sequence[str], counts: dict[str, int], *, seed: int, epoch: int, start_step: int,
                rank: int, world: int, accum: int, shuffle_block: int = 0, batch_size: int = 1) -> list[Item]:
    """The items rank ``rank`` reads in ``epoch`` from step ``start_step`` on, tagged (epoch, step, micro):
    per step, per micro-step, its ``batch_size`` samples one after another (all with the micro-step's tag).

    ``shuffle_block`` > 1 also shuffles the samples of each slot inside blocks of that many consecutive
    positions (across shard boundaries); still a function of (seed, epoch, slot), so resume stays arithmetic.
    """
    n_slots = world * accum * batch_size
    order = epoch_shard_order(urls, seed, epoch)
    slots = [order[j::n_slots] for j in range(n_slots)]
    spe = steps_per_epoch([counts[u] for u in urls], n_slots)
    mine = [(a, (rank * accum + a) * batch_size + k) for a in range(accum) for k in range(batch_size)]
    perms = {j: block_permutation(spe, shuffle_block, seed, epoch, j) for _, j in mine}
    cums = []
    for slot in slots:
        c = [0]
        for s in slot:
            c.append(c[-1] + counts[s])
        cums.append(c)
    items: list[Item] = []
    for p in range(start_step, spe):
        for a, j in mine:
            q = perms[j][p]
            i = bisect.bisect_right(cums[j], q) - 1
            items.append((slots[j][i], q - cums[j][i], (epoch, p, a)))
    return items


def eval_items(urls: Sequence[str], counts: dict[str, int], *, rank: int, world: int,
               max_samples: int | None = None) -> list[Item]:
    """Rank ``rank``'s evaluation items: its shards ``rank::world``, samples with split index < max_samples."""
    items: list[Item] = []
    start = 0
    for k, u in enumerate(urls):
        n = counts[u]
        if k % world == rank:
            for i in range(n):
                if max_samples is None or start + i < max_samples:
                    items.append((u, i, (start + i,)))
        start += n
    return items


def check_order(tag: tuple, expected: tuple) -> None:
    if tuple(tag) != tuple(expected):
        raise RuntimeError(f"data order: got item {tuple(tag)}, expected {tuple(expected)} (loader out of order)")


class _ShardIndex:
    """Random access to the samples of one tar shard: the headers are read once (seeking over the data),
    then a sample's members are read on request. Nothing is decoded here."""

    def __init__(self, path: str, expected: int | None, keys: list[tuple[str, str]] | None = None) -> None:
        from shards.errors import ShardReadError
        from shards.stream import _check_tar_end

        self.path, self.keys = path, keys
        self._file = None
        try:
            if "://" in path:  # http(s)://, s3://, ... through fsspec: random access by range requests
                import fsspec

                self._file = fsspec.open(path, "rb").open()
                self.tar = tarfile.open(fileobj=self._file, mode="r:")
            elif path.startswith("pipe:"):
                raise ShardReadError(f"{path}: training and evaluation read shards by random access; a pipe: "
                                     "source cannot seek (use a local folder or an http(s)/fsspec URL)")
            else:
                _check_tar_end(path)
                self.tar = tarfile.open(path, mode="r:")
            groups: dict[str, list[tarfile.TarInfo]] = {}
            for ti in self.tar.getmembers():
                if not ti.isreg():
                    continue
                key, dot, _ = os.path.basename(ti.name).partition(".")
                if dot:
                    groups.setdefault(key, []).append(ti)
        except (tarfile.TarError, OSError, EOFError) as exn:
            raise ShardReadError(f"{path}: cannot read shard: {type(exn).__name__}: {exn}") from exn
        self.samples = list(groups.items())
        if expected is not None and len(self.samples) != expected:
            raise ShardReadError(f"{path}: shard holds {len(self.samples)} samples, the manifest says {expected}")

    def read(self, index: int) -> dict[str, Any]:
        from shards.loader import ShardReadError
        from shards.schema import check_fields
        from shards.verify import check_key

        if not 0 <= index < len(self.samples):
            raise ShardReadError(f"{self.path}: no sample #{index} ({len(self.samples)} samples)")
        key, members = self.samples[index]
        sample: dict[str, Any] = {"__key__": key, "__url__": self.path}
        try:
            for ti in members:
                fld = os.path.basename(ti.name).partition(".")[2]
                if fld in sample:
                    raise ShardReadError(f"{self.path}: sample {key}: duplicate member {ti.name}")
                sample[fld] = self.tar.extractfile(ti).read()
        except (tarfile.TarError, OSError, EOFError) as exn:
            raise ShardReadError(f"{self.path}: sample {key}: cannot read: {type(exn).__name__}: {exn}") from exn
        check_fields(sample, self.path)
        check_key(sample, index, self.keys)  # the manifest's key at this position + its checksums digest
        return sample

    def close(self) -> None:
        self.tar.close()
        if self._file is not None:
            self._file.close()


class PlannedSamples(IterableDataset):
    """Yields the batch dict of each planned micro-batch (``batch_size`` consecutive items sharing one tag),
    decoded by ``shards.loader.process_sample``, with ``batch["order"]`` = the tag. Workers split the
    micro-batches round robin (see the module doc)."""

    max_open = 4
    """Open shards kept per worker (at least 2 per slot of a batch: block shuffling alternates two shards)."""

    def __init__(self, counts: dict[str, int], grid, with_eval_gt: bool,
                 index: dict[str, list[tuple[str, str]]] | None = None, batch_size: int = 1,
                 per_sample: Callable[[dict[str, Any], tuple], dict[str, Any]] | None = None) -> None:
        """``index``: the manifest's ``{shard: [(key, digest), ...]}`` (``shards.verify.shard_index``): every
        sample read is checked against it before it is decoded. ``per_sample(sample, tag)``: extra entries of
        one decoded sample (the ``process_sample`` dict) computed in the worker, e.g. a consumer's random
        draws; tensors are stacked over the batch, other values listed (a picklable callable)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.counts, self.grid, self.with_eval_gt, self.index = counts, grid, with_eval_gt, index or {}
        self.batch_size, self.per_sample = batch_size, per_sample
        self.max_open = max(type(self).max_open, 2 * batch_size)
        self.groups: list[list[Item]] = []

    def set_items(self, items: list[Item]) -> None:
        items = list(items)
        b = self.batch_size
        if len(items) % b:
            raise ValueError(f"{len(items)} items do not make batches of {b}")
        self.groups = [items[i:i + b] for i in range(0, len(items), b)]
        for g in self.groups:
            if any(tuple(it[2]) != tuple(g[0][2]) for it in g):
                raise ValueError(f"the items of one batch carry different tags: {[it[2] for it in g]}")

    def _batch(self, group: list[Item], open_shards: dict[str, _ShardIndex]) -> dict[str, Any]:
        from shards.loader import collate, process_sample

        samples = []
        for url, index, _ in group:
            shard = open_shards.pop(url, None) or _ShardIndex(url, self.counts.get(url), self.index.get(url))
            open_shards[url] = shard  # a few, most recent last (block shuffling alternates)
            if len(open_shards) > self.max_open:
                open_shards.pop(next(iter(open_shards))).close()
            samples.append(process_sample(shard.read(index), self.grid, self.with_eval_gt))
        tag = group[0][2]
        extras = [self.per_sample(s, tag) for s in samples] if self.per_sample is not None else []
        batch = collate(samples)
        for key in (extras[0] if extras else {}):
            vals = [e[key] for e in extras]
            batch[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
        batch["order"] = tag
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        open_shards: dict[str, _ShardIndex] = {}
        try:
            for group in self.groups[w::n_workers]:
                yield self._batch(group, open_shards)
        finally:
            for shard in open_shards.values():
                shard.close()

    def __len__(self) -> int:
        return len(self.groups)


def _identity(x: Any) -> Any:
    return x


def planned_loader(dataset: PlannedSamples, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` (set its items before each ``iter``; workers are not persistent)."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                      pin_memory=pin_memory, persistent_workers=False)


def eval_loader(source: str, split: str, grid, *, rank: int = 0, world: int = 1, num_workers: int = 0,
                max_samples: int | None = None) -> DataLoader:
    """This rank's share of an evaluation split (needs the manifest's sample counts)."""
    from shards.loader import list_shards

    urls, counts = list_shards(source, split)
    if not counts:
        raise ValueError(f"{source}: split {split!r} has no manifest.json with sample counts (scripts/"
                         "build_shards.py writes one); multi-process evaluation needs it")
    from shards.verify import shard_index

    ds = PlannedSamples(counts, grid, with_eval_gt=True, index=shard_index(source, split))
    ds.set_items(eval_items(urls, counts, rank=rank, world=world, max_samples=max_samples))
    return planned_loader(ds, num_workers)
