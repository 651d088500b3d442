#!/usr/bin/env python
"""Write a small synthetic nuScenes dataroot (v1.0-mini with lidarseg + v1.0-test), geometrically consistent.

Examples::

    python scripts/make_synthetic_nuscenes.py --out data/nuscenes-synthetic
    python scripts/make_synthetic_nuscenes.py --out /tmp/nusc --seed 1 --samples-per-scene 4

With ``--occ3d`` (the default) it also holds Occ3D-nuScenes-format ground truth in ``OUT/gts/``.
The result opens with ``nuscenes.NuScenes(version="v1.0-mini", dataroot=OUT)`` (and ``v1.0-test``).
Run again with the same arguments, it reuses the dataset it wrote (says "reusing"; ``--overwrite``
regenerates it). It never overwrites a folder it did not write. Exit status 2 with a one-line message on bad
input (other arguments than the existing dataset's, a changed file, a folder holding other data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

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
    p.add_argument("--overwrite", action="store_true",
                   help="regenerate the synthetic dataset this script wrote in --out")
    p.add_argument("--occ3d", action=argparse.BooleanOptionalAction, default=True,
                   help="also write Occ3D-format ground truth to OUT/gts/ (shards/synthetic_occ3d.py; default on)")
    return p.parse_args(argv)


MARKER = "synthetic_nuscenes.json"
"""Written into --out by this script: the arguments and every file it wrote (relative path -> bytes)."""


def _wanted(args: argparse.Namespace) -> dict:
    return {"seed": args.seed, "samples_per_scene": args.samples_per_scene,
            "test_samples_per_scene": args.test_samples_per_scene, "mini_scenes": list(args.mini_scenes),
            "test_scenes": list(args.test_scenes), "occ3d": args.occ3d}


def _write_marker(root: Path, arguments: dict, files: dict | None) -> None:
    from p3d_common.atomic import atomic_path

    with atomic_path(root / MARKER) as tmp:
        tmp.write_text(json.dumps({"arguments": arguments, "complete": files is not None,
                                   "files": files or {}}, indent=1) + "\n")


def _plan(root: Path, args: argparse.Namespace) -> str:
    """'new' (a new or empty folder), 'regenerate' (a dataset this script wrote: --overwrite, or an interrupted
    run) or 'reuse' (intact, same arguments). Raises ValueError saying what to do otherwise."""
    marker = root / MARKER
    if not marker.is_file():
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ValueError(f"{root} holds files this script did not write (no {MARKER}); choose a new or empty "
                             "--out")
        return "new"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        if args.overwrite:
            return "regenerate"
        raise ValueError(f"{marker}: unreadable ({exc}); pass --overwrite to regenerate {root}") from exc
    if args.overwrite or not info.get("complete"):
        return "regenerate"
    if info.get("arguments") != _wanted(args):
        raise ValueError(f"{root} holds a synthetic dataset made with other arguments ({info.get('arguments')}); "
                         "pass --overwrite to regenerate it, or choose another --out")
    for rel, size in info.get("files", {}).items():
        f = root / rel
        if not f.is_file() or f.stat().st_size != size:
            raise ValueError(f"{f}: missing or changed since this script wrote it; pass --overwrite to regenerate "
                             f"{root}")
    return "reuse"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    root = Path(args.out)
    t0 = time.perf_counter()
    try:
        plan = _plan(root, args)
        if plan == "reuse":
            print(f"reusing {root}: the synthetic dataset this script wrote with the same arguments "
                  "(--overwrite regenerates it)")
            return 0
        if plan == "regenerate":
            print(f"regenerating the synthetic dataset in {root}")
        root.mkdir(parents=True, exist_ok=True)
        _write_marker(root, _wanted(args), None)  # ours from now on: an interrupted run is regenerated next time
        root = make_synthetic_nuscenes(
            args.out,
            seed=args.seed,
            samples_per_scene=args.samples_per_scene,
            mini_scenes=tuple(args.mini_scenes),
            test_scenes=tuple(args.test_scenes),
            test_samples_per_scene=args.test_samples_per_scene,
            overwrite=plan == "regenerate",
        )
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.occ3d:
        from shards.synthetic_occ3d import make_synthetic_occ3d

        try:
            gts = make_synthetic_occ3d(root, seed=args.seed, overwrite=plan == "regenerate")
        except (FileExistsError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote Occ3D ground truth for {len(gts)} samples to {root / 'gts'}")
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != MARKER}
    _write_marker(root, _wanted(args), files)
    print(f"wrote {root} ({sum(files.values()) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
