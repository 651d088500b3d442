"""Conversion of the official checkpoints to safetensors, refusals and load reports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _student_refs import FIXTURE, micro_config

from p3d_common.safetensors_io import CheckpointError, load_safetensors
from pop3d.checkpoint import convert_fcos3d_checkpoint, convert_pop3d_checkpoint, load_student_weights
from pop3d.model import StudentConfig, TPVFormer


def _fixture_cfg() -> StudentConfig:
    return StudentConfig.from_dict(json.loads((Path(FIXTURE) / "config.json").read_text()))


@pytest.mark.skipif(not Path(FIXTURE).is_dir(), reason="student fixture not available")
def test_pop3d_conversion_roundtrip_and_strict_load(tmp_path, capsys):
    cfg = _fixture_cfg()
    dst = tmp_path / "s.safetensors"
    convert_pop3d_checkpoint(Path(FIXTURE) / "state_dict.pth", dst, cfg)
    printed = capsys.readouterr().out
    assert "784 keys mapped" in printed and "stripped 'module.' from 784" in printed
    tensors, meta = load_safetensors(dst)
    assert meta["kind"] == "pop3d" and meta["epoch"] == "12"
    assert tensors["img_backbone.bn1.num_batches_tracked"].dtype == torch.int64
    model = TPVFormer(cfg)
    report = load_student_weights(model, dst, kind="pop3d")
    assert len(report.loaded) == 784 and not report.missing
    src = torch.load(Path(FIXTURE) / "state_dict.pth", weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, src["module." + k]), k
    with pytest.raises(CheckpointError, match="kind='pop3d'"):
        load_student_weights(model, dst, kind="fcos3d")


@pytest.mark.skipif(not Path(FIXTURE).is_dir(), reason="student fixture not available")
def test_converter_refuses_files_that_do_not_fit(tmp_path):
    cfg = _fixture_cfg()
    src = torch.load(Path(FIXTURE) / "state_dict.pth", weights_only=True)
    # wrong config: dim 64 instead of 32 -> shape mismatches named
    wrong = StudentConfig.from_dict({**cfg.to_dict(), "dim": 64})
    with pytest.raises(CheckpointError, match=r"shape mismatches: tpv_head\.level_embeds \(4, 32\) vs expected \(4, 64\)"):
        convert_pop3d_checkpoint(Path(FIXTURE) / "state_dict.pth", tmp_path / "x.safetensors", wrong, verbose=False)
    # a missing and an unexpected key
    sd = dict(src["state_dict"])
    sd.pop("module.tpv_aggregator.classifier.bias")
    sd["module.tpv_aggregator.decoder_dino.0.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(CheckpointError) as exc:
        convert_pop3d_checkpoint(bad, tmp_path / "y.safetensors", cfg, verbose=False)
    msg = str(exc.value)
    assert "1 missing: tpv_aggregator.classifier.bias" in msg
    assert "1 unexpected: tpv_aggregator.decoder_dino.0.weight" in msg and str(bad) in msg
    assert not (tmp_path / "y.safetensors").exists()
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        convert_pop3d_checkpoint(tmp_path / "nope.pth", tmp_path / "z.safetensors", cfg)


def _fake_fcos3d(cfg: StudentConfig, prefix_style: str = "img") -> dict[str, torch.Tensor]:
    """An FCOS3D/DETR3D-like state dict made from a random model: old DCN names, a detection head."""
    torch.manual_seed(0)
    model = TPVFormer(cfg)
    out = {}
    for k, v in model.state_dict().items():
        if not k.startswith(("img_backbone.", "img_neck.")):
            continue
        if k.endswith("num_batches_tracked") and "layer4" in k:
            continue  # old files may lack the counters
        k = k.replace(".conv2.conv_offset.", ".conv2_offset.")
        if prefix_style == "raw":
            k = k.replace("img_backbone.", "backbone.").replace("img_neck.", "neck.")
        out["module." + k] = v + 0.5 if v.is_floating_point() else v
    out["module.pts_bbox_head.cls_out.weight"] = torch.zeros(10, 4)
    return out


@pytest.mark.parametrize("style", ["img", "raw"])
def test_fcos3d_conversion_and_load_report(tmp_path, style, capsys):
    cfg = micro_config()
    sd = _fake_fcos3d(cfg, style)
    src = tmp_path / "fcos3d.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 1}}, src)
    dst = tmp_path / "fcos3d.safetensors"
    res = convert_fcos3d_checkpoint(src, dst, cfg)
    printed = capsys.readouterr().out
    assert "left uninitialised" in printed and "tpv_head" in printed and "tpv_aggregator" in printed
    assert res.renamed > 0 and res.dropped == ["module.pts_bbox_head.cls_out.weight".replace("module.", "")]
    assert res.neck_dropped is None and res.filled
    model = TPVFormer(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_student_weights(model, dst, kind="fcos3d")
    assert {k.split(".")[0] for k in report.missing} == {"tpv_head", "tpv_aggregator"}
    assert not any(k.startswith(("img_backbone.", "img_neck.")) for k in report.missing)
    key = "img_backbone.layer3.0.conv2.conv_offset.weight"
    old = key.replace(".conv2.conv_offset.", ".conv2_offset.")
    if style == "raw":
        old = old.replace("img_backbone.", "backbone.")
    torch.testing.assert_close(model.state_dict()[key], sd["module." + old])
    assert torch.equal(model.state_dict()["tpv_head.level_embeds"], before["tpv_head.level_embeds"])
    assert "left uninitialised" in report.summary()


def test_fcos3d_refusals_and_neck_fallback(tmp_path):
    cfg = micro_config()
    sd = _fake_fcos3d(cfg)
    # a backbone key missing -> refused, naming it
    sd_missing = dict(sd)
    sd_missing.pop("module.img_backbone.layer2.1.conv1.weight")
    src = tmp_path / "a.pth"
    torch.save(sd_missing, src)
    with pytest.raises(CheckpointError, match=r"missing: img_backbone\.layer2\.1\.conv1\.weight"):
        convert_fcos3d_checkpoint(src, tmp_path / "a.safetensors", cfg, verbose=False)
    # a neck with other shapes (e.g. DETR3D with another width) -> neck dropped and reported
    sd_neck = {k: (torch.zeros(3, 3) if "img_neck.fpn_convs.0.conv.weight" in k else v) for k, v in sd.items()}
    torch.save(sd_neck, tmp_path / "b.pth")
    res = convert_fcos3d_checkpoint(tmp_path / "b.pth", tmp_path / "b.safetensors", cfg, verbose=False)
    assert res.neck_dropped and "img_neck.fpn_convs.0.conv.weight" in res.neck_dropped
    assert any(k.startswith("img_neck.") for k in res.uninitialised)
    model = TPVFormer(cfg)
    rep = load_student_weights(model, tmp_path / "b.safetensors", kind="fcos3d")
    assert any(k.startswith("img_neck.") for k in rep.missing)
