#!/usr/bin/env python
"""Write a small synthetic nuScenes dataroot (v1.0-mini with lidarseg + v1.0-test), geometrically consistent.

Examples::

    python scripts/make_synthetic_nuscenes.py --out data/nuscenes-synthetic
    python scripts/make_synthetic_nuscenes.py --out /tmp/nusc --seed 1 --samples-per-scene 4

With ``--occ3d`` (the default) it also holds Occ3D-nuScenes-format ground truth in ``OUT/gts/``.
The result opens with ``nuscenes.NuScenes(version="v1.0-mini", dataroot=OUT)`` (and ``v1.0-test``).
Exit status 2 with a message on bad input (for example an existing dataset without ``--overwrite``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shards.synthetic import DEFAULT_MINI_SCENES, DEFAULT_TEST_SCENES, make_synthetic_nuscenes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataroot to create")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    p.add_argument(
        "--samples-per-scene", type=int, default=2, help="keyframes per v1.0-mini scene (default 2)"
    )
    p.add_argument("--test-samples-per-scene", type=int, default=1, help="keyframes per v1.0-test scene")
    p.add_argument(
        "--mini-scenes",
        nargs="+",
        default=list(DEFAULT_MINI_SCENES),
        help="real v1.0-mini scene names (mini_train / mini_val)",
    )
    p.add_argument(
        "--test-scenes",
        nargs="*",
        default=list(DEFAULT_TEST_SCENES),
        help="real test-split scene names (none: no v1.0-test)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing synthetic dataset in --out")
    p.add_argument("--occ3d", action=argparse.BooleanOptionalAction, default=True,
                   help="also write Occ3D-format ground truth to OUT/gts/ (shards/synthetic_occ3d.py; default on)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        root = make_synthetic_nuscenes(
            args.out,
            seed=args.seed,
            samples_per_scene=args.samples_per_scene,
            mini_scenes=tuple(args.mini_scenes),
            test_scenes=tuple(args.test_scenes),
            test_samples_per_scene=args.test_samples_per_scene,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.occ3d:
        from shards.synthetic_occ3d import make_synthetic_occ3d

        try:
            gts = make_synthetic_occ3d(root, seed=args.seed, overwrite=args.overwrite)
        except (FileExistsError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote Occ3D ground truth for {len(gts)} samples to {root / 'gts'}")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote {root} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
