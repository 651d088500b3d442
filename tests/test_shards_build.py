"""Shard writer: round trip against the source files and the devkit, determinism, resume after SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from shards.schema import (
    CAMERA_FIELDS,
    CHECKSUM_FIELD,
    EVAL_GT_FIELD,
    INTRINSIC_FIELD,
    LIDAR2CAM_FIELD,
    LIDAR2EGO_FIELD,
    LIDAR_FIELD,
    LIDARSEG_FIELD,
    META_FIELD,
    SCHEMA_VERSION,
    VOXEL_LABEL_FIELD,
    decode_json,
    decode_npy,
)
from shards.writer import build_shards

REPO = Path(__file__).resolve().parents[1]
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")


def read_tar(path: str) -> tuple[list[str], dict[str, dict[str, bytes]]]:
    """(member names in order, {key: {field: bytes}})."""
    names: list[str] = []
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for ti in tf:
            names.append(ti.name)
            key, _, fld = ti.name.partition(".")
            samples.setdefault(key, {})[fld] = tf.extractfile(ti).read()
    return names, samples


def load_manifest(d: str) -> dict:
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)


def build_args(manifest: dict) -> tuple[list[str], list[str], int]:
    """(versions, splits, samples_per_shard) that produced ``manifest``."""
    splits = sorted(manifest["splits"])
    versions = sorted({manifest["splits"][s]["version"] for s in splits})
    return versions, splits, manifest["splits"][splits[0]]["samples_per_shard"]


def devkit_transform(rec: dict, inverse: bool = False) -> np.ndarray:
    """The devkit's 4x4 of a calibrated_sensor / ego_pose record (pyquaternion for the rotation)."""
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion

    return transform_matrix(rec["translation"], Quaternion(rec["rotation"]), inverse=inverse)


def devkit_lidar2cam(nusc, lidar_sd: dict, cam_sd: dict) -> np.ndarray:
    """LiDAR -> camera with the devkit's own helpers (map_pointcloud_to_image's chain), float64."""
    tm = devkit_transform
    return (
        tm(nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"]), True)
        @ tm(nusc.get("ego_pose", cam_sd["ego_pose_token"]), True)
        @ tm(nusc.get("ego_pose", lidar_sd["ego_pose_token"]), False)
        @ tm(nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"]), False)
    )


def test_manifest_describes_the_files(shard_root: str, synthetic_root) -> None:
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.splits import create_splits_scenes

    m = load_manifest(shard_root)
    assert m["schema_version"] == SCHEMA_VERSION
    assert set(m["splits"]) == {"train", "val", "test"}
    lists = create_splits_scenes()
    for split, entry in m["splits"].items():
        nusc = NuScenes(entry["version"], str(synthetic_root), verbose=False)
        listed = lists[entry["nuscenes_split"]]
        present = [s for s in nusc.scene if s["name"] in listed]
        assert entry["scenes_listed"] == len(listed)
        assert entry["scenes_present"] == len(present) > 0
        assert entry["scenes_missing"] == len(listed) - len(present)
        assert entry["num_samples"] == sum(s["nbr_samples"] for s in present)
        assert entry["has_lidarseg"] == (split != "test")
        assert entry["num_skipped"] == 0
        for i, sh in enumerate(entry["shards"]):
            path = os.path.join(shard_root, sh["name"])
            assert sh["name"] == f"{split}-{i:06d}.tar"
            assert os.path.getsize(path) == sh["bytes"]
            assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sh["sha256"]
        assert sum(sh["num_samples"] for sh in entry["shards"]) == entry["num_samples"]
    assert m["totals"]["num_samples"] == sum(e["num_samples"] for e in m["splits"].values())


@pytest.mark.parametrize("split", ["val", "test"])
def test_round_trip_against_source_files_and_devkit(shard_root: str, synthetic_root, split: str) -> None:
    from nuscenes.nuscenes import NuScenes

    m = load_manifest(shard_root)
    entry = m["splits"][split]
    root = str(synthetic_root)
    nusc = NuScenes(entry["version"], root, verbose=False)
    seen = 0
    for sh in entry["shards"]:
        names, samples = read_tar(os.path.join(shard_root, sh["name"]))
        # fixed member order, no extra dots in keys
        expected_fields = [META_FIELD, *CAMERA_FIELDS, LIDAR_FIELD]
        expected_fields += [LIDARSEG_FIELD] if entry["has_lidarseg"] else []
        expected_fields += [INTRINSIC_FIELD, LIDAR2CAM_FIELD, LIDAR2EGO_FIELD]
        # the eval GT is stored by default for val (the paper grid), recorded in the manifest
        paper = {"pc_min": [-51.2, -51.2, -5.0], "pc_max": [51.2, 51.2, 3.0], "size": [100, 100, 8]}
        assert entry["eval_gt_grid"] == (paper if split == "val" else None)
        expected_fields += [EVAL_GT_FIELD, VOXEL_LABEL_FIELD] if split == "val" else []
        expected_fields += [CHECKSUM_FIELD]
        assert names == [f"{k}.{f}" for k in samples for f in expected_fields]
        # per-sample checksums: every other member's size + sha256; the manifest lists key + its digest
        assert [k for k, _ in sh["samples"]] == list(samples)
        for key, digest in sh["samples"]:
            record = samples[key][CHECKSUM_FIELD]
            assert hashlib.sha256(record).hexdigest() == digest
            assert json.loads(record) == {"members": {
                f: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                for f, b in samples[key].items() if f != CHECKSUM_FIELD}}
        with tarfile.open(os.path.join(shard_root, sh["name"])) as tf:
            assert {(ti.mtime, ti.uid, ti.gid, ti.uname) for ti in tf} == {(0, 0, 0, "pop3d")}
        for token, fields in samples.items():
            sample = nusc.get("sample", token)
            meta = decode_json(fields[META_FIELD])
            assert meta["sample_token"] == token and meta["split"] == split and meta["version"] == entry["version"]
            assert meta["scene_name"] == nusc.get("scene", sample["scene_token"])["name"]
            assert meta["cameras"] == list(CAMERAS)
            assert meta["eval_gt_grid"] == entry["eval_gt_grid"]
            lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
            for c, (cam, fld) in enumerate(zip(CAMERAS, CAMERA_FIELDS)):
                cam_sd = nusc.get("sample_data", sample["data"][cam])
                assert fields[fld] == Path(root, cam_sd["filename"]).read_bytes()  # original JPEG bytes
                assert meta["img_hw"] == [cam_sd["height"], cam_sd["width"]]
                K = nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"])["camera_intrinsic"]
                np.testing.assert_array_equal(decode_npy(fields[INTRINSIC_FIELD])[c], np.asarray(K))
                np.testing.assert_allclose(decode_npy(fields[LIDAR2CAM_FIELD])[c],
                                           devkit_lidar2cam(nusc, lidar_sd, cam_sd), rtol=0, atol=1e-9)
            lidar_cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])  # LiDAR -> ego (devkit)
            np.testing.assert_allclose(decode_npy(fields[LIDAR2EGO_FIELD]), devkit_transform(lidar_cs), rtol=0,
                                       atol=1e-12)
            raw = np.fromfile(Path(root, lidar_sd["filename"]), dtype=np.float32).reshape(-1, 5)
            pts = decode_npy(fields[LIDAR_FIELD])
            assert pts.dtype == np.float32 and pts.shape == (raw.shape[0], 4)
            np.testing.assert_array_equal(pts, raw[:, :4])
            if entry["has_lidarseg"]:
                seg_file = nusc.get("lidarseg", lidar_sd["token"])["filename"]
                seg = decode_npy(fields[LIDARSEG_FIELD])
                assert seg.dtype == np.uint8
                np.testing.assert_array_equal(seg, np.fromfile(Path(root, seg_file), dtype=np.uint8))
            else:
                assert LIDARSEG_FIELD not in fields and not meta["has_lidarseg"]
            seen += 1
    assert seen == entry["num_samples"]


