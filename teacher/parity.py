"""Parity of our teacher with a fixture made by the official MaskCLIP+ extraction (tests/fixtures/teacher_*).

``check_teacher_fixture(fixture_dir) -> dict``: converts ``state_dict.pth`` with our converter, builds the
teacher from the converted file (depth/widths from the checkpoint, preprocessing from config.json), runs it
1. from ``resized_bgr`` (the original's network image, so only the network + sampler are compared) and
2. from ``image_bgr`` with our cv2 fixed-point emulation (default; ±1 on ~0.02% of values) and with the
   float bilinear resize (±1 LSB on ~11% of values),
reads the features at ``pixels_rowcol`` with the exact sampler (and the grid_sample path for information),
and returns max abs / relative errors against ``outputs.pt``'s ``point_features``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from teacher.checkpoint import convert_maskclip_plus, load_maskclip_plus
from teacher.preprocess import bgr_hwc_to_rgb_chw, normalize, rescale_size, resize_uint8, resize_uint8_cv2
from teacher.sampling import ExactSampler, sample_grid

TOLERANCE_FROM_RESIZED = 1e-4


def _errors(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (got.double() - ref.double())
    return {"max_abs": float(diff.abs().max()), "rel_l2": float(diff.norm() / ref.double().norm().clamp_min(1e-30)),
            "min_cosine": float(torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=1).min())}


def check_teacher_fixture(fixture_dir: str | Path) -> dict[str, Any]:
    """Run the parity check; returns a dict with per-path errors and ``ok`` (resized path <= 1e-4)."""
    d = Path(fixture_dir)
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("kind") != "teacher":
        raise ValueError(f"{d}/config.json: kind is {cfg.get('kind')!r}, not 'teacher'")
    inputs = torch.load(d / "inputs.pt", map_location="cpu", weights_only=True)
    outputs = torch.load(d / "outputs.pt", map_location="cpu", weights_only=True)
    ref = outputs["point_features"].float()
    fit = tuple(cfg.get("resize_fit", (2048, 1024)))
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    dilations = tuple(cfg.get("aspp_dilations", (6, 12, 18, 24)))
    if not cfg.get("to_rgb", True):
        raise ValueError(f"{d}/config.json: to_rgb=false is not the extraction's setting")

    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "teacher.safetensors"
        summary = convert_maskclip_plus(d / "state_dict.pth", dst, quiet=True)
        if summary["arch"].aspp_dilations != dilations:
            raise ValueError(f"{d}: config dilations {dilations} differ from the converter default")
        net = load_maskclip_plus(dst)
    arch = summary["arch"]
    for key in ("depth", "base_channels", "stem_channels", "aspp_channels"):
        if key in cfg and int(cfg[key]) != getattr(arch, key):
            raise ValueError(f"{d}: config.json {key}={cfg[key]} but the checkpoint gives {getattr(arch, key)}")

    image = bgr_hwc_to_rgb_chw(inputs["image_bgr"])                 # (1, 3, H, W)
    orig_hw = tuple(image.shape[-2:])
    net_hw = rescale_size(orig_hw, fit)
    resized_ref = bgr_hwc_to_rgb_chw(inputs["resized_bgr"]).float()
    if tuple(resized_ref.shape[-2:]) != net_hw:
        raise ValueError(f"{d}: resized_bgr is {tuple(resized_ref.shape[-2:])}, our resize gives {net_hw}")
    if "network_input_hw" in outputs and tuple(outputs["network_input_hw"]) != net_hw:
        raise ValueError(f"{d}: outputs network_input_hw {outputs['network_input_hw']} != ours {net_hw}")
    resized_ours = resize_uint8_cv2(image, net_hw)
    resized_float = resize_uint8(image, net_hw)
    lsb = (resized_ours - resized_ref).abs()
    lsb_float = (resized_float - resized_ref).abs()

    rowcol = inputs["pixels_rowcol"].long()
    img = torch.zeros(rowcol.shape[0], dtype=torch.long)
    sampler = ExactSampler()
    res: dict[str, Any] = {"fixture": str(d), "arch": str(arch), "points": int(rowcol.shape[0]),
                           "network_input_hw": net_hw, "convert_message": summary["message"],
                           "resize_max_lsb": float(lsb.max()), "resize_frac_values_differing": float((lsb > 0).float().mean()),
                           "float_resize_frac_values_differing": float((lsb_float > 0).float().mean())}
    with torch.inference_mode():
        f_resized = net(normalize(resized_ref, mean, std))
        f_raw = net(normalize(resized_ours, mean, std))
        f_raw_float = net(normalize(resized_float, mean, std))
    res["from_resized"] = _errors(sampler(f_resized, img, rowcol, net_hw, orig_hw), ref)
    res["from_raw"] = _errors(sampler(f_raw, img, rowcol, net_hw, orig_hw), ref)
    res["from_raw_float_resize"] = _errors(sampler(f_raw_float, img, rowcol, net_hw, orig_hw), ref)
    res["grid_sample_from_resized"] = _errors(sample_grid(f_resized, img, rowcol, orig_hw), ref)
    res["min_feature"] = float(f_resized.min())
    res["tolerance_from_resized"] = TOLERANCE_FROM_RESIZED
    res["ok"] = res["from_resized"]["max_abs"] <= TOLERANCE_FROM_RESIZED and res["min_feature"] >= 0
    return res
