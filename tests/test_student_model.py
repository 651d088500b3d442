"""Structure, configuration, input checks, GridMask, batching and training behaviour of the student."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _paths import SPEC
from _student_refs import ica_forward_loop, micro_config, random_rig

from pop3d.model import StudentConfig, TPVFormer
from pop3d.model.grid_mask import GridMask, grid_mask_pattern

TSV = str(SPEC / "student_state_dict_keys.tsv")


def test_paper_config_state_dict_matches_official_listing():
    cfg = StudentConfig()
    assert (cfg.tpv_h, cfg.tpv_w, cfg.tpv_z, cfg.dim, cfg.levels) == (100, 100, 8, 256, 4)
    assert cfg.fpn_in_channels == (512, 1024, 2048) and cfg.ffn_dim == 512 and cfg.pos_feats == 128
    with torch.device("meta"):
        model = TPVFormer(cfg)
    sd = model.state_dict()
    rows = [line.split("\t") for line in Path(TSV).read_text().splitlines() if line and not line.startswith("#")]
    assert len(rows) == 818
    assert list(sd) == [k for k, _ in rows]  # same keys, same order
    for k, shape in rows:
        assert str(list(sd[k].shape)) == shape, k
    assert sum(p.numel() for p in model.parameters()) == 64_626_752
    groups = {g: sum(1 for k in sd if k.startswith(g + ".")) for g in
              ("img_backbone", "img_neck", "tpv_head", "tpv_aggregator")}
    assert groups == {"img_backbone": 676, "img_neck": 14, "tpv_head": 116, "tpv_aggregator": 12}


def test_frozen_parts_and_config_errors():
    with torch.device("meta"):
        model = TPVFormer(StudentConfig())
    bb = model.img_backbone
    assert not any(p.requires_grad for p in bb.conv1.parameters())
    assert not any(p.requires_grad for p in bb.layer1.parameters())
    assert all(p.requires_grad for n, p in bb.layer2.named_parameters() if "bn" not in n and "downsample.1" not in n)
    assert not any(p.requires_grad for n, p in bb.named_parameters() if ".bn" in n or n.startswith("bn"))
    with pytest.raises(ValueError, match="num_points\\[1\\] must be"):
        StudentConfig(num_points=(8, 60, 64))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        StudentConfig(dim=100, num_heads=8)
    with pytest.raises(ValueError, match="levels must be >= 3"):
        StudentConfig(levels=2)
    with pytest.raises(ValueError, match="unknown StudentConfig keys"):
        StudentConfig.from_dict({"kind": "student", "tpv_hh": 3})
    cfg = StudentConfig.from_dict({"kind": "student", "tpv_h": 10, "dim": 32, "num_points_in_pillar": [2, 4, 4],
                                   "num_points": [4, 8, 8], "base_channels": 8})
    assert cfg.ffn_dim == 64 and cfg.fpn_in_channels == (64, 128, 256) and cfg.num_points_in_pillar == (2, 4, 4)
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg


def _inputs(cfg, b=1, h=32, w=64, n_pts=20, n_ft=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(b, cfg.num_cams, 3, h, w, generator=g)
    size = torch.tensor([cfg.tpv_w, cfg.tpv_h, cfg.tpv_z], dtype=torch.float32)
    pts = torch.rand(b, n_pts, 3, generator=g) * size
    ft = torch.rand(b, n_ft, 3, generator=g) * size
    return imgs, random_rig(b, cfg.num_cams, h, w, seed), pts, ft


@pytest.fixture(scope="module")
def micro_model():
    torch.manual_seed(0)
    model = TPVFormer(micro_config(attention_backend="pytorch")).eval()
    with torch.no_grad():  # make the head non-trivial (offset weights are zero at init)
        for n, p in model.tpv_head.named_parameters():
            if "sampling_offsets.weight" in n:
                p.normal_(std=0.05)
    return model


def test_bad_inputs_give_clear_errors(micro_model):
    cfg = micro_model.cfg
    imgs, l2i, pts, ft = _inputs(cfg)
    with pytest.raises(ValueError, match="has 5 cameras.*num_cams=6"):
        micro_model(imgs[:, :5], l2i[:, :5])
    with pytest.raises(ValueError, match="not a multiple of 32.*pad the images"):
        micro_model(imgs[..., :40], l2i)
    with pytest.raises(ValueError, match="lidar2img must have shape"):
        micro_model(imgs, l2i[:, :, :3])
    with pytest.raises(ValueError, match="points must have shape"):
        micro_model(imgs, l2i, points=pts[..., :2])
    with pytest.raises(ValueError, match="features must have shape"):
        micro_model(imgs, l2i, features=ft[0])
    with pytest.raises(ValueError, match="normalised float"):
        micro_model(imgs.to(torch.uint8), l2i)


def test_output_shapes_and_optional_branches(micro_model):
    cfg = micro_model.cfg
    imgs, l2i, pts, ft = _inputs(cfg)
    with torch.no_grad():
        out = micro_model(imgs, l2i, (32, 64), points=pts, features=ft)
        out_nv = micro_model(imgs, l2i, (32, 64), points=pts, features=ft, voxel_features=False)
        out_none = micro_model(imgs, l2i)
    grid = (cfg.tpv_w, cfg.tpv_h, cfg.tpv_z)
    assert out.logits_vox.shape == (1, 2, *grid)
    assert out.logits_pts.shape == (1, 2, 20, 1, 1)
    assert out.logits_vox_fts.shape == (1, cfg.feature_dim, *grid)
    assert out.logits_pts_fts.shape == (1, 10, cfg.feature_dim)
    assert out_nv.logits_vox_fts is None
    torch.testing.assert_close(out_nv.logits_pts_fts, out.logits_pts_fts, atol=1e-5, rtol=1e-5)
    assert out_none.logits_pts is None and out_none.logits_pts_fts is None
    torch.testing.assert_close(out_none.logits_vox, out.logits_vox)
    # a point at a cell centre equals that voxel's prediction
    centre = torch.tensor([[[3.5, 2.5, 1.5]]])
    with torch.no_grad():
        o = micro_model(imgs, l2i, points=centre, features=centre)
    torch.testing.assert_close(o.logits_pts[0, :, 0, 0, 0], o.logits_vox[0, :, 3, 2, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.logits_pts_fts[0, 0], o.logits_vox_fts[0, :, 3, 2, 1], atol=1e-5, rtol=1e-5)


def test_vectorised_rebatch_equals_original_loop(micro_model):
    cfg = micro_model.cfg
    imgs, l2i, _, _ = _inputs(cfg)
    head = micro_model.tpv_head
    with torch.no_grad():
        feats = micro_model.extract_img_feat(imgs)
        captured = {}
        ica = head.encoder.layers[0].attentions[1]

        def hook(mod, args, kwargs, out):
            captured["args"], captured["out"] = args, out

        h = ica.register_forward_hook(hook, with_kwargs=True)
        head(feats, l2i, (32, 64))
        h.remove()
        query, value, _, shapes = captured["args"]
        from pop3d.model.encoder import point_sampling
        refs, masks = zip(*(point_sampling(r, head.encoder.pc_range, l2i, (32, 64))
                            for r in (head.encoder.ref_3d_hw, head.encoder.ref_3d_zh, head.encoder.ref_3d_wz)))
        loop = ica_forward_loop(ica, query, value, list(refs), list(masks), shapes)
    assert any(m.any(-1).sum() < m.shape[2] * 6 for m in masks)  # not every query visible everywhere
    torch.testing.assert_close(captured["out"], loop, atol=1e-6, rtol=1e-5)


def test_batch_of_two_equals_two_single_samples(micro_model):
    cfg = micro_model.cfg
    imgs, l2i, pts, ft = _inputs(cfg, b=2)
    with torch.no_grad():
        both = micro_model(imgs, l2i, points=pts, features=ft)
        for i in range(2):
            one = micro_model(imgs[i:i + 1], l2i[i:i + 1], points=pts[i:i + 1], features=ft[i:i + 1])
            for k, v in one.as_dict().items():
                torch.testing.assert_close(getattr(both, k)[i:i + 1], v, atol=1e-5, rtol=1e-4, msg=k)


def _original_grid_mask(h, w, d, st_h, st_w, ratio=0.5):
    """numpy transcription of the original's loops (rotation by 0 degrees is the identity), mode 1."""
    hh, ww = int(1.5 * h), int(1.5 * w)
    lw = min(max(int(d * ratio + 0.5), 1), d - 1)
    mask = np.ones((hh, ww), np.float32)
    for i in range(hh // d):
        s = d * i + st_h
        mask[s:min(s + lw, hh), :] = 0
    for i in range(ww // d):
        s = d * i + st_w
        mask[:, s:min(s + lw, ww)] = 0
    mask = mask[(hh - h) // 2:(hh - h) // 2 + h, (ww - w) // 2:(ww - w) // 2 + w]
    return 1 - mask


def test_grid_mask_pattern_statistics_and_training_only():
    rng = np.random.default_rng(0)
    fracs = []
    for _ in range(40):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 90))
        d = int(rng.integers(2, h))
        st_h, st_w = int(rng.integers(d)), int(rng.integers(d))
        got = grid_mask_pattern(h, w, d, st_h, st_w).numpy()
        np.testing.assert_array_equal(got, _original_grid_mask(h, w, d, st_h, st_w))
        fracs.append(1 - got.mean())
    assert 0.15 < float(np.mean(fracs)) < 0.35  # ~25 % zeroed
    gm = GridMask(prob=1.0)
    x = torch.randn(6, 3, 64, 96) + 10
    gm.train()
    y = gm(x, torch.Generator().manual_seed(1))
    zero = y == 0
    assert (zero == zero[:1, :1]).all()  # one mask for every camera and channel
    assert 0.1 < zero.float().mean() < 0.45
    gm.eval()
    assert gm(x) is x
    gm_never = GridMask(prob=0.0).train()
    assert torch.equal(gm_never(x), x)


def test_training_step_gradients_and_checkpointing_equivalence():
    cfg = micro_config(attention_backend="pytorch", dropout=0.0, grid_mask=False)
    torch.manual_seed(1)
    model = TPVFormer(cfg).train()
    cfg_ck = micro_config(attention_backend="pytorch", dropout=0.0, grid_mask=False, activation_checkpointing=True)
    model_ck = TPVFormer(cfg_ck).train()
    model_ck.load_state_dict(model.state_dict())
    imgs, l2i, pts, ft = _inputs(cfg)
    rm = model.img_backbone.layer2[0].bn1.running_mean.clone()
    grads = []
    for m in (model, model_ck):
        out = m(imgs, l2i, points=pts, features=ft, voxel_features=False)
        loss = out.logits_vox.square().mean() + out.logits_pts.mean() + out.logits_pts_fts.square().mean()
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    g = grads[0]
    assert not any(n.startswith(("img_backbone.conv1", "img_backbone.bn1", "img_backbone.layer1")) for n in g)
    assert not any(".bn" in n for n in g)
    assert "img_backbone.layer3.0.conv2.conv_offset.weight" in g
    assert "tpv_head.encoder.layers.0.attentions.1.deformable_attention.value_proj.weight" in g
    assert torch.equal(model.img_backbone.layer2[0].bn1.running_mean, rm)
    assert set(grads[0]) == set(grads[1])
    for n in g:
        torch.testing.assert_close(grads[1][n], g[n], atol=1e-5, rtol=1e-4, msg=n)


def test_bf16_autocast_forward_backward_keeps_geometry_fp32():
    cfg = micro_config(attention_backend="pytorch", activation_checkpointing=True)
    model = TPVFormer(cfg).train()
    imgs, l2i, pts, ft = _inputs(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plans = model.tpv_head.encoder.geometry(l2i, (32, 64))
        out = model(imgs, l2i, points=pts, features=ft, voxel_features=False)
    assert all(p.ref.dtype == torch.float32 for p in plans)
    (out.logits_vox.float().mean() + out.logits_pts_fts.float().mean()).backward()
    assert model.tpv_head.tpv_embedding_hw.weight.grad is not None
