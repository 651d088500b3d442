"""Batch size B > 1 per process equals B separate samples (issue 10), and the photometric parameters drawn
in the loader equal the in-step draws they replace.

Oracles: two B=1 forwards / steps of the same model; the pre-split photometric code written out below;
scikit-learn's Jaccard index and float64 formulas for the per-sample losses; the plan's (shard, index) sets
of other (processes, accumulation, batch) factorisations.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks._synthetic_batch import make_batch, merge_batches
from pop3d.config import ConfigError, load_config
from shards.order import stable_seed, train_items

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.tpv_h=10", "model.tpv_w=10", "model.tpv_z=4", "model.dim=16", "model.num_heads=4",
        "model.base_channels=4", "model.stem_channels=8", "model.feature_dim=16", "model.hidden_dims_ft=16",
        "data.student_image_hw=[64, 96]", "teacher.resize_fit=[96, 64]",
        "teacher.random_arch={depth: 50, base_channels: 4, stem_channels: 8, aspp_channels: 16}"]


def _cfg(tmp_path, *extra):
    return load_config(ROOT / "configs" / "tiny.yaml", [*TINY, f"train.output_dir={tmp_path}", *extra])


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """|a - b| <= rel * max|b| elementwise: float32 batched vs per-sample kernels differ in summation order
    only (~1e-7 relative per op); 1e-5 of the output scale leaves room for a few layers of it."""
    scale = float(b.abs().max()) or 1.0
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x {scale:.3g}"


def _two_samples(cfg, n_points=(400, 150)):
    """Two loader-shaped single-sample batches with different projection counts."""
    return [make_batch(cfg, seed=s, n_points=n) for s, n in zip((3, 4), n_points)]


# ---- (a) the student ----------------------------------------------------------------------------------------
def test_student_forward_at_b2_equals_two_b1_forwards(tmp_path):
    from pop3d.factory import build_student
    from pop3d.preprocess import prepare_student_inputs
    from pop3d.training import feature_points, projection_counts

    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    model = build_student(cfg).eval()
    parts = _two_samples(cfg)
    batch = merge_batches(parts)
    counts = projection_counts(batch)
    assert counts[0] != counts[1] and min(counts) > 20  # padding is exercised

    def run(b):
        imgs, l2i, hw = prepare_student_inputs(b["images"], b["lidar2img"], out_hw=cfg.data.student_image_hw)
        pts = torch.stack([g[:100] for g in b["grid_ind"]])  # (B, 100, 3): the occupancy point path too
        with torch.no_grad():
            return model(imgs, l2i, hw, points=pts, features=feature_points(b), voxel_features=True)

    both, singles = run(batch), [run(p) for p in parts]
    for i, (one, n) in enumerate(zip(singles, counts)):
        _close(both.logits_vox[i], one.logits_vox[0])
        _close(both.logits_vox_fts[i], one.logits_vox_fts[0])
        _close(both.logits_pts[i], one.logits_pts[0])
        _close(both.logits_pts_fts[i, :n], one.logits_pts_fts[0])
    assert not torch.allclose(singles[0].logits_vox, singles[1].logits_vox)  # the samples differ


def test_grid_mask_per_sample_generators_give_each_sample_its_own_mask():
    from pop3d.model.grid_mask import GridMask

    gm = GridMask(prob=0.7).train()
    x = torch.rand(4 * 6, 3, 32, 48) + 1.0
    seeds = [stable_seed(0, 1, f"tok{i}", "model") for i in range(4)]
    out = gm(x, generators=[torch.Generator().manual_seed(s) for s in seeds])
    fired = 0
    for i, s in enumerate(seeds):
        torch.manual_seed(s)  # what B = 1 does: the global RNG seeded by the sample's seed
        alone = gm(x[6 * i:6 * i + 6])
        assert torch.equal(out[6 * i:6 * i + 6], alone), i
        fired += int(not torch.equal(alone, x[6 * i:6 * i + 6]))
    assert fired >= 1
    with pytest.raises(ValueError, match="cannot be split into 5 samples"):
        gm(x, generators=[torch.Generator()] * 5)


# ---- (b) the loss ---------------------------------------------------------------------------------------------
def _jaccard_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """1 - IoU averaged over the classes present in the (non-ignored) labels, hard predictions: what
    Lovasz-softmax equals at one-hot probabilities (scikit-learn's Jaccard index)."""
    from sklearn.metrics import jaccard_score

    keep = labels.reshape(-1) != 255
    gt, pred = labels.reshape(-1)[keep], logits.argmax(0).reshape(-1)[keep]
    present = sorted(set(gt.tolist()))
    iou = jaccard_score(gt, pred, labels=present, average=None, zero_division=0.0)
    return float(np.mean(1.0 - iou))


def _ce64(logits: np.ndarray, labels: np.ndarray) -> float:
    """Cross-entropy in float64, averaged over the non-ignored voxels of one sample."""
    z = logits.reshape(logits.shape[0], -1).T
    y = labels.reshape(-1)
    keep = y != 255
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    return float(np.mean(lse[keep] - z[keep, y[keep]]))


def test_loss_at_b2_is_the_mean_of_the_two_samples_losses():
    from pop3d.losses import pop3d_loss

    g = torch.Generator().manual_seed(0)
    b, shape = 2, (5, 4, 3)
    hard = 30.0 * (torch.randint(0, 2, (b, *shape), generator=g) * 2 - 1).double()
    logits = torch.stack([-hard, hard], 1)  # one-hot softmax up to exp(-60): Lovasz = Jaccard loss
    occ = torch.randint(0, 2, (b, *shape), generator=g)
    occ[0, 0] = 255
    occ[1, :, :2] = 255
    preds = [torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)]
    tgts = [torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)]
    terms = pop3d_loss(logits, occ, preds, tgts, feature_weight=0.5)

    lov = np.mean([_jaccard_loss(logits[i].numpy(), occ[i].numpy()) for i in range(b)])
    ce = np.mean([_ce64(logits[i].numpy(), occ[i].numpy()) for i in range(b)])
    feat = np.mean([((p - t) ** 2).mean().item() for p, t in zip(preds, tgts)])
    assert float(terms.lovasz) == pytest.approx(lov, abs=1e-12)
    assert float(terms.ce) == pytest.approx(ce, rel=1e-6)  # CE runs in float32
    assert float(terms.feature) == pytest.approx(feat, rel=1e-6)  # MSE runs in float32 too
    assert float(terms.total) == pytest.approx(lov + ce + 0.5 * feat, rel=1e-6)
    pooled = torch.cat([(p - t) ** 2 for p, t in zip(preds, tgts)]).mean().item()
    assert abs(pooled - feat) > 1e-3  # per sample, not pooled over the batch's points
    # and exactly the mean of two single-sample calls
    ones = [pop3d_loss(logits[i:i + 1], occ[i:i + 1], preds[i], tgts[i], feature_weight=0.5) for i in range(b)]
    for k in ("total", "lovasz", "ce", "feature"):
        assert float(getattr(terms, k)) == pytest.approx(np.mean([float(getattr(o, k)) for o in ones]), rel=1e-12)
    # a sample without projections contributes a feature loss of 0
    empty = pop3d_loss(logits, occ, [preds[0], torch.zeros(0, 5)], [tgts[0], torch.zeros(0, 5)])
    assert float(empty.feature) == pytest.approx(((preds[0] - tgts[0]) ** 2).mean().item() / 2, rel=1e-6)
    with pytest.raises(ValueError, match="list of 2 tensors"):
        pop3d_loss(logits, occ, preds[0], tgts[0])


