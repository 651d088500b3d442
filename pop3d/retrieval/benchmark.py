"""The benchmark files of the original release: ``retrieval_anns_<split>.csv`` and the relevance arrays."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Splits of the benchmark files, and the rows of the result tables.
SPLITS: tuple[str, ...] = ("train", "val", "test")
TABLE_SPLITS: tuple[str, ...] = ("train", "val", "test", "valtest")
CSV_FIELDS: tuple[str, ...] = ("token", "split", "ann_path", "pts_path", "query")


class BenchmarkError(ValueError):
    """A benchmark file is missing or malformed; the message starts with the file's path."""

@dataclass
class BenchmarkEntry:
    """One benchmark line and its relevance: (token, split, query) + ``relevant`` bool (N_ann,)."""

    token: str
    split: str
    query: str
    ann_file: Path
    source: str
    """``<csv path>:<line>`` the entry comes from."""
    relevant: np.ndarray = field(repr=False)


def csv_path(benchmark_dir: str | os.PathLike, split: str) -> Path:
    return Path(benchmark_dir) / f"retrieval_anns_{split}.csv"


def annotation_path(benchmark_dir: str | os.PathLike, token: str) -> Path:
    return Path(benchmark_dir) / "annotations" / f"{token}__retrieval.npy"


def load_annotation(path: str | os.PathLike) -> np.ndarray:
    """``<token>__retrieval.npy`` -> bool (N,) relevance. Accepts bool or integer/float 0/1 arrays of shape
    (N,), (N, 1) or (1, N). Raises :class:`BenchmarkError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: annotation file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # any unreadable file is reported with its path
        raise BenchmarkError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise BenchmarkError(f"{path}: expected a 1-D per-point relevance array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise BenchmarkError(f"{path}: relevance must be bool or numeric 0/1, got dtype {arr.dtype}")
        bad = ~np.isin(arr, (0, 1))
        if bad.any():
            raise BenchmarkError(f"{path}: relevance must be binary; {int(bad.sum())} values are not 0/1 "
                                 f"(e.g. {arr[bad][:3].tolist()})")
    return arr.astype(bool)


def read_benchmark(benchmark_dir: str | os.PathLike, splits: tuple[str, ...] | list[str] = SPLITS
                   ) -> list[BenchmarkEntry]:
    """Read ``retrieval_anns_<split>.csv`` of ``splits`` and every annotation they name (fails early).

    Only token, split and query of a line are used (as the original); the annotation is
    ``annotations/<token>__retrieval.npy`` under ``benchmark_dir``. The split of an entry is the CSV's
    ``split`` field. Blank lines and a header line ``token;split;...`` are skipped.
    """
    root = Path(benchmark_dir)
    if not root.is_dir():
        raise BenchmarkError(f"{root}: benchmark directory not found")
    entries: list[BenchmarkEntry] = []
    for split in splits:
        if split not in SPLITS:
            raise BenchmarkError(f"unknown benchmark split {split!r}; allowed: {list(SPLITS)}")
        path = csv_path(root, split)
        if not path.is_file():
            raise BenchmarkError(f"{path}: benchmark CSV not found")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = [c.strip() for c in line.split(";")]  # plain split, as the original (no CSV quoting)
            if lineno == 1 and row[0].lower() == "token":
                continue
            if len(row) != len(CSV_FIELDS):
                raise BenchmarkError(f"{path}:{lineno}: expected {len(CSV_FIELDS)} ';'-separated fields "
                                     f"{'/'.join(CSV_FIELDS)}, got {len(row)}: {';'.join(row)!r}")
            token, row_split, _ann, _pts, query = row
            if row_split not in SPLITS:
                raise BenchmarkError(f"{path}:{lineno}: split field {row_split!r} is not one of {list(SPLITS)}")
            if not token or not query:
                raise BenchmarkError(f"{path}:{lineno}: empty token or query")
            ann = annotation_path(root, token)
            entries.append(BenchmarkEntry(token, row_split, query, ann, f"{path}:{lineno}", load_annotation(ann)))
    return entries
