#!/usr/bin/env python
"""A small retrieval benchmark for the synthetic nuScenes, in the ORIGINAL on-disk format (pipeline.md §5).

    python scripts/make_synthetic_retrieval.py --dataroot data/synthetic_nuscenes --out data/synthetic_retrieval

Writes ``retrieval_anns_{train,val,test}.csv`` (``token;split;ann_path;pts_path;query``, no header) and
``annotations/<token>__retrieval.npy`` (bool, one value per keyframe LiDAR point, row order of the
``.pcd.bin``). Each keyframe gets one query: the name of a class present in its LiDAR sweep (object classes
first, rotating over the samples so several queries occur); its relevant points are the points with that
class's raw lidarseg ids.

train/val come from ``v1.0-mini`` (lidarseg). The test split has no lidarseg (as in nuScenes): its relevance
is derived from the synthetic scene objects by regenerating the test scenes WITH lidarseg (same seed, same
scene names; the generator is deterministic), and it is used only if the regenerated sweeps equal the
dataset's byte for byte; otherwise the benchmark is restricted to train/val and the reason is printed.
``benchmark_info.json`` records what was done.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

#: Query text -> raw lidarseg ids, in order of preference (objects first, then stuff).
QUERY_CLASSES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("car", (17,)),
    ("truck", (23,)),
    ("bus", (15, 16)),
    ("pedestrian", (2, 3, 4, 6)),
    ("traffic cone", (12,)),
    ("barrier", (9,)),
    ("bicycle", (14,)),
    ("motorcycle", (21,)),
    ("trailer", (22,)),
    ("construction vehicle", (18,)),
    ("tree", (30,)),
    ("building", (28,)),
    ("sidewalk", (26,)),
    ("grass", (27,)),
)
OBJECT_QUERIES = 10  # the first 10 entries are objects
PCD_COLUMNS = 5


def _table(root: Path, version: str, name: str) -> list[dict]:
    path = root / version / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nuScenes table not found")
    return json.loads(path.read_text())


def keyframes(root: Path, version: str) -> list[dict]:
    """Keyframes of a version in scene-table order, then time order: dicts with token, scene name, scene
    index, index in the scene, LiDAR file name, lidarseg file (or None) and camera image size (H, W)."""
    scenes = _table(root, version, "scene")
    samples = {s["token"]: s for s in _table(root, version, "sample")}
    sample_data = _table(root, version, "sample_data")
    lidar = {sd["sample_token"]: sd for sd in sample_data if sd["is_key_frame"] and "/LIDAR_TOP/" in sd["filename"]}
    cam_hw = {sd["sample_token"]: (sd["height"], sd["width"]) for sd in sample_data if sd.get("height")}
    seg_path = root / version / "lidarseg.json"
    seg = {r["sample_data_token"]: r["filename"] for r in json.loads(seg_path.read_text())} \
        if seg_path.is_file() else {}
    out = []
    for s_idx, scene in enumerate(scenes):
        tok, k = scene["first_sample_token"], 0
        while tok:
            sd = lidar[tok]
            out.append({"token": tok, "scene": scene["name"], "scene_index": s_idx, "index": k,
                        "description": scene.get("description", ""), "lidar": sd["filename"],
                        "lidarseg": seg.get(sd["token"]), "hw": cam_hw.get(tok)})
            tok, k = samples[tok]["next"], k + 1
    return out


def split_of_scenes(version: str) -> dict[str, str]:
    """Scene name -> our split name, from the devkit's scene lists (as the shard builder assigns them)."""
    from nuscenes.utils.splits import create_splits_scenes

    from shards.reader import SPLITS_BY_VERSION

    lists = create_splits_scenes()
    return {name: ours for ours, dk in SPLITS_BY_VERSION[version].items() for name in lists[dk]}


def read_points(root: Path, rel: str) -> np.ndarray:
    raw = np.fromfile(root / rel, dtype=np.float32)
    if raw.size % PCD_COLUMNS:
        raise ValueError(f"{root / rel}: size is not a multiple of {PCD_COLUMNS} float32")
    return raw.reshape(-1, PCD_COLUMNS)


def choose_query(labels: np.ndarray, rotation: int, min_points: int) -> tuple[str, np.ndarray] | None:
    """A query for a sweep: object classes with >= min_points points first (the rotation-th of them), else
    stuff classes. Returns (query, relevant bool (N,)) or None."""
    present = [(q, np.isin(labels, ids)) for q, ids in QUERY_CLASSES]
    present = [(i, q, rel) for i, (q, rel) in enumerate(present) if int(rel.sum()) >= min_points]
    objects = [p for p in present if p[0] < OBJECT_QUERIES]
    pool = objects or present
    if not pool:
        return None
    _, q, rel = pool[rotation % len(pool)]
    return q, rel