# ---- (c) one B=2 step == the mean of two B=1 steps -----------------------------------------------------------
def _grads(model, teacher, batch, cfg):
    from pop3d.training import compute_loss, seed_sample_draws

    model.zero_grad(set_to_none=True)
    gens = seed_sample_draws(cfg.train.seed, 0, batch["tokens"])
    terms, _ = compute_loss(model, teacher, batch, cfg, None, train=True, grid_mask_generators=gens)
    terms.total.backward()
    return float(terms.total.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_of_a_b2_step_equal_the_mean_of_two_b1_steps(tmp_path):
    from pop3d.factory import build_student
    from pop3d.training import photometric_params
    from teacher.live import build_teacher_from_config

    cfg = _cfg(tmp_path, "model.dropout=0.0", "model.grid_mask_prob=1.0", "data.photometric_aug=true")
    torch.manual_seed(0)
    model = build_student(cfg).train()  # GridMask on (per sample), dropout off: every draw is per sample
    teacher = build_teacher_from_config(cfg.teacher)
    parts = _two_samples(cfg)
    for p in parts:
        p["photometric"] = photometric_params(cfg.train.seed, 0, p["tokens"][0], 6)[None]
    loss2, g2 = _grads(model, teacher, merge_batches(parts), cfg)
    singles = [_grads(model, teacher, p, cfg) for p in parts]
    assert loss2 == pytest.approx(np.mean([s[0] for s in singles]), rel=1e-5)
    assert g2.keys() == singles[0][1].keys() and len(g2) > 50
    flat = lambda gs: torch.cat([gs[k].flatten() for k in sorted(g2)])
    ref, got = (flat(singles[0][1]) + flat(singles[1][1])) / 2, flat(g2)
    assert float((got - ref).norm()) <= 1e-4 * float(ref.norm())
    for k in g2:  # per parameter too, against its own scale
        _close(g2[k], (singles[0][1][k] + singles[1][1][k]) / 2, rel=1e-4)
    assert float((flat(singles[0][1]) - ref).norm()) > 0.05 * float(ref.norm())  # the samples' gradients differ


# ---- the photometric parameters drawn in the loader ---------------------------------------------------------
def _old_photometric(img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The in-step photometric distortion before the draw/apply split, written out: the oracle."""
    from pop3d.preprocess import bgr_to_hsv, hsv_to_bgr

    n = img.shape[0]
    coin = lambda: torch.rand(n, generator=generator) < 0.5
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)
    v = lambda x: x.view(n, 1, 1, 1)
    img = img + v(torch.where(coin(), uniform(-32, 32), torch.zeros(())))
    contrast_first = coin()
    do_contrast, alpha = coin(), uniform(0.5, 1.5)
    alpha = torch.where(do_contrast, alpha, torch.ones(()))
    img = img * v(torch.where(contrast_first, alpha, torch.ones(())))
    hsv = bgr_to_hsv(img)
    sat = torch.where(coin(), uniform(0.5, 1.5), torch.ones(()))
    hue = torch.where(coin(), uniform(-18, 18), torch.zeros(()))
    h = hsv[:, 0] + hue.view(n, 1, 1)
    h = torch.where(h > 360, h - 360, h)
    h = torch.where(h < 0, h + 360, h)
    img = hsv_to_bgr(torch.stack([h, hsv[:, 1] * sat.view(n, 1, 1), hsv[:, 2]], dim=1))
    img = img * v(torch.where(contrast_first, torch.ones(()), alpha))
    swap = coin()
    perms = torch.stack([torch.randperm(3, generator=generator) for _ in range(n)])
    perms = torch.where(swap.view(n, 1), perms, torch.arange(3).expand(n, 3))
    return torch.gather(img, 1, perms.view(n, 3, 1, 1).expand_as(img))


def test_loader_drawn_photometric_params_equal_the_in_step_draws(shard_root, tmp_path, monkeypatch):
    from pop3d import preprocess
    from pop3d.preprocess import prepare_student_inputs
    from pop3d.training import TrainData

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards={shard_root}", "data.num_workers=0",
                                                       "train.batch_size=2", "train.seed=5",
                                                       f"train.output_dir={tmp_path}"])
    data = TrainData(cfg, 0, 1)
    seen = 0
    for _, micro in data.epoch(1, 0):
        (batch,) = micro
        assert batch["photometric"].shape == (2, 6, 8) and batch["n_proj"] == [
            int((batch["proj_batch"] == i).sum()) for i in range(2)]
        got, _, _ = prepare_student_inputs(batch["images"], batch["lidar2img"], out_hw=(48, 80), photometric=True,
                                           photometric_params=batch["photometric"])
        with monkeypatch.context() as m:  # today's step: the old distortion, drawn in the step per sample
            m.setattr(preprocess, "photometric_distortion", _old_photometric)
            for i, token in enumerate(batch["tokens"]):
                g = torch.Generator().manual_seed(stable_seed(5, 1, token, "photometric"))
                want, _, _ = prepare_student_inputs(batch["images"][i:i + 1], batch["lidar2img"][i:i + 1],
                                                    out_hw=(48, 80), photometric=True, generator=g)
                assert torch.equal(got[i], want[0]), token  # bit for bit
        seen += 1
    assert seen == data.steps_per_epoch == 2


def test_photometric_distortion_is_draw_then_apply():
    from pop3d.preprocess import apply_photometric, draw_photometric_params, photometric_distortion

    x = torch.rand(6, 3, 12, 20) * 255
    for seed in range(8):
        old = _old_photometric(x, torch.Generator().manual_seed(seed))
        assert torch.equal(photometric_distortion(x, torch.Generator().manual_seed(seed)), old)
        params = draw_photometric_params(6, torch.Generator().manual_seed(seed))
        assert torch.equal(apply_photometric(x, params), old)
    with pytest.raises(ValueError, match="for 6 images"):
        apply_photometric(x, params[:3])


# ---- (d) the plan and a real run --------------------------------------------------------------------------------
def _global(urls, counts, world, accum, batch, epoch=0, start=0, block=0):
    out: dict[int, list] = {}
    for r in range(world):
        items = train_items(urls, counts, seed=3, epoch=epoch, start_step=start, rank=r, world=world, accum=accum,
                            shuffle_block=block, batch_size=batch)
        for url, idx, (_, p, _) in items:
            out.setdefault(p, []).append((url, idx))
    return {p: sorted(v) for p, v in out.items()}


@pytest.mark.parametrize("block", [0, 3])
def test_a_step_reads_the_same_samples_for_every_factorisation_of_the_global_batch(block):
    sizes = [5, 5, 4, 5, 3, 5, 5, 2, 5]
    urls = [f"/s/train-{i:06d}.tar" for i in range(len(sizes))]
    counts = dict(zip(urls, sizes))
    ref = _global(urls, counts, 1, 4, 1, block=block)
    for world, accum, batch in ((2, 2, 1), (1, 1, 4), (2, 1, 2), (1, 2, 2), (4, 1, 1)):
        assert _global(urls, counts, world, accum, batch, block=block) == ref, (world, accum, batch)
    assert all(len(v) == 4 for v in ref.values())
    assert max(Counter(x for v in ref.values() for x in v).values()) == 1
    # a rank's micro-batch is B consecutive items with one tag; resuming at step k is the tail of the list
    full = train_items(urls, counts, seed=3, epoch=0, start_step=0, rank=1, world=2, accum=1, batch_size=2)
    assert [t for _, _, t in full[:4]] == [(0, 0, 0), (0, 0, 0), (0, 1, 0), (0, 1, 0)]
    assert train_items(urls, counts, seed=3, epoch=0, start_step=3, rank=1, world=2, accum=1,
                       batch_size=2) == full[3 * 2:]


@pytest.mark.slow
def test_a_b2_run_trains_on_the_samples_of_b1_with_accum_2(shard_root, tmp_path, monkeypatch):
    """One process, batch 2 == one process, batch 1 x accum 2: the same samples per step, the same number of
    steps and LR schedule, and with dropout off the same losses and weights up to float32 summation order."""
    from safetensors.torch import load_file

    from pop3d import training

    runs = {}
    real = training.train_step
    for name, sets in (("b2", ["train.batch_size=2"]), ("acc2", ["train.grad_accum_steps=2"])):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [
            f"data.shards={shard_root}", f"train.output_dir={tmp_path / name}", "data.num_workers=0",
            "train.epochs=1", "train.val_every_epochs=0", "train.tensorboard=false", "train.log_every=1",
            "train.warmup_steps=1", "model.dropout=0.0", *sets])
        seen, lrs = [], []

        def spy(model, teacher, micro, cfg_, accelerator, optimizer, step, seen=seen, lrs=lrs, real=real):
            seen.append(sorted(t for b in micro for t in b["tokens"]))
            lrs.append([g["lr"] for g in optimizer.param_groups])
            return real(model, teacher, micro, cfg_, accelerator, optimizer, step)

        monkeypatch.setattr(training, "train_step", spy)
        final = training.train(cfg)
        runs[name] = (seen, lrs, load_file(str(final)), (tmp_path / name / "log.jsonl").read_text())
    (s2, lr2, w2, log2), (sa, lra, wa, loga) = runs["b2"], runs["acc2"]
    assert len(s2) == 2 and s2 == sa and len({t for s in s2 for t in s}) == 4  # 4 samples, 2 steps
    assert lr2 == lra
    import json

    for a, b in zip(map(json.loads, log2.splitlines()), map(json.loads, loga.splitlines())):
        assert a["step"] == b["step"]
        for k in ("total", "lovasz", "ce", "feature"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (a["step"], k)
    for k in w2:
        _close(w2[k], wa[k], rel=1e-4)


def test_too_few_shards_for_batch_slots_is_refused(shard_root):
    from pop3d.training import TrainData

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards={shard_root}", "train.batch_size=3"])
    with pytest.raises(ValueError, match=r"2 training shard\(s\) for 3 slots \(processes x grad_accum_steps x "
                                         r"batch_size\)"):
        TrainData(cfg, 0, 1)


# ---- (e) config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-2"])
def test_batch_size_below_one_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"tiny.yaml: train[.]batch_size: must be >= 1"):
        load_config(ROOT / "configs" / "tiny.yaml", [f"train.batch_size={value}"])
    assert load_config(ROOT / "configs" / "tiny.yaml", ["train.batch_size=4"]).train.batch_size == 4


@pytest.mark.slow
def test_b2_resume_is_exact_and_another_global_batch_is_refused(shard_root, tmp_path):
    """Batch 2: a run stopped at step 2 and resumed logs the uninterrupted run's losses bit for bit and ends
    with its weights; resuming it with batch 1 (another global batch) is refused, with batch 1 x accum 2
    (the same global batch) it continues."""
    import json
    import shutil

    from safetensors.torch import load_file

    from pop3d import training

    def cfg(out, *sets):
        return load_config(ROOT / "configs" / "tiny.yaml", [
            f"data.shards={shard_root}", f"train.output_dir={out}", "data.num_workers=0", "train.epochs=2",
            "train.val_every_epochs=0", "train.tensorboard=false", "train.log_every=1", "train.warmup_steps=1",
            "train.save_every=100", *sets])

    def losses(out):
        return [{k: r[k] for k in ("step", "total", "lovasz", "ce", "feature", "grad_norm")}
                for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]

    full, part = tmp_path / "full", tmp_path / "part"
    training.train(cfg(full, "train.batch_size=2"))
    training.train(cfg(part, "train.batch_size=2", "train.max_steps=2"))
    again = tmp_path / "again"
    shutil.copytree(part, again)
    with pytest.raises(training.TrainSetupError, match="global batch of 2 .* this run has 1"):
        training.train(cfg(part, "train.batch_size=1"), resume=True)
    training.train(cfg(part, "train.batch_size=2"), resume=True)
    assert [r["step"] for r in losses(full)] == [1, 2, 3, 4]
    assert losses(part) == losses(full)  # bit-identical, dropout and GridMask on
    wa, wb = load_file(str(full / "student.safetensors")), load_file(str(part / "student.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    training.train(cfg(again, "train.grad_accum_steps=2"), resume=True)  # same global batch: accepted
    assert [r["step"] for r in losses(again)] == [1, 2, 3, 4]
