"""Integrity of a shard set: the manifest, its per-shard key index and every sample's checksums.

Chain of trust (schema version 2)::

    manifest.json  -> per shard: sample count, bytes, sha256 of the tar, and for each sample (in order) its
                      key and the sha256 of its ``checksums.json`` member
    checksums.json -> size and sha256 of every other member of the sample

The loader checks each sample before it is decoded (:func:`verify_sample`: ~2 ms per 1.5 MB sample, in the
DataLoader workers) and each shard's keys in order (:func:`check_key`); ``scripts/verify_shards.py``
checks a whole set, whole-file sha256 included (:func:`verify_shard_set`). Every failure names the shard,
the sample key and, where one is concerned, the member.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from shards.errors import MissingSplitError, ShardReadError
from shards.remote import is_remote, join, local_path, read_bytes
from shards.schema import CHECKSUM_FIELD, MANIFEST_NAME, READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION, decode_json

#: Key of the raw sample dict holding the manifest's sha256 of the sample's ``checksums.json``.
DIGEST_KEY = "__manifest_digest__"
REBUILD_HINT = "rebuild the shards with scripts/build_shards.py (into a new --out)"


# ---------------------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------------------


def manifest_url(source: str) -> str:
    """``manifest.json`` of a source given as a folder / URL of a folder / the manifest itself."""
    return source if source.endswith(".json") else join(source, MANIFEST_NAME)


def load_manifest(source: str) -> tuple[dict[str, Any], str]:
    """(manifest, root to join shard names to) of a local or remote shard set; refuses unknown schema versions
    (reads :data:`shards.schema.READABLE_SCHEMA_VERSIONS`: 2 and 3).

    Raises:
        ShardReadError: naming the manifest when it is missing, not JSON, or of another schema version.
    """
    url = manifest_url(source)
    m = _parse_manifest(url)
    if not isinstance(m, dict) or m.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        got = m.get("schema_version") if isinstance(m, dict) else None
        readable = "/".join(str(v) for v in sorted(READABLE_SCHEMA_VERSIONS))
        raise ShardReadError(f"{url}: shards of schema version {got!r}, this code reads versions {readable} "
                             f"(per-sample checksums; written: {SCHEMA_VERSION}); {REBUILD_HINT}")
    if source.endswith(".json"):
        root = source.rsplit("/", 1)[0] if is_remote(source) else _local_dir(source)
    else:
        root = source if is_remote(source) else local_path(source)
    return m, root


_CACHE: dict[tuple[str, int, int], Any] = {}


def _parse_manifest(url: str) -> Any:
    """Parsed manifest; a local one is parsed once per (path, size, mtime) (~0.8 s at 40k samples). Read-only."""
    stamp = None
    if not is_remote(url):
        try:
            st = os.stat(local_path(url))
            stamp = (os.path.abspath(local_path(url)), st.st_size, st.st_mtime_ns)
        except OSError:
            pass
        if stamp in _CACHE:
            return _CACHE[stamp]
    data = read_bytes(url)
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ShardReadError(f"{url}: not a valid manifest ({exn})") from None
    if stamp is not None:
        _CACHE.clear()
        _CACHE[stamp] = m
    return m


def _local_dir(path: str) -> str:
    return os.path.dirname(os.path.abspath(local_path(path)))


def split_entry(manifest: dict[str, Any], split: str, where: str) -> dict[str, Any]:
    """The manifest entry of ``split`` (ShardReadError naming the manifest and the splits it has)."""
    if split not in manifest.get("splits", {}):
        raise MissingSplitError(f"{where}: manifest has no split {split!r} (has {sorted(manifest.get('splits', {}))})")
    return manifest["splits"][split]


def manifest_shards(source: str, split: str) -> tuple[list[str], dict[str, int]]:
    """(shard urls of ``split`` in manifest order, {url: num_samples}); a missing local shard is an error here."""
    m, root = load_manifest(source)
    shards = split_entry(m, split, manifest_url(source))["shards"]
    urls = [join(root, s["name"]) for s in shards]
    if not is_remote(root):
        for u in urls:
            if not os.path.isfile(u):
                raise ShardReadError(f"{u}: shard missing (listed in {manifest_url(source)}); restore it or "
                                     "rebuild with scripts/build_shards.py")
    return urls, {u: int(s["num_samples"]) for u, s in zip(urls, shards)}


def shard_index(source: str | list[str], split: str) -> dict[str, list[tuple[str, str]]]:
    """{shard url: [(sample key, sha256 of its checksums.json), ...] in shard order}; {} without manifest."""
    if isinstance(source, (list, tuple)):
        return {}
    if not (is_remote(source) or source.endswith(".json") or os.path.exists(join(source, MANIFEST_NAME))):
        return {}
    m, root = load_manifest(source)
    out: dict[str, list[tuple[str, str]]] = {}
    for sh in split_entry(m, split, manifest_url(source))["shards"]:
        out[join(root, sh["name"])] = [(k, d) for k, d in sh["samples"]]
    return out


# ---------------------------------------------------------------------------------------------------------
# per sample
# ---------------------------------------------------------------------------------------------------------


def check_key(sample: dict[str, Any], position: int, index: list[tuple[str, str]] | None) -> None:
    """Check sample number ``position`` of its shard against the manifest's key list; attach the digest.

    Raises:
        ShardReadError: ``<shard>: sample <key> at position <i>: the manifest lists <key'> ...``.
    """
    if index is None:
        return
    url, key = sample.get("__url__", "?"), sample["__key__"]
    if position >= len(index):
        raise ShardReadError(f"{url}: sample {key}: shard holds more than the {len(index)} samples the manifest "
                             "lists")
    want, digest = index[position]
    if key != want:
        raise ShardReadError(f"{url}: sample {key} at position {position}: the manifest lists sample {want} "
                             "there (shard and manifest do not match)")
    sample[DIGEST_KEY] = digest


def verify_sample(fields: dict[str, Any]) -> None:
    """Check every member of a raw sample against its ``checksums.json`` (and that against the manifest).

    Args:
        fields: ``{"__key__", "__url__", [DIGEST_KEY], field: bytes}`` as read from a tar.

    Raises:
        ShardReadError: ``<shard>: sample <key>: member <field>: <problem>``.
    """
    url, key = fields.get("__url__", "?"), fields.get("__key__", "?")
    where = f"{url}: sample {key}"
    record = fields.get(CHECKSUM_FIELD)
    if record is None:
        raise ShardReadError(f"{where}: no member {CHECKSUM_FIELD} (shards of schema version 1, or not written by "
                             f"scripts/build_shards.py); {REBUILD_HINT}")
    digest = fields.get(DIGEST_KEY)
    if digest is not None and hashlib.sha256(record).hexdigest() != digest:
        raise ShardReadError(f"{where}: member {CHECKSUM_FIELD}: sha256 differs from the manifest (damaged shard, "
                             "or a manifest of other shards)")
    try:
        listed = decode_json(record)["members"]
        assert isinstance(listed, dict)
    except Exception as exn:  # noqa: BLE001 - any malformed record is one named error
        raise ShardReadError(f"{where}: member {CHECKSUM_FIELD}: not a checksum record ({exn!r})") from None
    present = {k for k in fields if not k.startswith("__") and k != CHECKSUM_FIELD}
    if present != set(listed):
        raise ShardReadError(f"{where}: members {sorted(present)} but the checksum record lists {sorted(listed)}")
    for name in sorted(present):
        data, want = fields[name], listed[name]
        if len(data) != want.get("bytes") or hashlib.sha256(data).hexdigest() != want.get("sha256"):
            raise ShardReadError(f"{where}: member {name}: checksum mismatch ({len(data)} bytes, recorded "
                                 f"{want.get('bytes')}): the shard is damaged")


# ---------------------------------------------------------------------------------------------------------
# a whole shard set (scripts/verify_shards.py)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ShardResult:
    """Outcome of one shard: its problems (``(sample key or '', problem)``) and what was read."""

    split: str
    name: str
    url: str
    num_samples: int = 0
    bytes: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)


def verify_shard(split: str, entry: dict[str, Any], url: str, decode: Callable[[dict[str, Any]], Any] | None,
                 group: Callable[..., Iterator[dict[str, Any]]]) -> ShardResult:
    """Read one shard completely: whole-file size + sha256, key order, count, every sample's checksums.

    ``group(url, on_bytes)`` yields the raw samples of a tar (:func:`shards.stream._iter_tar_samples`);
    ``decode`` (optional) decodes a verified raw sample fully (JPEG, npy, JSON) and raises on failure.
    """
    res = ShardResult(split, entry["name"], url)
    h = hashlib.sha256()

    def tap(b: bytes) -> None:
        h.update(b)
        res.bytes += len(b)

    index = [(k, d) for k, d in entry.get("samples", [])]
    try:
        for pos, sample in enumerate(group(url, tap)):
            res.num_samples += 1
            try:
                check_key(sample, pos, index)
                verify_sample(sample)
                if decode is not None:
                    decode(sample)
            except ShardReadError as exn:
                res.problems.append((sample["__key__"], _strip(str(exn), url, sample["__key__"])))
    except Exception as exn:  # noqa: BLE001 - a broken tar is a problem of this shard, reported, not raised
        res.problems.append(("", _strip(str(exn), url, None) or type(exn).__name__))
        return res
    if res.num_samples != entry["num_samples"]:
        res.problems.append(("", f"{res.num_samples} samples, the manifest says {entry['num_samples']}"))
    if res.bytes != entry["bytes"]:
        res.problems.append(("", f"{res.bytes} bytes, the manifest says {entry['bytes']}"))
    elif h.hexdigest() != entry["sha256"]:
        res.problems.append(("", "sha256 of the file differs from the manifest"))
    return res


def _strip(msg: str, url: str, key: str | None) -> str:
    for prefix in (f"{url}: sample {key}: ", f"{url}: "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def verify_shard_set(source: str, splits: list[str] | None = None, decode: bool = False,
                     progress: bool = True) -> list[ShardResult]:
    """Verify every shard of ``splits`` (default: all) of a local or remote shard set against its manifest."""
    from tqdm import tqdm

    from shards.stream import _iter_tar_samples

    m, root = load_manifest(source)
    chosen = splits or sorted(m["splits"])
    entries = [(s, sh) for s in chosen for sh in split_entry(m, s, manifest_url(source))["shards"]]
    bar = tqdm(total=sum(sh["bytes"] for _, sh in entries), unit="B", unit_scale=True, disable=not progress,
               desc=f"verify {source}")
    results = []
    try:
        for split, sh in entries:
            res = verify_shard(split, sh, join(root, sh["name"]), decode_sample_members if decode else None,
                               _iter_tar_samples)
            results.append(res)
            bar.update(sh["bytes"])
    finally:
        bar.close()
    return results


def decode_sample_members(fields: dict[str, Any]) -> None:
    """Decode every member of a raw sample (JSON, npy with dtype/shape, the six JPEGs, the stored eval GT with
    its grid record); raise naming it."""
    from shards.evalgt import decode_stored, stored_grid
    from shards.loader import decode_jpeg_rgb
    from shards.schema import CAMERA_FIELDS, decode_arrays

    d = decode_arrays(fields)
    grid = stored_grid(fields, d["meta"])
    if grid is not None:
        decode_stored(fields, grid)
    for fld, data in zip(CAMERA_FIELDS, d["jpegs"]):
        decode_jpeg_rgb(data, f"{fields.get('__url__', '?')}: sample {fields.get('__key__', '?')}: member {fld}")


def summary_table(results: list[ShardResult]) -> str:
    """Per split: shards (bad), samples (bad), MB read; then one line per problem."""
    rows = [("split", "shards", "bad shards", "samples", "bad samples", "MB")]
    for split in sorted({r.split for r in results}):
        rs = [r for r in results if r.split == split]
        bad_samples = {(r.name, k) for r in rs for k, _ in r.problems if k}
        rows.append((split, str(len(rs)), str(sum(bool(r.problems) for r in rs)), str(sum(r.num_samples for r in rs)),
                     str(len(bad_samples)), f"{sum(r.bytes for r in rs) / 1e6:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    problems = [f"BAD {r.url}" + (f": sample {k}" if k else "") + f": {p}" for r in results for k, p in r.problems]
    return "\n".join(lines + problems)
