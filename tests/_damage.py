"""Ways to damage a copy of a shard set, for the integrity tests (independent of shards/ code: tarfile,
hashlib and json only)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

CHECKSUMS = "checksums.json"

#: case -> (member damaged or None, what is done)
CASES = {
    "garbage_jpeg": "cam_front.jpg",
    "truncated_npy": "lidar.npy",
    "garbage_json": "meta.json",
    "flipped_byte": "lidar.npy",
    "missing_shard": None,
    "manifest_mismatch": None,
}


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tf:
        return [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]


def first_key(path: Path) -> str:
    return _members(path)[0][0].name.split(".")[0]


def rewrite_member(path: Path, key: str, field: str, data: bytes, fix_checksums: bool) -> None:
    """Replace member ``key.field`` by ``data`` in a well-formed tar (optionally with a matching checksum record)."""
    members = _members(path)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, payload in members:
            name = ti.name
            if name == f"{key}.{field}":
                payload = data
            elif fix_checksums and name == f"{key}.{CHECKSUMS}":
                rec = json.loads(payload)
                rec["members"][field] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                payload = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
    path.write_bytes(out.getvalue())
    if fix_checksums:  # the manifest's digest of the new record too: a consistent, but undecodable sample
        man_path = path.parent / "manifest.json"
        man = json.loads(man_path.read_text())
        record = next(p for ti, p in _members(path) if ti.name == f"{key}.{CHECKSUMS}")
        for e in man["splits"].values():
            for sh in e["shards"]:
                if sh["name"] == path.name:
                    sh["samples"] = [[k, hashlib.sha256(record).hexdigest() if k == key else d]
                                     for k, d in sh["samples"]]
                    sh["bytes"] = path.stat().st_size
                    sh["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        man_path.write_text(json.dumps(man))


def flip_byte(path: Path, key: str, field: str, at: int = 200) -> None:
    """Flip one byte of a member's data in place: the tar stays well-formed (headers untouched)."""
    with tarfile.open(path) as tf:
        ti = tf.getmember(f"{key}.{field}")
    data = bytearray(path.read_bytes())
    data[ti.offset_data + min(at, ti.size - 1)] ^= 0xFF
    path.write_bytes(bytes(data))


def damage(shard: Path, case: str, consistent: bool = False) -> tuple[str, str | None]:
    """Damage ``shard`` (a copy) as ``case``; returns (key named by the error or '', member or None)."""
    key = first_key(shard)
    field = CASES[case]
    if case == "garbage_jpeg":
        rewrite_member(shard, key, field, b"\xff\xd8\xff\xe0 this is not a jpeg" * 20, consistent)
    elif case == "truncated_npy":
        npy = next(p for ti, p in _members(shard) if ti.name == f"{key}.{field}")
        rewrite_member(shard, key, field, npy[: len(npy) // 2], consistent)
    elif case == "garbage_json":
        rewrite_member(shard, key, field, b"{not json at all", consistent)
    elif case == "flipped_byte":
        flip_byte(shard, key, field)
    elif case == "missing_shard":
        shard.unlink()
        return "", None
    elif case == "manifest_mismatch":  # the manifest lists another sample order for this shard
        man_path = shard.parent / "manifest.json"
        man = json.loads(man_path.read_text())
        for e in man["splits"].values():
            for sh in e["shards"]:
                if sh["name"] == shard.name:
                    sh["samples"] = sh["samples"][::-1]
        man_path.write_text(json.dumps(man))
        return key, None
    return key, field
