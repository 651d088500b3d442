"""The builder's own files in an output folder: build id, lock, temp names, records of what it wrote.

The rule (issue 8): the shard builder only touches files its own records say it wrote. A shard name is the
builder's when ``.progress/<name>.json`` exists or the folder's ``manifest.json`` lists it; temp files are
``<file>.tmp-<build id>-<pid>`` with the id of ``.progress/build.json``; only those are deleted as leftovers.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import secrets
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

from p3d_common import atomic as common_atomic
from shards.reader import DataError
from shards.schema import MANIFEST_NAME, META_FIELD, PROGRESS_DIR, SCHEMA_VERSION, decode_json

FORMAT_NAME = "pop3d-nuscenes-wds"
BUILD_FILE = "build.json"
LOCK_FILE = "lock"
SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<idx>\d{6})\.tar$")


def temp_name(path: str, build_id: str) -> str:
    """This build's temp file for ``path`` (only files of this pattern are ever deleted as leftovers)."""
    return f"{path}.tmp-{build_id}-{os.getpid()}"


def atomic_write_json(path: str, obj: dict[str, Any], build_id: str) -> None:
    """The builder's JSON records, through the project's one atomic writer, with this build's temp name."""
    common_atomic.atomic_write_json(path, obj, temp_name(path, build_id), indent=1, sort_keys=True)


def sidecar_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, PROGRESS_DIR, name + ".json")


def clean_temp_files(out_dir: str, build_id: str) -> list[str]:
    """Delete this build id's leftover temp files (never another program's ``*.tmp-*``)."""
    pattern = f"*.tmp-{build_id}-*"
    stale = glob.glob(os.path.join(out_dir, pattern)) + glob.glob(os.path.join(out_dir, PROGRESS_DIR, pattern))
    for p in stale:
        os.remove(p)
    return stale


