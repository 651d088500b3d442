"""Atomic, durable file writing that honours the umask.

A file is written to a temporary name in its own folder, flushed to disk (fsync), given the permissions a
plain ``open(path, "w")`` would give it (``0o666 & ~umask``: 0644 under umask 022), renamed over the target,
and the folder is fsynced so the rename survives a crash. Readers see the old file or the new one, never
half a file; on an error the temporary file is removed and the target is left as it was.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "current_umask", "fsync_dir",
           "fsync_file"]


def current_umask() -> int:
    """The process umask: from /proc/self/status where Linux gives it (no race with other threads), else by
    setting it and restoring it at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_file(path: Path) -> None:
    """Flush a written file to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, temp: str | os.PathLike | None = None) -> Iterator[Path]:
    """A temporary path in ``path``'s folder for the caller to write; it replaces ``path`` (fsync, umask
    permissions, rename, fsync of the folder) when the block ends without error.

    ``temp``: the temporary file's name, for writers whose leftovers must be recognisable as their own (the
    shard builder); by default a fresh ``.<name>.*.tmp`` beside the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if temp is None:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        temp = name
    tmp = Path(temp)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, temp: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` atomically (``temp``: see :func:`atomic_path`)."""
    with atomic_path(path, temp) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, temp: str | os.PathLike | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), temp)


def atomic_write_json(path: str | os.PathLike, obj: Any, temp: str | os.PathLike | None = None,
                      **dump_kwargs: Any) -> None:
    """``json.dumps(obj, **dump_kwargs)`` plus a final newline, written to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n", temp)
