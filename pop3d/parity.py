"""Parity of this reimplementation with outputs of the official POP-3D code (``tests/fixtures``)."""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch

from pop3d.checkpoint import convert_pop3d_checkpoint, load_student_weights
from pop3d.model import StudentConfig, TPVFormer

OUTPUT_NAMES = ("logits_vox", "logits_pts", "logits_vox_fts", "logits_pts_fts")


def undo_inplace_normalisation(coords: torch.Tensor, grid_size: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
    """Recover grid coordinates that the official aggregator normalised *in place*.

    The official ``TPVAggregator.forward`` does ``features = features.reshape(...).float()`` (a view of the
    caller's tensor) and then ``features[..., i] = features[..., i] / size_i * 2 - 1``, so every call rewrites
    the caller's ``feature_points``. A fixture saved after k calls therefore holds coordinates normalised k
    times (``student_tiny`` holds k = 2, while ``outputs.pt`` belongs to the raw coordinates). Genuine grid
    coordinates lie in [0, size]; this undoes the normalisation (in float64) until they do.
    Returns (coordinates (B, n, 3) float32, k).
    """
    size = torch.tensor(grid_size, dtype=torch.float64)
    g, k = coords.double(), 0
    while (g < 0).any() and k < 4:
        g, k = (g + 1) / 2 * size, k + 1
    if (g < 0).any() or (g > size).any():
        raise ValueError(f"coordinates do not look like grid coordinates in [0, {list(grid_size)}] even after "
                         f"undoing {k} in-place normalisations")
    return g.to(coords.dtype), k


def run_student_fixture(fixture_dir: str | Path, backend: str = "pytorch", verbose: bool = False,
                        repair_inputs: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Build from ``config.json``, convert ``state_dict.pth`` with our converter, load, run eval-mode on
    ``inputs.pt`` like ``model(img, img_metas, points=points, features=feature_points)``.

    With ``repair_inputs`` the fixture's ``points``/``feature_points`` are passed through
    :func:`undo_inplace_normalisation` (a warning names how many normalisations were undone).
    Returns (ours, reference) dicts of the four outputs."""
    fixture_dir = Path(fixture_dir)
    cfg = StudentConfig.from_dict(json.loads((fixture_dir / "config.json").read_text()))
    cfg.attention_backend = backend
    model = TPVFormer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "student.safetensors"
        convert_pop3d_checkpoint(fixture_dir / "state_dict.pth", dst, cfg, verbose=verbose)
        load_student_weights(model, dst, kind="pop3d")
    model.eval()
    inputs = torch.load(fixture_dir / "inputs.pt", map_location="cpu", weights_only=True)
    ref = torch.load(fixture_dir / "outputs.pt", map_location="cpu", weights_only=True)
    lidar2img = inputs["lidar2img"]
    points, feature_points = inputs["points"], inputs["feature_points"]
    if repair_inputs:
        grid = (cfg.tpv_w, cfg.tpv_h, cfg.tpv_z)
        points, k_pts = undo_inplace_normalisation(points, grid)
        feature_points, k_ft = undo_inplace_normalisation(feature_points, grid)
        if k_pts or k_ft:
            warnings.warn(f"{fixture_dir}/inputs.pt: points/feature_points were normalised in place by the "
                          f"official model {k_pts}/{k_ft} time(s) before being saved; undone for the comparison "
                          f"(the fixture should be regenerated from a clone of its inputs)", stacklevel=2)
    if lidar2img.dim() == 3:
        lidar2img = lidar2img[None]
    with torch.no_grad():
        out = model(inputs["imgs"], lidar2img, img_shape=tuple(inputs["img_shape"]), points=points,
                    features=feature_points, voxel_features=True)
    return out.as_dict(), {k: ref[k] for k in OUTPUT_NAMES}


def check_student_fixture(fixture_dir: str | Path, backend: str = "pytorch",
                          repair_inputs: bool = True) -> list[tuple[str, float]]:
    """[(output_name, max_abs_err)] of our outputs vs the fixture's ``outputs.pt`` (shape mismatch -> inf)."""
    ours, ref = run_student_fixture(fixture_dir, backend, repair_inputs=repair_inputs)
    result = []
    for name in OUTPUT_NAMES:
        a, b = ours[name], ref[name]
        if a is None or tuple(a.shape) != tuple(b.shape):
            result.append((name, float("inf")))
        else:
            result.append((name, float((a.float() - b.float()).abs().max())))
    return result
