"""Shard loader: the batch dict contract, projections vs the devkit data, decoding, worker/node splitting."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from p3d_common.labels import RAW_TO_NOIGNORE
from shards import geometry
from shards.loader import BATCH_KEYS, make_loader

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")


def manifest(shard_root: str) -> dict:
    with open(os.path.join(shard_root, "manifest.json")) as f:
        return json.load(f)


def test_batch_dict_contract(shard_root: str) -> None:
    grid = geometry.GridSpec()
    batch = next(iter(make_loader(shard_root, "val", batch_size=2, num_workers=0)))
    assert tuple(batch) == BATCH_KEYS  # exactly the documented keys
    B = 2
    H, W = batch["img_hw"]
    assert isinstance(batch["img_hw"], tuple) and (H, W) == (900, 1600)
    assert len(batch["tokens"]) == B and all(isinstance(t, str) and "." not in t for t in batch["tokens"])
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (B, 6, 3, H, W)
    assert batch["lidar2img"].dtype == torch.float32 and batch["lidar2img"].shape == (B, 6, 4, 4)
    for key, cols, dtype in (("points", 4, torch.float32), ("grid_ind", 3, torch.float32)):
        assert isinstance(batch[key], list) and len(batch[key]) == B
        assert all(t.dtype == dtype and t.ndim == 2 and t.shape[1] == cols for t in batch[key])
    n = [len(p) for p in batch["points"]]
    assert [len(g) for g in batch["grid_ind"]] == n
    assert [lab.shape for lab in batch["labels"]] == [(k,) for k in n]
    assert all(lab.dtype == torch.int64 and 0 <= lab.min() and lab.max() <= 16 for lab in batch["labels"])
    assert all(lab.dtype == torch.uint8 and lab.max() <= 31 for lab in batch["labels_raw"])
    for g in batch["grid_ind"]:
        assert g.min() >= 0 and bool((g < torch.tensor(grid.shape, dtype=torch.float32)).all())
    for key in ("occupancy", "voxel_label", "eval_gt"):
        assert batch[key].dtype == torch.uint8 and batch[key].shape == (B, *grid.shape), key
    assert set(batch["occupancy"].unique().tolist()) <= {0, 1}
    assert set(batch["voxel_label"].unique().tolist()) <= set(range(18))
    assert set(batch["eval_gt"].unique().tolist()) <= set(range(1, 18)) | {255}
    M = len(batch["proj_batch"])
    assert M > 0
    for key in ("proj_batch", "proj_cam", "proj_point"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (M,), key
    assert batch["proj_rowcol"].dtype == torch.int64 and batch["proj_rowcol"].shape == (M, 2)
    assert batch["proj_batch"].tolist() == sorted(batch["proj_batch"].tolist())


def test_batch_equals_geometry_on_devkit_data(shard_root: str, synthetic_root) -> None:
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.data_classes import LidarPointCloud

    root = str(synthetic_root)
    nusc = NuScenes("v1.0-mini", root, verbose=False)
    grid = geometry.GridSpec()
    n_checked = 0
    for batch in make_loader(shard_root, "train", batch_size=2, num_workers=0, eval_gt=True):
        for b, token in enumerate(batch["tokens"]):
            sample = nusc.get("sample", token)
            lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
            cam_sds = [nusc.get("sample_data", sample["data"][c]) for c in CAMERAS]
            pts = LidarPointCloud.from_file(os.path.join(root, lidar_sd["filename"])).points.T  # (N, 4)
            Ks = np.stack([nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"]
                           for sd in cam_sds])
            T = np.stack([geometry.lidar_to_camera(
                nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"]),
                nusc.get("ego_pose", lidar_sd["ego_pose_token"]),
                nusc.get("ego_pose", sd["ego_pose_token"]),
                nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])) for sd in cam_sds])
            hw = (cam_sds[0]["height"], cam_sds[0]["width"])
            cam, pidx, rowcol = geometry.project_all_cameras(pts[:, :3], T, Ks, hw)
            sel = batch["proj_batch"] == b
            np.testing.assert_array_equal(batch["proj_cam"][sel].numpy(), cam)
            np.testing.assert_array_equal(batch["proj_point"][sel].numpy(), pidx)
            np.testing.assert_array_equal(batch["proj_rowcol"][sel].numpy(), rowcol)
            np.testing.assert_array_equal(batch["points"][b].numpy(), pts)
            l2i = np.stack([geometry.lidar_to_image(k, t) for k, t in zip(Ks, T)])
            np.testing.assert_allclose(batch["lidar2img"][b].numpy(), l2i, rtol=1e-6, atol=1e-4)
            raw = np.fromfile(os.path.join(root, nusc.get("lidarseg", lidar_sd["token"])["filename"]), np.uint8)
            labels = geometry.map_labels(raw, RAW_TO_NOIGNORE)
            np.testing.assert_array_equal(batch["labels_raw"][b].numpy(), raw)
            np.testing.assert_array_equal(batch["labels"][b].numpy(), labels.astype(np.int64))
            g = geometry.grid_indices(pts, grid, np.float64)
            np.testing.assert_array_equal(batch["grid_ind"][b].numpy(), g.astype(np.float32))
            np.testing.assert_array_equal(batch["occupancy"][b].numpy(), geometry.occupancy_target(g, grid))
            np.testing.assert_array_equal(batch["voxel_label"][b].numpy(),
                                          geometry.voxel_majority_label(g, labels, grid))
            np.testing.assert_array_equal(batch["eval_gt"][b].numpy(), geometry.raycast_eval_gt(pts, labels, grid))
            # images: decoded RGB equals OpenCV (what mmcv.imread used) with channels flipped
            for c in (0, 5):
                bgr = cv2.imread(os.path.join(root, cam_sds[c]["filename"]), cv2.IMREAD_COLOR)
                np.testing.assert_array_equal(batch["images"][b, c].permute(1, 2, 0).numpy(), bgr[:, :, ::-1])
            n_checked += 1
    assert n_checked == manifest(shard_root)["splits"]["train"]["num_samples"]


def test_split_without_lidarseg_has_no_labels(shard_root: str) -> None:
    batch = next(iter(make_loader(shard_root, "test", batch_size=1)))
    assert tuple(batch) == BATCH_KEYS
    for key in ("labels", "labels_raw", "voxel_label", "eval_gt"):
        assert batch[key] is None, key
    assert batch["occupancy"].shape[0] == 1 and len(batch["proj_point"]) > 0


def test_workers_and_epochs_cover_every_sample_once(shard_root: str) -> None:
    m = manifest(shard_root)["splits"]["train"]
    assert m["num_shards"] >= 2
    loader = make_loader(shard_root, "train", batch_size=1, num_workers=2, shuffle=True, seed=3, eval_gt=False)
    orders = []
    for epoch in range(3):
        loader.dataset.set_epoch(epoch)
        tokens = [t for batch in loader for t in batch["tokens"]]
        assert len(tokens) == m["num_samples"] and len(set(tokens)) == len(tokens)
        orders.append(tokens)
    assert len({tuple(sorted(o)) for o in orders}) == 1
    again = make_loader(shard_root, "train", batch_size=1, num_workers=2, shuffle=True, seed=3, epoch=2,
                        eval_gt=False)
    assert [t for batch in again for t in batch["tokens"]] == orders[2]  # seeded: reproducible


def test_split_by_node_partitions_the_shards(shard_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m = manifest(shard_root)["splits"]["train"]
    seen: Counter[str] = Counter()
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = make_loader(shard_root, "train", batch_size=1, num_workers=0, shuffle=True, eval_gt=False)
        seen.update(t for batch in loader for t in batch["tokens"])
    assert len(seen) == m["num_samples"] and set(seen.values()) == {1}


def test_too_few_shards_is_a_clear_error_and_resampling_works(shard_root: str) -> None:
    n = manifest(shard_root)["splits"]["val"]["num_shards"]
    with pytest.raises(ValueError, match="shard"):
        make_loader(shard_root, "val", batch_size=1, num_workers=n + 1)
    loader = make_loader(shard_root, "val", batch_size=1, num_workers=0, resampled=True, epoch_batches=3,
                         eval_gt=False)
    assert sum(1 for _ in loader) == 3


def test_glob_source_without_manifest(shard_root: str) -> None:
    paths = sorted(str(p) for p in Path(shard_root).glob("val-*.tar"))
    a = [t for b in make_loader(os.path.join(shard_root, "val-*.tar"), "val", eval_gt=False) for t in b["tokens"]]
    b = [t for b in make_loader(paths, "val", eval_gt=False) for t in b["tokens"]]
    assert a == b and len(a) == manifest(shard_root)["splits"]["val"]["num_samples"]
