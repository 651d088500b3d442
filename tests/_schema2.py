"""A schema-2 copy of a schema-3 shard set, written with tarfile/hashlib/json only (independent of shards/ code):
what an older builder wrote, for the tests that old shards still load and are refused / rebuilt where they must."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

#: Members schema 3 added (a schema-2 sample has none of them).
SCHEMA3_MEMBERS = ("eval_gt.npy", "voxel_label.npy", "lidar2ego.npy")


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """(tar header, payload) of every member of a tar, in order."""
    with tarfile.open(path) as tf:
        return [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]


def write_v2_copy(src: str, out: Path, splits=("val",)) -> Path:
    """A schema-2 shard set of ``src``'s ``splits``: no stored GT or lidar2ego members, meta without eval_gt_grid,
    checksum records, manifest digests, sizes and sha256 rewritten."""
    out.mkdir(parents=True)
    man = json.loads(Path(src, "manifest.json").read_text())
    man["schema_version"] = 2
    man["splits"] = {s: man["splits"][s] for s in splits}
    for entry in man["splits"].values():
        entry.pop("eval_gt_grid", None)
        for sh in entry["shards"]:
            buf, index, records = io.BytesIO(), [], {}
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for ti, data in members(Path(src, sh["name"])):
                    key, _, field = ti.name.partition(".")
                    if field in SCHEMA3_MEMBERS:
                        continue
                    if field == "meta.json":
                        meta = json.loads(data)
                        meta.pop("eval_gt_grid")
                        meta["schema_version"] = 2
                        data = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
                    if field == "checksums.json":
                        data = json.dumps({"members": records.pop(key)}, sort_keys=True, separators=(",", ":")).encode()
                        index.append([key, hashlib.sha256(data).hexdigest()])
                    else:
                        records.setdefault(key, {})[field] = {"bytes": len(data),
                                                              "sha256": hashlib.sha256(data).hexdigest()}
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
            Path(out, sh["name"]).write_bytes(buf.getvalue())
            sh.update(samples=index, bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    Path(out, "manifest.json").write_text(json.dumps(man))
    return out