def build_id_of(out_dir: str) -> str:
    """The build id of ``out_dir`` (``.progress/build.json``), created on the first build."""
    path = os.path.join(out_dir, PROGRESS_DIR, BUILD_FILE)
    if os.path.exists(path):
        with open(path) as f:
            try:
                rec = json.load(f)
                return str(rec["build_id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}: not a build record of this writer; use another --out") from None
    build_id = secrets.token_hex(8)
    atomic_write_json(path, {"build_id": build_id, "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION},
                       build_id)
    return build_id


@contextlib.contextmanager
def build_lock(out_dir: str) -> Iterator[None]:
    """Hold ``.progress/lock`` (flock) for the whole build; a second build on the same --out is refused."""
    path = os.path.join(out_dir, PROGRESS_DIR, LOCK_FILE)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataError(f"{out_dir}: another build_shards is writing here (it holds {path}); wait for it "
                            "or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def owned_names(out_dir: str) -> set[str]:
    """Shard names this builder's records say it wrote: sidecars, and the shards of our manifest."""
    names = {os.path.basename(p)[: -len(".json")]
             for p in glob.glob(os.path.join(out_dir, PROGRESS_DIR, "*.tar.json"))}
    man = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(man):  # check_output_dir or delete_build has checked its format
        with open(man) as f:
            m = json.load(f)
        names |= {sh["name"] for e in m.get("splits", {}).values() for sh in e.get("shards", [])}
    return names


def refuse_foreign(out_dir: str, names: Iterable[str], owned: set[str]) -> None:
    """DataError naming the first file at a name the build must write that this builder did not write."""
    for name in names:
        path = os.path.join(out_dir, name)
        if name not in owned and os.path.lexists(path):
            raise DataError(f"{path}: exists but was not written by build_shards (no record in "
                            f"{os.path.join(out_dir, PROGRESS_DIR)} or the manifest); move it away or use "
                            "another --out")


def _first_meta(path: str) -> dict[str, Any] | None:
    """``meta.json`` of the first sample of a tar (None when unreadable)."""
    try:
        with tarfile.open(path, "r|") as tf:
            for ti in tf:
                if ti.name.endswith("." + META_FIELD):
                    fobj = tf.extractfile(ti)
                    return decode_json(fobj.read()) if fobj else None
    except (tarfile.TarError, OSError, ValueError):
        return None
    return None


_OTHER_VERSION_HINT = ("Its shards are not mixed with new ones: build into a new --out (finished schema-2 shards "
                       "still load, with the eval GT computed on the fly), or rebuild this folder with --overwrite "
                       "(deletes only the builder's own files).")


def delete_build(out_dir: str) -> list[str]:
    """``--overwrite``: delete the files an earlier build (of any schema version) wrote into ``out_dir``: the
    shards its records name (``.progress/*.tar.json`` and the manifest), those records, ``manifest.json``,
    ``.progress/build.json`` and its temp files. Everything else stays. Call it holding :func:`build_lock`.
    Returns the deleted names (relative to ``out_dir``), sorted.

    Raises:
        DataError: ``manifest.json`` or ``build.json`` is not this builder's (the folder is not a build's).
    """
    man, build = os.path.join(out_dir, MANIFEST_NAME), os.path.join(out_dir, PROGRESS_DIR, BUILD_FILE)
    records = {}
    for path in (man, build):
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                rec = json.load(f)
            if not isinstance(rec, dict) or rec.get("format") != FORMAT_NAME:
                raise ValueError(f"format {rec.get('format') if isinstance(rec, dict) else None!r}")
        except (json.JSONDecodeError, ValueError) as exn:
            raise DataError(f"{path}: not a record of build_shards ({exn}); --overwrite deletes only a build's own "
                            "files: move the folder away or use another --out") from None
        records[path] = rec
    old_id = str(records.get(build, {}).get("build_id", ""))
    deleted = ([os.path.relpath(p, out_dir) for p in clean_temp_files(out_dir, old_id)]
               if re.fullmatch(r"[0-9a-f]{16}", old_id) else [])
    names = owned_names(out_dir)  # the records are this builder's (checked above)
    doomed = [n for n in names if SHARD_RE.match(n)] + [os.path.join(PROGRESS_DIR, n + ".json") for n in names]
    for rel in sorted({*doomed, MANIFEST_NAME, os.path.join(PROGRESS_DIR, BUILD_FILE)}):
        path = os.path.join(out_dir, rel)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            deleted.append(rel)
    return sorted(deleted)


def check_output_dir(out_dir: str) -> None:
    """Refuse an output directory that holds shards of another schema version (naming the file)."""
    man = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(man):
        with open(man) as f:
            try:
                m = json.load(f)
            except json.JSONDecodeError as exn:
                raise DataError(f"{man}: not a valid manifest ({exn}); remove it or use another --out") from None
        if m.get("schema_version") != SCHEMA_VERSION or m.get("format") != FORMAT_NAME:
            raise DataError(
                f"{man}: output directory holds shards of schema version {m.get('schema_version')!r} "
                f"(format {m.get('format')!r}); this writer writes version {SCHEMA_VERSION}. "
                f"{_OTHER_VERSION_HINT}"
            )
    for side in sorted(glob.glob(os.path.join(out_dir, PROGRESS_DIR, "*.tar.json"))):
        with open(side) as f:
            v = json.load(f).get("schema_version")
        if v != SCHEMA_VERSION:
            raise DataError(f"{side}: progress record of schema version {v!r} (writer: {SCHEMA_VERSION}): a "
                            f"build of an older writer; {_OTHER_VERSION_HINT}")
    for tar in sorted(glob.glob(os.path.join(out_dir, "*.tar"))):
        if SHARD_RE.match(os.path.basename(tar)) and not os.path.exists(
            sidecar_path(out_dir, os.path.basename(tar))
        ):
            meta = _first_meta(tar)
            if meta is not None and meta.get("schema_version") != SCHEMA_VERSION:
                raise DataError(f"{tar}: shard of schema version {meta.get('schema_version')!r} "
                                f"(writer: {SCHEMA_VERSION}); {_OTHER_VERSION_HINT}")
