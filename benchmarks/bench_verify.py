#!/usr/bin/env python
"""Cost of per-sample verification next to the decode it guards, and of the schema-2 manifest at full size.

    python benchmarks/bench_verify.py [--shards DIR] [--repeat 20]

Builds the synthetic shards when no --shards is given. Prints a table and writes
benchmarks/results/bench_verify.json. Rows: verify_sample (sha256 of every member, the record against the
manifest digest), decode of the six JPEGs + npy (the loader's next step), a full-size manifest
(40,000 samples in 625 shards of 64: bytes and json.loads time).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard folder (default: build the synthetic set in a temp folder)")
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args(argv)

    from shards.loader import decode_jpeg_rgb, list_shards, shard_index
    from shards.stream import _iter_tar_samples
    from shards.schema import CAMERA_FIELDS, decode_arrays
    from shards.verify import check_key, verify_sample

    source = a.shards
    if source is None:
        from shards.synthetic import make_synthetic_nuscenes
        from shards.writer import build_shards

        tmp = tempfile.mkdtemp(prefix="bench_verify_")
        root = make_synthetic_nuscenes(Path(tmp) / "nuscenes")
        source = os.path.join(tmp, "shards")
        build_shards(str(root), ["v1.0-mini"], ["val"], source, samples_per_shard=2, progress=False)
    url = list_shards(source, "val")[0][0]
    raw = next(_iter_tar_samples(url))
    check_key(raw, 0, shard_index(source, "val")[url])
    nbytes = sum(len(v) for k, v in raw.items() if not k.startswith("__"))

    def decode() -> None:
        decode_arrays(raw)
        for f in CAMERA_FIELDS:
            decode_jpeg_rgb(raw[f])

    t_verify = _time(lambda: verify_sample(raw), a.repeat)
    t_sha = _time(lambda: hashlib.sha256(b"".join(v for k, v in raw.items() if not k.startswith("__"))).digest(),
                  a.repeat)
    t_decode = _time(decode, max(3, a.repeat // 4))

    n, per = 40000, 64
    man = {"splits": {"train": {"shards": [
        {"name": f"train-{i:06d}.tar", "num_samples": per, "bytes": 0, "sha256": "0" * 64,
         "samples": [[hashlib.md5(f"{i}/{j}".encode()).hexdigest(), hashlib.sha256(f"{i}/{j}".encode()).hexdigest()]
                     for j in range(per)]} for i in range(n // per)]}}}
    text = json.dumps(man, indent=1, sort_keys=True)
    t_parse = _time(lambda: json.loads(text), 3)

    rows = [
        ("sample bytes (MB)", f"{nbytes / 1e6:.2f}"),
        ("verify_sample (ms)", f"{t_verify * 1e3:.2f}"),
        ("  of which plain sha256 of the bytes (ms)", f"{t_sha * 1e3:.2f}"),
        ("decode 6 JPEG + npy (ms)", f"{t_decode * 1e3:.1f}"),
        ("verify / decode", f"{t_verify / t_decode:.3f}"),
        ("manifest, 40k samples (MB)", f"{len(text) / 1e6:.1f}"),
        ("manifest json.loads (ms)", f"{t_parse * 1e3:.0f}"),
    ]
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"{k.ljust(w)}  {v}" for k, v in rows))
    out = Path(__file__).resolve().parent / "results" / "bench_verify.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"sample_bytes": nbytes, "verify_ms": t_verify * 1e3, "sha256_ms": t_sha * 1e3,
                               "decode_ms": t_decode * 1e3, "manifest_40k_bytes": len(text),
                               "manifest_40k_parse_ms": t_parse * 1e3, "machine": "2-core CPU, shared"}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
