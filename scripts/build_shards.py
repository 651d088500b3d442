#!/usr/bin/env python
"""Convert a nuScenes dataroot to WebDataset tar shards + manifest.json (resumable, parallel).

Examples::

    python scripts/build_shards.py --dataroot data/nuscenes --version v1.0-mini --splits train val \\
        --out data/shards-mini --workers 2 --samples-per-shard 64
    python scripts/build_shards.py --dataroot data/nuscenes --version v1.0-trainval v1.0-test \\
        --splits train val test --out data/shards --workers 16

The evaluation ground truth (ray-cast eval GT + voxel majority label) of the --eval-gt-splits (default: val)
is computed once here for --eval-gt-grid over --eval-gt-range (default: the paper's 100x100x8 over
[-51.2, -51.2, -5, 51.2, 51.2, 3]) and stored in the shards; the loader reads it for exactly that grid and
computes it on the fly (slower, one log line) for any other. Pass the grid of the config you evaluate,
e.g. configs/tiny.yaml: --eval-gt-grid 25 25 4.

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

from shards.evalgt import PAPER_GRID
from shards.geometry import GridSpec
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
    p.add_argument("--eval-gt-splits", nargs="*", default=None, metavar="SPLIT",
                   help="splits (with lidarseg) whose evaluation GT is computed once and stored; default: val "
                        "when built; give the flag alone to store none")
    p.add_argument("--eval-gt-grid", nargs=3, type=int, default=list(PAPER_GRID.size), metavar=("X", "Y", "Z"),
                   help="voxels per axis of the stored evaluation GT (the config's tpv_w tpv_h tpv_z); "
                        "default 100 100 8")
    p.add_argument("--eval-gt-range", nargs=6, type=float, default=[*PAPER_GRID.pc_min, *PAPER_GRID.pc_max],
                   metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
                   help="volume of the stored evaluation GT in metres (the config's pc_range); default "
                        "-51.2 -51.2 -5 51.2 51.2 3")
    p.add_argument("--overwrite", action="store_true",
                   help="first delete an earlier build's shards, records and manifest in --out (of any schema "
                        "version; other files stay), then build")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def eval_gt_grid(a: argparse.Namespace) -> GridSpec:
    """The grid of --eval-gt-grid / --eval-gt-range (DataError naming the flags when it is not a volume)."""
    try:
        return GridSpec(pc_min=tuple(a.eval_gt_range[:3]), pc_max=tuple(a.eval_gt_range[3:]),
                        size=tuple(a.eval_gt_grid))
    except ValueError:
        raise DataError(f"--eval-gt-grid {a.eval_gt_grid} --eval-gt-range {a.eval_gt_range}: need voxel counts "
                        "> 0 and each max > its min") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    a = parse_args(argv)
    try:
        m = build_shards(a.dataroot, a.version, a.splits, a.out, workers=a.workers,
                         samples_per_shard=a.samples_per_shard, skip_bad=a.skip_bad, verify=a.verify,
                         progress=not a.no_progress, source_check=a.source_check,
                         eval_gt_splits=a.eval_gt_splits, eval_gt_grid=eval_gt_grid(a), overwrite=a.overwrite)
    except DataError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    for name, s in m["splits"].items():
        print(f"{name}: {s['num_samples']} samples in {s['num_shards']} shards, {s['bytes'] / 1e6:.1f} MB "
              f"(source {s['source_bytes'] / 1e6:.1f} MB); scenes present {s['scenes_present']}/"
              f"{s['scenes_listed']} of {s['version']}:{s['nuscenes_split']}"
              + (f"; eval GT stored for {'x'.join(str(v) for v in s['eval_gt_grid']['size'])}"
                 if s.get("eval_gt_grid") else "")
              + (f"; SKIPPED {s['num_skipped']} bad samples" if s["num_skipped"] else ""))
    print(f"manifest: {os.path.join(a.out, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
