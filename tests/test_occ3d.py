"""Occ3D-nuScenes protocol: the metric against an independent float64 confusion matrix (and scikit-learn), the
voxel-centre geometry, the student sampled at arbitrary points, the synthetic Occ3D GT, and eval.py end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _schema2 import write_v2_copy

from pop3d.occ3d import (
    FREE,
    MIOU_NO_OTHERS_CLASSES,
    OCC3D_CLASS_NAMES,
    OCC3D_SHAPE,
    Occ3DError,
    Occ3DMeter,
    centres_in_grid,
    index_gt,
    load_labels,
    save_prediction,
    voxel_centres_ego,
)

ROOT = Path(__file__).resolve().parents[1]


def oracle(samples) -> tuple[np.ndarray, np.ndarray]:
    """float64 confusion matrix over masked voxels, and per-class IoU from explicit TP / FP / FN counts."""
    conf = np.zeros((18, 18), np.float64)
    for pred, gt, mask in samples:
        np.add.at(conf, (gt[mask].astype(np.int64), pred[mask].astype(np.int64)), 1.0)
    iou = np.full(18, np.nan)
    for c in range(18):
        tp = sum(float(((g == c) & (p == c) & m).sum()) for p, g, m in samples)
        fp = sum(float(((g != c) & (p == c) & m).sum()) for p, g, m in samples)
        fn = sum(float(((g == c) & (p != c) & m).sum()) for p, g, m in samples)
        if tp + fp + fn > 0:
            iou[c] = tp / (tp + fp + fn)
    return conf, iou


def random_case(rng, shape=(12, 10, 6)):
    gt_classes = rng.choice(18, size=rng.integers(3, 12), replace=False)
    pred_classes = rng.choice(18, size=rng.integers(3, 12), replace=False)
    gt = rng.choice(np.append(gt_classes, FREE), size=shape).astype(np.uint8)
    pred = rng.choice(np.append(pred_classes, FREE), size=shape).astype(np.uint8)
    agree = rng.random(shape) < 0.35
    pred[agree] = gt[agree]
    mask = rng.random(shape) < 0.6
    return pred, gt, mask


@pytest.mark.parametrize("seed", range(6))
def test_meter_matches_a_float64_confusion_matrix(seed):
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(seed)
    samples = [random_case(rng) for _ in range(3)]
    meter = Occ3DMeter()
    for s in samples:
        meter.update(*s)
    conf, iou = oracle(samples)
    np.testing.assert_array_equal(meter.hist.numpy(), conf)
    sk = sum(confusion_matrix(g[m], p[m], labels=list(range(18))) for p, g, m in samples)
    np.testing.assert_array_equal(meter.hist.numpy(), sk)
    np.testing.assert_allclose(meter.iou(), iou, equal_nan=True)
    s = meter.summary()
    assert s["miou"] == pytest.approx(100 * np.nanmean(iou[:17]))
    assert s["miou_no_others_otherflat"] == pytest.approx(100 * np.nanmean(iou[list(MIOU_NO_OTHERS_CLASSES)]))
    for c, name in enumerate(OCC3D_CLASS_NAMES):
        assert (s["per_class"][name] is None) == bool(np.isnan(iou[c]))
    json.dumps(s, allow_nan=False)  # strict JSON: NaN is None


def test_absent_predicted_only_and_free_classes():
    gt = np.array([4, 4, 11, 17, 17, 0, 3], np.uint8)
    pred = np.array([4, 17, 11, 17, 5, 17, 17], np.uint8)
    mask = np.array([1, 1, 1, 1, 1, 1, 0], bool)  # the bus voxel is not camera-visible: bus is absent
    m = Occ3DMeter()
    m.update(pred, gt, mask)
    s = m.summary()["per_class"]
    assert s["car"] == pytest.approx(50.0) and s["driveable_surface"] == pytest.approx(100.0)
    assert s["construction_vehicle"] == 0.0  # predicted only: IoU 0, counted in the mean
    assert s["others"] == 0.0 and s["bus"] is None and s["free"] == pytest.approx(25.0)  # TP 1, FP 2, FN 1
    assert m.summary()["miou"] == pytest.approx((50 + 100 + 0 + 0) / 4)  # free is not in the mean
    assert m.summary()["miou_no_others_otherflat"] == pytest.approx((50 + 100 + 0) / 3)


def test_meter_states_sum_across_processes():
    rng = np.random.default_rng(7)
    samples = [random_case(rng) for _ in range(4)]
    whole, a, b = Occ3DMeter(), Occ3DMeter(), Occ3DMeter()
    for i, s in enumerate(samples):
        oor = np.zeros(s[0].shape, bool)
        oor[..., -1] = True
        whole.update(*s, out_of_range=oor)
        (a if i % 2 else b).update(*s, out_of_range=oor)
    total = Occ3DMeter.from_state(a.state() + b.state())
    assert torch.equal(total.hist, whole.hist) and total.summary() == whole.summary()
    s = whole.summary()
    assert s["out_of_range_voxels"] == 4 * 12 * 10
    assert s["out_of_range_visible_voxels"] == sum(int(m[..., -1].sum()) for _, _, m in samples)
    assert s["out_of_range_visible_occupied_voxels"] == sum(int((m[..., -1] & (g[..., -1] != FREE)).sum())
                                                            for _, g, m in samples)


def test_voxel_centres_map_back_to_the_ego_frame():
    from shards.geometry import GridSpec, transform_matrix


    lidar2ego = transform_matrix([0.94, 0.01, 1.84], [np.cos((-np.pi / 2) / 2), 0, 0, np.sin((-np.pi / 2) / 2)])
    grid = GridSpec()
    coords, in_range = centres_in_grid(lidar2ego, grid)
    p_lidar = coords * np.asarray(grid.voxel_size) + np.asarray(grid.pc_min)
    p_ego = p_lidar @ lidar2ego[:3, :3].T + lidar2ego[:3, 3]
    np.testing.assert_allclose(p_ego, voxel_centres_ego(), atol=1e-9)
    ego = voxel_centres_ego().reshape(*OCC3D_SHAPE, 3)
    np.testing.assert_allclose(ego[0, 0, 0], [-39.8, -39.8, -0.8])
    np.testing.assert_allclose(ego[199, 5, 15], [39.8, -37.8, 5.2])
    # LiDAR z = ego z - 1.84 must be < 3 m: only the top layer (centre 5.2 m) is outside the paper's volume
    oor = ~in_range.reshape(OCC3D_SHAPE)
    assert oor[..., 15].all() and not oor[..., :15].any()


def test_labels_files_round_trip_and_errors(tmp_path):
    sem = np.random.default_rng(0).integers(0, 18, OCC3D_SHAPE).astype(np.uint8)
    p = save_prediction(tmp_path, "tok", sem)
    assert p.name == "tok.npz" and np.array_equal(np.load(p)["semantics"], sem)
    gt = tmp_path / "gts" / "scene-0001" / "abc" / "labels.npz"
    gt.parent.mkdir(parents=True)
    np.savez(gt, semantics=sem, mask_lidar=np.ones(OCC3D_SHAPE, np.uint8), mask_camera=np.zeros(OCC3D_SHAPE, bool))
    assert index_gt(tmp_path) == {"abc": gt} == index_gt(tmp_path / "gts")
    lab = load_labels(gt)
    assert lab.mask_camera.dtype == bool and not lab.mask_camera.any() and lab.mask_lidar.all()
    np.savez(gt, semantics=sem[:100], mask_lidar=sem, mask_camera=sem)
    with pytest.raises(Occ3DError, match="shape"):
        load_labels(gt)
    np.savez(gt, semantics=sem)
    with pytest.raises(Occ3DError, match="mask_camera"):
        load_labels(gt)
    with pytest.raises(Occ3DError, match="no <scene_name>"):
        index_gt(tmp_path / "gts" / "scene-0001" / "abc")


def test_sampling_at_points_equals_the_model_forward(shard_root):
    from pop3d.config import load_config
    from pop3d.occ3d import point_outputs, tpv_planes
    from pop3d.preprocess import prepare_student_inputs
    from pop3d.factory import build_student, grid_spec_of
    from shards.loader import read_sample

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards={shard_root}"])
    torch.manual_seed(0)
    model = build_student(cfg).eval()
    batch = read_sample(shard_root, "val", grid_spec_of(cfg), index=0, eval_gt=False)
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(300, 3, generator=g) * torch.tensor([25.0, 25.0, 4.0])
    with torch.no_grad():
        occ, fts = point_outputs(model, tpv_planes(model, batch, torch.device("cpu"), cfg.data.student_image_hw),
                                 pts, chunk=128)
        imgs, l2i, shape = prepare_student_inputs(batch["images"], batch["lidar2img"], out_hw=cfg.data.student_image_hw)
        ref = model(imgs, l2i, shape, points=pts[None], features=pts[None], voxel_features=False)
    torch.testing.assert_close(occ, ref.logits_pts[0, :, :, 0, 0].t(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fts, ref.logits_pts_fts[0], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def occ3d_val_gt(synthetic_root, tmp_path_factory):
    from shards.synthetic_occ3d import make_synthetic_occ3d

    out = tmp_path_factory.mktemp("occ3d") / "gts"
    files = make_synthetic_occ3d(synthetic_root, out=out, scenes={"scene-0103"})  # the mini_val scene
    return out, files


@pytest.mark.slow
def test_synthetic_occ3d_gt_follows_the_world(occ3d_val_gt, synthetic_root):
    from p3d_common.labels import RAW_TO_NOIGNORE
    from shards.lidar2ego import lidar2ego_by_sample

    _, files = occ3d_val_gt
    assert len(files) == 2 and all(f.parent.parent.name == "scene-0103" for f in files)
    calib = lidar2ego_by_sample(synthetic_root)
    tables = {n: json.loads((synthetic_root / "v1.0-mini" / f"{n}.json").read_text())
              for n in ("sample_data", "lidarseg")}
    seg = {x["sample_data_token"]: x["filename"] for x in tables["lidarseg"]}
    for f in files:
        token = f.parent.name
        lab = load_labels(f)
        sem, cam, lid = lab.semantics, lab.mask_camera, lab.mask_lidar
        assert 0.05 < cam.mean() < 0.8 and 0.02 < lid.mean() < 0.6
        # within 20 m the ground (tilted by the ego's pitch) stays in layer 2: below it free and never seen
        assert (sem[50:150, 50:150, :2] == FREE).all() and not cam[50:150, 50:150, :2].any()
        assert sem[100, 100, 2] == 11 and (sem[100, 100, 3:] == FREE).all()  # road under the (removed) ego car
        # the LiDAR returns of world objects land in voxels of their class (independent of our ray casting)
        sd = next(x for x in tables["sample_data"] if x["sample_token"] == token and x["token"] in seg)
        pts = np.fromfile(synthetic_root / sd["filename"], np.float32).reshape(-1, 5)[:, :3].astype(np.float64)
        labels = np.fromfile(synthetic_root / seg[sd["token"]], np.uint8)
        T = calib[token]
        ego = pts @ T[:3, :3].T + T[:3, 3]
        keep = (labels != 0) & (labels != 31)
        ijk = np.floor((ego[keep] - [-40, -40, -1]) / 0.4).astype(int)
        ok = np.all((ijk >= 0) & (ijk < OCC3D_SHAPE), axis=1)
        hit = sem[tuple(ijk[ok].T)]
        assert np.mean(hit == RAW_TO_NOIGNORE[labels[keep][ok]]) > 0.85
        assert np.mean(hit != FREE) > 0.95
        assert lid[tuple(ijk[ok].T)].all()  # a voxel holding a return is LiDAR-observed
        # camera-visible voxels: occupied ones exist, and many returns lie in camera-visible voxels
        assert (cam & (sem != FREE)).sum() > 1000 and cam[tuple(ijk[ok].T)].mean() > 0.5


@pytest.mark.slow
def test_eval_both_protocols_end_to_end(occ3d_val_gt, synthetic_root, shard_root, tmp_path):
    from pop3d.config import load_config
    from pop3d.factory import build_student, save_student

    out, _ = occ3d_val_gt
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards={shard_root}"])
    torch.manual_seed(0)
    model = build_student(cfg)
    with torch.no_grad():  # occupancy head says 'occupied' everywhere: the classes come from the text prompts
        model.tpv_aggregator.classifier.weight.zero_()
        model.tpv_aggregator.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    weights = tmp_path / "student.safetensors"
    save_student(model, weights, cfg, 0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, str(ROOT / "scripts" / "eval.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--set", f"data.shards={shard_root}", "--set", "data.num_workers=0", "--weights", str(weights),
            "--random-text-embeddings"]
    res, preds = tmp_path / "eval.json", tmp_path / "preds"
    r = subprocess.run(base + ["--protocol", "both", "--occ3d-gt", str(out.parent), "--nuscenes-dataroot",
                               str(synthetic_root), "--save-predictions", str(preds), "--out", str(res)],
                       check=False, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Occ3D-nuScenes protocol" in r.stdout and "Zero-shot semantic occupancy" in r.stdout
    assert "mIoU w/o others+oflat" in r.stdout
    data = json.loads(res.read_text())
    assert {"semantic", "occupancy", "points", "occ3d"} <= set(data)
    occ = data["occ3d"]
    assert occ["samples"] == 2 and occ["out_of_range_prediction"] == "free"
    # re-score the saved predictions independently against the GT files
    samples = []
    for token, gt_path in index_gt(out).items():
        pred = np.load(preds / f"{token}.npz")["semantics"]
        assert pred.shape == OCC3D_SHAPE and pred.dtype == np.uint8 and pred.min() >= 1  # never 'others'
        lab = load_labels(gt_path)
        samples.append((pred, lab.semantics, lab.mask_camera))
    _, iou = oracle(samples)
    assert occ["miou"] == pytest.approx(100 * np.nanmean(iou[:17]))
    assert occ["miou_no_others_otherflat"] == pytest.approx(100 * np.nanmean(iou[list(MIOU_NO_OTHERS_CLASSES)]))
    assert len({int(c) for p, _, _ in samples for c in np.unique(p)}) > 3  # prompts pick several classes
    assert occ["out_of_range_voxels"] > 0  # tiny config: z above 3 m in the LiDAR frame
    # schema-3 shards carry lidar2ego: no nuScenes tables needed, the same numbers
    res2 = tmp_path / "eval_no_tables.json"
    r = subprocess.run(base + ["--protocol", "occ3d", "--occ3d-gt", str(out.parent), "--out", str(res2)],
                       check=False, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(res2.read_text())["occ3d"] == occ
    # schema-2 shards (no lidar2ego.npy) without --nuscenes-dataroot: one line naming the flag
    v2 = write_v2_copy(shard_root, tmp_path / "v2")
    r = subprocess.run([*base[:4], "--set", f"data.shards={v2}", *base[6:], "--protocol", "occ3d", "--occ3d-gt",
                        str(out.parent)], check=False, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "--nuscenes-dataroot" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    # errors: one line, exit 2
    for extra, needle in ((["--protocol", "occ3d"], "--occ3d-gt"),
                          (["--protocol", "occ3d", "--occ3d-gt", str(tmp_path / "nope"), "--nuscenes-dataroot",
                            str(synthetic_root)], "no such Occ3D")):
        r = subprocess.run(base + extra, check=False, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]