def test_two_builds_are_byte_identical(shard_root: str, synthetic_root, tmp_path: Path) -> None:
    m = load_manifest(shard_root)
    versions, splits, spp = build_args(m)
    out = tmp_path / "again"
    m2 = build_shards(str(synthetic_root), versions, splits, str(out), workers=2, samples_per_shard=spp,
                      progress=False)  # other worker count, same bytes
    assert m2 == m
    assert (out / "manifest.json").read_bytes() == Path(shard_root, "manifest.json").read_bytes()
    for e in m["splits"].values():
        for sh in e["shards"]:
            assert (out / sh["name"]).read_bytes() == Path(shard_root, sh["name"]).read_bytes()


def test_resume_after_sigkill_gives_the_clean_result(shard_root: str, synthetic_root, tmp_path: Path) -> None:
    m = load_manifest(shard_root)
    versions, splits, spp = build_args(m)
    out = tmp_path / "resumed"
    args = ["--dataroot", str(synthetic_root), "--version", *versions, "--splits", *splits, "--out", str(out),
            "--workers", "1", "--samples-per-shard", str(spp), "--no-progress"]
    cmd = [sys.executable, str(REPO / "scripts" / "build_shards.py"), *args]
    slow = [sys.executable, str(REPO / "tests" / "_slow_build.py"), "0.1", *args]
    proc = subprocess.Popen(slow, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            finished = [p for p in out.glob("*.tar") if (out / ".progress" / (p.name + ".json")).exists()]
            temps = list(out.glob("*.tmp-*"))
            if finished and temps:  # one shard done, the next one half-written
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"build ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "manifest.json").exists()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished and list(out.glob("*.tmp-*"))
    inodes = {n: (out / n).stat().st_ino for n in finished}
    # files of others: a file at a name the build must write stops it (named, untouched); the rest survive
    total = sum(len(e["shards"]) for e in m["splits"].values())
    assert len(finished) < total
    all_names = [sh["name"] for s in sorted(m["splits"]) for sh in m["splits"][s]["shards"]]
    stray = next(n for n in all_names if n not in finished)
    (out / stray).write_bytes(b"\0" * 700)
    foreign = {"notes.tmp-1234": b"someone's temp file", "val-000099.tar": b"someone's tar",
               ".progress/x.tmp-77": b"another temp"}
    for name, data in foreign.items():
        (out / name).write_bytes(data)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and str(out / stray) in res.stderr and "not written by" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert (out / stray).read_bytes() == b"\0" * 700
    (out / stray).unlink()

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert (out / "manifest.json").read_bytes() == Path(shard_root, "manifest.json").read_bytes()
    build_id = json.loads((out / ".progress" / "build.json").read_text())["build_id"]
    assert not list(out.glob(f"*.tmp-{build_id}-*")) and not list((out / ".progress").glob(f"*.tmp-{build_id}-*"))
    for name, data in foreign.items():
        assert (out / name).read_bytes() == data
    for n in all_names:
        assert (out / n).read_bytes() == Path(shard_root, n).read_bytes()
    for n, ino in inodes.items():  # finished shards were kept, not rewritten
        assert (out / n).stat().st_ino == ino