def test_relevance(root: Path, frames: list[dict]) -> tuple[dict[str, np.ndarray] | None, str]:
    """Raw lidarseg ids of the test keyframes, by regenerating the test scenes with lidarseg.

    Returns ({token: uint8 (N,)}, note) or (None, reason).
    """
    from shards.synthetic import make_synthetic_nuscenes

    if not frames:
        return None, "the dataroot has no v1.0-test keyframes"
    seeds = {re.search(r"seed (\d+)", f["description"]) for f in frames}
    if None in seeds:
        return None, "the test scenes do not carry the synthetic generator's seed in their description"
    seed_values = {int(m.group(1)) for m in seeds}
    per_scene: dict[int, int] = {}
    for f in frames:
        per_scene[f["scene_index"]] = per_scene.get(f["scene_index"], 0) + 1
    if len(seed_values) != 1 or len(set(per_scene.values())) != 1:
        return None, "the test scenes differ in seed or keyframe count"
    names = tuple(dict.fromkeys(f["scene"] for f in frames))
    hw = frames[0]["hw"]
    with tempfile.TemporaryDirectory(prefix="synthetic_test_regen_") as tmp:
        regen = make_synthetic_nuscenes(tmp, seed=seed_values.pop(), samples_per_scene=next(iter(per_scene.values())),
                                        mini_scenes=names, test_scenes=(), img_hw=tuple(hw))
        again = keyframes(regen, "v1.0-mini")
        if len(again) != len(frames):
            return None, f"regeneration gave {len(again)} keyframes for {len(frames)}"
        out = {}
        for f, g in zip(frames, again):
            if not np.array_equal(read_points(root, f["lidar"]), read_points(regen, g["lidar"])):
                return None, (f"the regenerated sweep of test sample {f['token']} differs from {f['lidar']} "
                              "(dataset made with non-default generator options?)")
            out[f["token"]] = np.fromfile(regen / g["lidarseg"], dtype=np.uint8)
    return out, "test relevance derived from the regenerated synthetic scene objects (sweeps verified equal)"


def make_benchmark(dataroot: str | Path, out: str | Path, min_points: int = 10) -> dict:
    """Write the benchmark; returns the info dict (also written as ``benchmark_info.json``)."""
    root, out = Path(dataroot), Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    info: dict = {"dataroot": str(root), "min_points": min_points, "notes": []}
    rotation = 0

    def add(frame: dict, split: str, labels: np.ndarray) -> None:
        nonlocal rotation
        n = read_points(root, frame["lidar"]).shape[0]
        if labels.shape != (n,):
            raise ValueError(f"sample {frame['token']}: {labels.shape[0]} labels for {n} points")
        chosen = choose_query(labels, rotation, min_points)
        rotation += 1
        if chosen is None:
            info["notes"].append(f"{frame['token']}: no class with >= {min_points} points; not in the benchmark")
            return
        query, rel = chosen
        ann = f"annotations/{frame['token']}__retrieval.npy"
        np.save(out / ann, rel.astype(bool), allow_pickle=False)
        rows[split].append(f"{frame['token']};{split};{ann};{frame['lidar']};{query}")

    if (root / "v1.0-mini").is_dir():
        splits = split_of_scenes("v1.0-mini")
        for f in keyframes(root, "v1.0-mini"):
            if f["lidarseg"] is None:
                raise FileNotFoundError(f"{root / 'v1.0-mini'}: keyframe {f['token']} has no lidarseg record")
            add(f, splits[f["scene"]], np.fromfile(root / f["lidarseg"], dtype=np.uint8))
    else:
        info["notes"].append("no v1.0-mini: no train/val samples")
    test_frames = keyframes(root, "v1.0-test") if (root / "v1.0-test").is_dir() else []
    labels, note = test_relevance(root, test_frames)
    info["notes"].append(note if labels is not None else f"test split left out: {note}; the benchmark is "
                         "restricted to train/val")
    if labels is not None:
        splits = split_of_scenes("v1.0-test")
        for f in test_frames:
            add(f, splits[f["scene"]], labels[f["token"]])
    for split, lines in rows.items():
        (out / f"retrieval_anns_{split}.csv").write_text("".join(line + "\n" for line in lines))
    info["samples"] = {s: len(v) for s, v in rows.items()}
    info["queries"] = sorted({line.rsplit(";", 1)[1] for v in rows.values() for line in v})
    (out / "benchmark_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataroot", required=True, type=Path, help="synthetic nuScenes (make_synthetic_nuscenes.py)")
    ap.add_argument("--out", required=True, type=Path, help="benchmark folder to write")
    ap.add_argument("--min-points", type=int, default=10, help="fewest relevant points for a query class")
    args = ap.parse_args(argv)
    info = make_benchmark(args.dataroot, args.out, args.min_points)
    print(f"wrote {args.out}: {info['samples']} samples, queries {info['queries']}")
    for note in info["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
