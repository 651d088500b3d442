"""Parity with the official MaskCLIP+ extraction (tests/fixtures/teacher_tiny) and the converter."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _paths import FIXTURES

from teacher.checkpoint import convert_maskclip_plus, load_maskclip_plus
from teacher.parity import check_teacher_fixture
from teacher.weights_io import UNSAFE_FLAG, CheckpointError

FIXTURE = FIXTURES / "teacher_tiny"
needs_fixture = pytest.mark.skipif(not (FIXTURE / "outputs.pt").is_file(), reason="teacher fixture not present")


@needs_fixture
def test_parity_with_official_extraction():
    res = check_teacher_fixture(FIXTURE)
    print({k: res[k] for k in ("from_resized", "from_raw", "from_raw_float_resize", "grid_sample_from_resized")})
    assert res["from_resized"]["max_abs"] <= 1e-4
    assert res["ok"]
    assert res["min_feature"] >= 0
    # from the raw image (our cv2 emulation, ±1 on ~0.02% of the values) the error stays small
    assert res["resize_frac_values_differing"] < 1e-3
    assert res["from_raw"]["max_abs"] <= 1e-3
    assert res["from_raw"]["min_cosine"] > 0.99999


@needs_fixture
def test_converter_drops_and_reports(tmp_path, capsys):
    dst = tmp_path / "t.safetensors"
    summary = convert_maskclip_plus(FIXTURE / "state_dict.pth", dst)
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "decode_head.text_embeddings" in line and "_iter_counter" in line
    assert summary["kept"] == 330 + 24
    model = load_maskclip_plus(dst)
    assert model.arch.depth == 50


def _released_like(tmp_path: Path) -> Path:
    """A checkpoint in the released layout: module. prefix, clip/proj/171-class text, optimizer, meta."""
    sd = torch.load(FIXTURE / "state_dict.pth", weights_only=True)["state_dict"]
    sd = {f"module.{k}": v for k, v in sd.items()}
    sd["module.decode_head.text_embeddings"] = torch.randn(171, 24)
    sd["module.decode_head.proj.weight"] = torch.randn(24, 16, 1, 1)
    sd["module.decode_head.clip.cls_token"] = torch.randn(1, 1, 16)
    sd["module.decode_head.clip.layers.0.ln1.weight"] = torch.randn(16)
    path = tmp_path / "released.pth"
    torch.save({"state_dict": sd, "meta": {"CLASSES": ["a", "b"]}, "optimizer": {"state": {}}}, path)
    return path


@needs_fixture
def test_converter_released_layout(tmp_path, capsys):
    summary = convert_maskclip_plus(_released_like(tmp_path), tmp_path / "o.safetensors")
    line = capsys.readouterr().out
    assert "[171, 24]" in line and "decode_head.clip." in line and "proj.weight" in line and "optimizer" in line
    assert summary["kept"] == 354


@needs_fixture
def test_converter_names_offending_keys(tmp_path):
    sd = torch.load(FIXTURE / "state_dict.pth", weights_only=True)["state_dict"]
    del sd["backbone.layer2.1.conv2.weight"]
    sd["backbone.layer2.1.conv9.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"layer2\.1\.conv2\.weight.*layer2\.1\.conv9\.weight"):
        convert_maskclip_plus(tmp_path / "bad.pth", tmp_path / "bad.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_refuses_unsafe_pickle_without_flag(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": _Evil()}, path)
    with pytest.raises(CheckpointError) as err:
        convert_maskclip_plus(path, tmp_path / "x.safetensors")
    assert UNSAFE_FLAG in str(err.value) and str(path) in str(err.value)
