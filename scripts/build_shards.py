#!/usr/bin/env python
"""Convert a nuScenes dataroot to WebDataset tar shards + manifest.json (resumable, parallel).

Examples::

    python scripts/build_shards.py --dataroot data/nuscenes --version v1.0-mini --splits train val \\
        --out data/shards-mini --workers 2 --samples-per-shard 64
    python scripts/build_shards.py --dataroot data/nuscenes --version v1.0-trainval v1.0-test \\
        --splits train val test --out data/shards --workers 16

Re-running the same command after an interruption keeps the finished shards and writes the rest (a shard
whose source files changed is rewritten). Files in --out that this builder did not write are left alone; one
at a name the build must write stops it. Check a finished set with scripts/verify_shards.py.
Exit status 2 with a message naming the file on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shards.reader import DataError, allowed_splits_text
from shards.writer import build_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", required=True, help="nuScenes root folder")
    p.add_argument("--version", nargs="+", required=True,
                   help=f"nuScenes version(s); each split comes from the one providing it ({allowed_splits_text()})")
    p.add_argument("--splits", nargs="+", required=True, help="splits to write, e.g. train val test")
    p.add_argument("--out", required=True, help="output directory for <split>-NNNNNN.tar and manifest.json")
    p.add_argument("--workers", type=int, default=1, help="parallel shard writers (processes)")
    p.add_argument("--samples-per-shard", type=int, default=64, help="keyframes per shard (~1.5 MB each)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip samples with bad files (listed in manifest.json) instead of failing")
    p.add_argument("--verify", choices=("sha256", "size"), default="sha256",
                   help="check of finished shards when resuming")
    p.add_argument("--source-check", choices=("stat", "content"), default="stat",
                   help="how a finished shard's source files are compared on resume: size+mtime, or sha256")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    a = parse_args(argv)
    try:
        m = build_shards(a.dataroot, a.version, a.splits, a.out, workers=a.workers,
                         samples_per_shard=a.samples_per_shard, skip_bad=a.skip_bad, verify=a.verify,
                         progress=not a.no_progress, source_check=a.source_check)
    except DataError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    for name, s in m["splits"].items():
        print(f"{name}: {s['num_samples']} samples in {s['num_shards']} shards, {s['bytes'] / 1e6:.1f} MB "
              f"(source {s['source_bytes'] / 1e6:.1f} MB); scenes present {s['scenes_present']}/"
              f"{s['scenes_listed']} of {s['version']}:{s['nuscenes_split']}"
              + (f"; SKIPPED {s['num_skipped']} bad samples" if s["num_skipped"] else ""))
    print(f"manifest: {os.path.join(a.out, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
