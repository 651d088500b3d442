#!/usr/bin/env python
"""Check a whole shard set against its manifest: every shard's size and sha256, every sample's checksums.

    python scripts/verify_shards.py data/shards
    python scripts/verify_shards.py http://host/shards --splits val --decode

Prints a progress bar, a summary table per split and one line per damaged shard or sample
(``BAD <shard>: sample <key>: member <field>: <problem>``). Exit status: 0 intact, 1 damage found (all of it
listed), 2 the manifest cannot be read (named). ``--decode`` also decodes every JPEG / npy / JSON member.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shards.errors import DATA_ERRORS, one_line
from shards.verify import summary_table, verify_shard_set


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="shard folder, its URL (http(s)://, s3://, ...) or pipe:... {name}")
    p.add_argument("--splits", nargs="+", help="splits to check (default: all in the manifest)")
    p.add_argument("--decode", action="store_true", help="also decode every member (JPEG, npy, JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        results = verify_shard_set(a.source, a.splits, decode=a.decode, progress=not a.no_progress)
    except DATA_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(summary_table(results))
    bad = [r for r in results if r.problems]
    n_samples = sum(r.num_samples for r in results)
    if bad:
        print(f"DAMAGED: {len(bad)} of {len(results)} shards ({sum(len(r.problems) for r in bad)} problems)")
        return 1
    print(f"OK: {len(results)} shards, {n_samples} samples match the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
