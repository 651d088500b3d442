#!/usr/bin/env python
"""Val loader samples/s with and without the evaluation ground truth, before and after the vectorised ray
cast, and with the GT stored in the shards (schema 3), side by side in one run (synthetic nuScenes:
full-size images, ~34k LiDAR points per sweep).

Rows (num_workers=0 by default: per-core throughput, no worker start-up in the numbers):

* ``before, no eval GT``: the loader as it was (voxel majority label computed for every sample);
* ``before, eval GT``: computed with the first ray-cast implementation (tests/_raycast_ref.py);
* ``after, no eval GT``: voxel_label skipped without eval GT (training samples);
* ``after, eval GT``: computed with the vectorised ray cast (stored GT ignored);
* ``stored eval GT``: read from the shards (``build_shards.py`` computed it once).

Also: the build's cost of storing it (seconds per val sample, a build with and one without) and the shard
growth (bytes per val sample). The target (issue 10): with eval GT the val loader keeps >= 0.7x its speed
without it.

    python benchmarks/bench_eval_gt.py [--shards DIR] [--workers 0] [--passes 3] [--samples-per-scene 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._loader_rates import (
    computed_eval_gt,
    loader_rate,
    make_synthetic_shards,
    raycast_ms,
    reference_raycast,
    voxel_label_always,
)

TARGET_RATIO = 0.7


#: (row, context managers patched in, eval_gt) in measuring order.
ROWS = (("before, no eval GT", (voxel_label_always,), False),
        ("before, eval GT", (reference_raycast, computed_eval_gt), True),
        ("after, no eval GT", (), False),
        ("after, eval GT", (computed_eval_gt,), True),
        ("stored eval GT", (), True))


def build_cost(work_dir: str, samples_per_scene: int) -> dict:
    """Two builds of the same synthetic data (train + val), the val eval GT stored and not: seconds and bytes
    per val sample; returns them with the stored shard dir (``shards``). The dataroot is made first, untimed."""
    kw = {"samples_per_scene": samples_per_scene}
    make_synthetic_shards(work_dir, eval_gt_splits=[], name="shards_warmup", **kw)  # the dataroot + warm caches
    t0 = time.perf_counter()
    none = make_synthetic_shards(work_dir, eval_gt_splits=[], name="shards_no_gt", **kw)
    t1 = time.perf_counter()
    stored = make_synthetic_shards(work_dir, name="shards", **kw)
    t2 = time.perf_counter()
    with open(os.path.join(none, "manifest.json")) as f:
        v_none = json.load(f)["splits"]["val"]
    with open(os.path.join(stored, "manifest.json")) as f:
        v_stored = json.load(f)["splits"]["val"]
    n = v_stored["num_samples"]
    return {"shards": stored, "val_samples": n, "build_s_none": t1 - t0, "build_s_stored": t2 - t1,
            "seconds_per_val_sample": ((t2 - t1) - (t1 - t0)) / n,
            "val_bytes_none": v_none["bytes"], "val_bytes_stored": v_stored["bytes"],
            "bytes_per_val_sample": (v_stored["bytes"] - v_none["bytes"]) / n,
            "growth_fraction": v_stored["bytes"] / v_none["bytes"] - 1.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="existing shard dir with a val split; default: synthetic, in a temp dir")
    ap.add_argument("--split", default="val")
    ap.add_argument("--samples-per-scene", type=int, default=4, help="synthetic data: keyframes per scene")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--passes", type=int, default=3, help="passes over the split per measurement")
    ap.add_argument("--trials", type=int, default=3, help="measurements per row (best kept; shared machine)")
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
    build = None
    if a.shards is None:
        build = build_cost(tmp.name, a.samples_per_scene)
    shard_dir = a.shards or build["shards"]
    rows = {}
    for _ in range(a.trials):
        for name, patches, eval_gt in ROWS:
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
    rate = {k: v["samples_per_s"] for k, v in rows.items()}
    ratio = {"before": rate["before, eval GT"] / rate["before, no eval GT"],
             "after": rate["after, eval GT"] / rate["after, no eval GT"],
             "stored": rate["stored eval GT"] / rate["after, no eval GT"]}
    print(f"| val loader (workers={a.workers}) | no eval GT samples/s | eval GT samples/s | ratio |")
    print("|---|---|---|---|")
    for when, with_gt, without in (("before (first ray cast)", "before, eval GT", "before, no eval GT"),
                                   ("after (vectorised, computed)", "after, eval GT", "after, no eval GT"),
                                   ("stored eval GT (schema 3)", "stored eval GT", "after, no eval GT")):
        r = ratio[when.split()[0]]
        print(f"| {when} | {rate[without]:.2f} | {rate[with_gt]:.2f} | {r:.2f}x |")
    print(f"\nray cast per sample ({ray['points_per_sample']:.0f} points): reference "
          f"{ray['reference_ms_per_sample']:.0f} ms, vectorised {ray['vectorised_ms_per_sample']:.0f} ms, "
          f"identical output: {ray['identical']}")
    if build:
        print(f"build cost of storing it: {build['seconds_per_val_sample']*1e3:.0f} ms per val sample "
              f"(build {build['build_s_stored']:.1f} s vs {build['build_s_none']:.1f} s without, "
              f"{build['val_samples']} val samples); shards grow by {build['bytes_per_val_sample']:.0f} bytes per "
              f"val sample ({100 * build['growth_fraction']:.1f}% of the val split)")
    print(f"target: eval GT ratio >= {TARGET_RATIO}x -> stored: "
          f"{'met' if ratio['stored'] >= TARGET_RATIO else 'NOT met'}, computed: "
          f"{'met' if ratio['after'] >= TARGET_RATIO else 'NOT met'}")
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
           "shards": "synthetic" if a.shards is None else a.shards, "split": a.split, "workers": a.workers,
           "samples_per_scene": a.samples_per_scene, "passes": a.passes, "trials": a.trials, "rows": rows, "ratio": ratio,
           "target_ratio": TARGET_RATIO, "raycast": ray,
           "build": None if build is None else {k: v for k, v in build.items() if k != "shards"}}
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
