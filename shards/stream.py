"""Reading tar shards as a stream: members grouped into raw samples, each checked against the manifest.

A raw sample is ``{"__key__": token, "__url__": shard, field: bytes}``. :class:`_TarSamples` is the webdataset
pipeline stage of :mod:`shards.loader`; every failure raises :class:`~shards.errors.ShardReadError` naming the
shard (and the sample key where there is one). Shards may be local files or URLs (:mod:`shards.remote`).
"""
from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

from shards.errors import ShardReadError
from shards.remote import is_remote, iter_tar_members
from shards.schema import check_fields
from shards.verify import check_key


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
