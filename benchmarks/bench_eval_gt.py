#!/usr/bin/env python
"""Val loader samples/s with and without the evaluation ground truth, before and after the vectorised ray
cast, side by side in one run (synthetic nuScenes: full-size images, ~34k LiDAR points per sweep).

Rows (num_workers=0 by default: per-core throughput, no worker start-up in the numbers):

* ``before, no eval GT``: the loader as it was (voxel majority label computed for every sample);
* ``before, eval GT``: with the first ray-cast implementation (tests/_raycast_ref.py);
* ``after, no eval GT``: voxel_label skipped without eval GT (training samples);
* ``after, eval GT``: the vectorised ray cast.

The target (issue 10): with eval GT the val loader keeps >= 0.7x its speed without it.

    python benchmarks/bench_eval_gt.py [--shards DIR] [--workers 0] [--passes 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._loader_rates import (
    loader_rate,
    make_synthetic_shards,
    raycast_ms,
    reference_raycast,
    voxel_label_always,
)

TARGET_RATIO = 0.7


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="existing shard dir with a val split; default: synthetic, in a temp dir")
    ap.add_argument("--split", default="val")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--passes", type=int, default=2, help="passes over the split per measurement")
    ap.add_argument("--trials", type=int, default=2, help="measurements per row (best kept; shared machine)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "eval_gt_loading.json"))
    a = ap.parse_args(argv)
    if a.workers > 0:
        import multiprocessing as mp
        if mp.get_start_method(allow_none=True) not in (None, "fork"):
            print("--workers > 0 needs the fork start method (the 'before' rows patch the loader in this "
                  "process)", file=sys.stderr)
            return 2
        mp.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="bench_eval_gt_")
    shard_dir = a.shards or make_synthetic_shards(tmp.name)
    rows = {}
    for _ in range(a.trials):
        for name, patches, eval_gt in (("before, no eval GT", (voxel_label_always,), False),
                                       ("before, eval GT", (reference_raycast,), True),
                                       ("after, no eval GT", (), False),
                                       ("after, eval GT", (), True)):
            ctx = [p() for p in patches]
            for c in ctx:
                c.__enter__()
            try:
                r = loader_rate(shard_dir, a.split, eval_gt, a.workers, a.passes)
            finally:
                for c in reversed(ctx):
                    c.__exit__(None, None, None)
            if name not in rows or r["samples_per_s"] > rows[name]["samples_per_s"]:
                rows[name] = r
    ray = raycast_ms(shard_dir, a.split)
    ratio_before = rows["before, eval GT"]["samples_per_s"] / rows["before, no eval GT"]["samples_per_s"]
    ratio_after = rows["after, eval GT"]["samples_per_s"] / rows["after, no eval GT"]["samples_per_s"]
    print(f"| val loader (workers={a.workers}) | no eval GT samples/s | eval GT samples/s | ratio |")
    print("|---|---|---|---|")
    for when, ratio in (("before", ratio_before), ("after", ratio_after)):
        print(f"| {when} | {rows[f'{when}, no eval GT']['samples_per_s']:.2f} | "
              f"{rows[f'{when}, eval GT']['samples_per_s']:.2f} | {ratio:.2f}x |")
    print(f"\nray cast per sample ({ray['points_per_sample']:.0f} points): reference "
          f"{ray['reference_ms_per_sample']:.0f} ms, vectorised {ray['vectorised_ms_per_sample']:.0f} ms, "
          f"identical output: {ray['identical']}")
    print(f"target: eval GT ratio >= {TARGET_RATIO}x -> {'met' if ratio_after >= TARGET_RATIO else 'NOT met'}")
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
           "shards": "synthetic" if a.shards is None else a.shards, "split": a.split, "workers": a.workers,
           "passes": a.passes, "trials": a.trials, "rows": rows, "ratio": {"before": ratio_before,
                                                                          "after": ratio_after},
           "target_ratio": TARGET_RATIO, "raycast": ray}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp_out = a.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(out, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_out, a.out)
    print(f"wrote {a.out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
