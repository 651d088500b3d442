"""The build's last step: ``manifest.json`` from the plans and the finished shards' entries."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from shards.outdir import FORMAT_NAME, atomic_write_json
from shards.reader import SplitPlan
from shards.schema import MANIFEST_NAME, SCHEMA_VERSION

if TYPE_CHECKING:
    from shards.writer import ShardTask


def write_manifest(plans: dict[str, SplitPlan], tasks: list[ShardTask], done: dict[str, dict[str, Any]],
                   skipped: dict[str, list[dict[str, str]]], out_dir: str, split_version: dict[str, str],
                   samples_per_shard: int, build_id: str,
                   eval_gt_grids: dict[str, dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """Step 4 of :func:`shards.writer.build_shards`: write ``manifest.json`` atomically.

    ``eval_gt_grids``: per split built now, the grid record of its stored evaluation GT (None: not stored),
    written as ``splits.<split>.eval_gt_grid``.

    Splits of earlier runs that this run did not touch are kept as they were. Late skips (samples dropped while writing) join ``skipped``. Returns the manifest written.
    """
    man_path = os.path.join(out_dir, MANIFEST_NAME)
    old_splits: dict[str, Any] = {}
    if os.path.exists(man_path):
        with open(man_path) as f:
            old_splits = json.load(f).get("splits", {})
    split_entries = {k: v for k, v in old_splits.items() if k not in split_version}
    for split in split_version:
        plan = plans[split]
        entries = [done[t.name] for t in tasks if t.split == split]
        shards = [{k: e[k] for k in ("name", "num_samples", "bytes", "sha256", "samples")} for e in entries]
        late_skips = [s for e in entries for s in e["skipped"]]
        late = {s["sample_token"] for s in late_skips}
        skipped[split] = skipped[split] + late_skips
        recs = [r for t in tasks if t.split == split for r in t.records if r.token not in late]
        split_entries[split] = {
            "version": plan.version,
            "nuscenes_split": plan.devkit_split,
            "has_lidarseg": plan.has_lidarseg,
            "eval_gt_grid": (eval_gt_grids or {}).get(split),
            "scenes_listed": plan.scenes_listed,
            "scenes_present": plan.scenes_present,
            "scenes_missing": plan.scenes_missing,
            "samples_per_shard": samples_per_shard,
            "num_samples": sum(s["num_samples"] for s in shards),
            "num_shards": len(shards),
            "bytes": sum(s["bytes"] for s in shards),
            "source_bytes": sum(sum(r.source_sizes) for r in recs),
            "num_skipped": len(skipped[split]),
            "skipped": skipped[split],
            "shards": shards,
        }
    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "splits": {k: split_entries[k] for k in sorted(split_entries)},
        "totals": {
            "num_samples": sum(e["num_samples"] for e in split_entries.values()),
            "num_shards": sum(e["num_shards"] for e in split_entries.values()),
            "bytes": sum(e["bytes"] for e in split_entries.values()),
            "source_bytes": sum(e["source_bytes"] for e in split_entries.values()),
            "num_skipped": sum(e["num_skipped"] for e in split_entries.values()),
        },
    }
    atomic_write_json(man_path, manifest, build_id)
    return manifest
