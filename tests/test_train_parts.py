"""Losses, metrics, schedule and student preprocessing against independent oracles
(scikit-learn, timm's scheduler, OpenCV's colour conversion, brute-force Jaccard)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, confusion_matrix, jaccard_score

from pop3d.losses import lovasz_softmax, lovasz_softmax_flat, pop3d_loss
from pop3d.metrics import MeanIoU, average_precision, voxel_prediction, zero_shot_classes
from pop3d.preprocess import bgr_to_hsv, hsv_to_bgr, photometric_distortion, prepare_student_inputs
from pop3d.schedule import build_optimizer, build_scheduler, lr_at


def test_lovasz_equals_jaccard_loss_on_one_hot_predictions():
    # At binary vertices the Lovasz extension equals the set function: mean over present classes of 1 - IoU.
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 3, 200)
        pred = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 3, 200))
        probas = torch.nn.functional.one_hot(torch.from_numpy(pred), 3).double()
        ours = float(lovasz_softmax_flat(probas, torch.from_numpy(labels)))
        present = np.unique(labels)
        ref = np.mean([1 - jaccard_score(labels == c, pred == c) for c in present])
        assert ours == pytest.approx(ref, abs=1e-12)


def test_lovasz_ignores_255_and_is_differentiable():
    logits = torch.randn(1, 2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 2, (1, 4, 5, 3))
    labels_ign = labels.clone()
    labels_ign[0, 0] = 255
    full = lovasz_softmax(logits, labels_ign)
    keep = labels_ign != 255
    probas = logits.softmax(1).movedim(1, -1)[keep]
    assert float(full) == pytest.approx(float(lovasz_softmax_flat(probas, labels_ign[keep])), abs=1e-12)
    full.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_pop3d_loss_terms():
    logits = torch.randn(1, 2, 3, 3, 2)
    occ = torch.randint(0, 2, (1, 3, 3, 2))
    pred, tgt = torch.randn(7, 5), torch.randn(7, 5)
    terms = pop3d_loss(logits, occ, pred, tgt, feature_weight=0.5)
    ce = torch.nn.functional.cross_entropy(logits, occ)
    assert float(terms.ce) == pytest.approx(float(ce), rel=1e-6)
    assert float(terms.feature) == pytest.approx(float(((pred - tgt) ** 2).mean()), rel=1e-6)
    assert float(terms.total) == pytest.approx(float(terms.lovasz + terms.ce + 0.5 * terms.feature), rel=1e-6)
    empty = pop3d_loss(logits, occ, torch.zeros(0, 5), torch.zeros(0, 5))
    assert float(empty.feature) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        pop3d_loss(logits, occ, pred, tgt[:3])


def test_mean_iou_matches_sklearn():
    rng = np.random.default_rng(1)
    classes = list(range(1, 18))
    meter = MeanIoU(classes, [str(c) for c in classes])
    gts, preds = [], []
    for _ in range(3):
        gt = rng.integers(1, 18, (6, 5, 4))
        gt[rng.random(gt.shape) < 0.2] = 255
        gt[gt == 9] = 10  # class 9 never in the GT -> unseen
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(1, 18, gt.shape))
        pred[pred == 255] = 17
        meter.update(torch.from_numpy(pred), torch.from_numpy(gt))
        keep = gt != 255
        gts.append(gt[keep])
        preds.append(pred[keep])
    g, p = np.concatenate(gts), np.concatenate(preds)
    cm = confusion_matrix(g, p, labels=classes)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    seen = cm.sum(1) > 0
    ref_iou = np.where(seen, inter / np.maximum(union, 1), np.nan)
    ours = meter.iou().numpy()
    np.testing.assert_allclose(ours[seen], ref_iou[seen], rtol=1e-12)
    assert np.isnan(ours[~seen]).all() and (~seen).sum() == 1
    summ = meter.summary()
    assert summ["miou_present"] == pytest.approx(100 * np.nanmean(ref_iou))
    assert summ["miou_official"] == pytest.approx(100 * np.mean(np.where(seen, ref_iou, 1.0)))
    assert "unseen" in meter.table()


def test_average_precision_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        scores = torch.randint(0, 15, (300,), generator=g).double() / 7
        rel = torch.rand(300, generator=g) < 0.15
        if rel.sum() == 0:
            continue
        assert average_precision(scores, rel) == pytest.approx(
            average_precision_score(rel.numpy(), scores.numpy()), abs=1e-12)
    assert average_precision(torch.rand(5), torch.zeros(5, dtype=torch.bool)) == 0.0  # as sklearn


def test_zero_shot_is_max_over_prompts_then_argmax_over_classes():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(50, 8, generator=g)
    text = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=-1)
    prompt_class = torch.tensor([1, 1, 4, 4, 4, 9, 16])
    ours = zero_shot_classes(feats, text, prompt_class)
    logits = feats @ text.t()
    classes = prompt_class.unique()
    per_class = torch.stack([logits[:, prompt_class == c].max(1).values for c in classes], 1)
    assert torch.equal(ours, classes[per_class.argmax(1)])
    occ = torch.randn(2, 3, 4, 2, generator=g)
    vf = torch.randn(8, 3, 4, 2, generator=g)
    pred = voxel_prediction(occ, vf, text, prompt_class)
    occupied = occ.argmax(0) == 1
    assert (pred[~occupied] == 17).all()
    assert torch.equal(pred[occupied], zero_shot_classes(vf.movedim(0, -1)[occupied], text, prompt_class))


def test_schedule_matches_timm_cosine_scheduler():
    timm_sched = pytest.importorskip("timm.scheduler")
    model = torch.nn.ModuleDict({"img_backbone": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 2)})
    total = 1200
    opt_ref = build_optimizer(model, lr=1e-4, backbone_lr_mult=0.1)
    ref = timm_sched.CosineLRScheduler(opt_ref, t_initial=total, lr_min=1e-6, warmup_t=500,
                                       warmup_lr_init=1e-5, t_in_epochs=False, cycle_limit=1)
    opt = build_optimizer(model, lr=1e-4, backbone_lr_mult=0.1)
    ours = build_scheduler(opt, total_steps=total, warmup_steps=500, warmup_lr_init=1e-5, lr_min=1e-6)
    for t in range(total + 5):
        ref.step_update(t)
        for g_ref, g in zip(opt_ref.param_groups, opt.param_groups):
            assert g["lr"] == pytest.approx(g_ref["lr"], rel=1e-9, abs=1e-15), t
        ours.step()
    assert lr_at(0, 1e-4, total) == 1e-5
    assert [g["name"] for g in opt.param_groups] == ["default", "img_backbone"]


def test_hsv_conversions_match_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(5)
    img = rng.uniform(-40, 300, (31, 47, 3)).astype(np.float32)
    img[0, :4] = 12.0  # grey pixels (s == 0)
    hsv = bgr_to_hsv(torch.from_numpy(img).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(hsv, cv2.cvtColor(img, cv2.COLOR_BGR2HSV), atol=1e-3)
    mod = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    mod[..., 1] *= 1.3
    mod[..., 0] = (mod[..., 0] + 17) % 360
    back = hsv_to_bgr(torch.from_numpy(mod).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, cv2.cvtColor(mod, cv2.COLOR_HSV2BGR), atol=2e-3)


def test_photometric_distortion_is_per_image_and_sometimes_identity():
    x = torch.rand(64, 3, 8, 8) * 255
    g = torch.Generator().manual_seed(0)
    y = photometric_distortion(x, g)
    changed = (y - x).abs().flatten(1).max(1).values > 1e-2
    assert 0 < changed.sum() < 64  # each of 5 steps fires with p=0.5 -> ~1/32 untouched
    assert y.shape == x.shape


def test_prepare_student_inputs_normalises_pads_and_rescales_lidar2img():
    imgs = torch.randint(0, 256, (1, 6, 3, 90, 160), dtype=torch.uint8)
    l2i = torch.eye(4).expand(1, 6, 4, 4).clone()
    x, _, shape = prepare_student_inputs(imgs, l2i)
    assert shape == (96, 160) and x.shape == (1, 6, 3, 96, 160)
    bgr = imgs[0, 0].flip(0).float() - torch.tensor([103.530, 116.280, 123.675]).view(3, 1, 1)
    assert torch.allclose(x[0, 0, :, :90], bgr) and (x[..., 90:, :] == 0).all()
    _, l2i2, shape2 = prepare_student_inputs(imgs, l2i, out_hw=(45, 80))
    assert shape2 == (64, 96)
    p = torch.tensor([10.0, 20.0, 1.0, 1.0])
    assert torch.allclose(l2i2[0, 0] @ p, torch.tensor([5.0, 10.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="uint8"):
        prepare_student_inputs(imgs.float(), l2i)
