"""``scripts/visualize.py``'s run: one sample through the student (and the teacher), drawn to a PNG.

The script parses its arguments and runs the pre-work checks (pop3d/cli_checks.py); this module does the rest.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def save_figure_atomic(fig, out: Path, dpi: int) -> None:
    """Write ``fig`` as PNG to a temporary file next to ``out``, then rename it over ``out``."""
    from p3d_common.atomic import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def predict_classes(model, batch, prompts, cfg, device) -> torch.Tensor:
    """Zero-shot class ids of one sample's voxels: int (X, Y, Z) on the CPU."""
    from pop3d.evaluate import predict_sample
    from pop3d.metrics import voxel_prediction

    model.to(device).eval()
    with torch.no_grad():
        out = predict_sample(model, batch, device, cfg.data.student_image_hw)
        return voxel_prediction(out.logits_vox[0].float(), out.logits_vox_fts[0].float(),
                                prompts.embeddings.to(device), prompts.prompt_class.to(device),
                                cfg.eval.normalized_cosine).cpu()


def teacher_dots(cfg, batch, device):
    """The live teacher's targets of one sample as ``(cam (M,), rowcol (M, 2), PCA rgb uint8 (M, 3))``."""
    from pop3d.visualize import teacher_pca_colors
    from pop3d.factory import build_run_teacher

    # the teacher warns loudly itself when teacher.weights is null (random weights: seeded from the config)
    teacher = build_run_teacher(cfg, device)
    feats = teacher(batch["images"].to(device), batch["proj_batch"].to(device), batch["proj_cam"].to(device),
                    batch["proj_rowcol"].to(device))
    dots = (batch["proj_cam"], batch["proj_rowcol"], teacher_pca_colors(feats.float().cpu()))
    print(f"teacher: {feats.shape[0]} targets of {feats.shape[1]} dims")
    return dots


def figure_title(split: str, token: str, weights, random_text: bool, text_path: str | None,
                 random_teacher: bool) -> str:
    """Split, token and weights; "meaningless colours" with what is random (text, text tower, teacher)."""
    notes = []
    if random_text:
        notes.append("RANDOM text embeddings")
    elif text_path:
        from teacher.checkpoint import load_text_embeddings

        if load_text_embeddings(text_path)[2].get("source") == "random":  # text_embeddings.py --random
            notes.append("RANDOM text tower")
    if random_teacher:
        notes.append("RANDOM teacher")
    title = f"{split} sample {token}  |  weights {Path(weights).name}"
    if notes:
        title += "  |  " + ", ".join(notes) + " (meaningless colours)"
    return title


def run_visualization(cfg, split: str, *, weights: str | os.PathLike, config_path: str | os.PathLike,
                      text_path: str | None, random_text: bool, device: str, index: int, token: str | None,
                      teacher: bool, show_3d: bool, dpi: int, out: Path) -> int:
    """Draw the sample ``token`` (or number ``index``) of ``split``: cameras, top views, legend, 3D; write ``out``.

    Returns the exit status 0. Raises :class:`pop3d.cli_checks.UserInputError` for text embeddings or a sample
    a user can fix.
    """
    from pop3d.cli_checks import UserInputError
    from pop3d.evaluate import select_text_prompts
    from pop3d.evaluate_run import load_reported_student
    from pop3d.factory import grid_spec_of
    from pop3d.visualize import render_sample
    from shards.loader import read_sample

    dev = torch.device(device)
    try:
        prompts = select_text_prompts(text_path, random_text, cfg.model.feature_dim)
    except ValueError as exc:  # no embeddings given, or of another width
        raise UserInputError(str(exc)) from exc
    model = load_reported_student(cfg, weights, config_path)
    grid = grid_spec_of(cfg)
    try:
        batch = read_sample(cfg.data.shards, split, grid, index=None if token else index, token=token)
    except (LookupError, ValueError) as exc:
        raise UserInputError(str(exc)) from exc
    token = batch["tokens"][0]
    pred = predict_classes(model, batch, prompts, cfg, dev)
    teacher_points = teacher_dots(cfg, batch, dev) if teacher else None
    gt = batch["eval_gt"][0] if batch.get("eval_gt") is not None else None
    title = figure_title(split, token, weights, random_text, text_path, teacher and cfg.teacher.weights is None)
    fig = render_sample(batch["images"][0], pred, gt, teacher_points, title=title, grid=grid,
                        show_3d=show_3d, dpi=dpi)
    save_figure_atomic(fig, out, dpi)
    print(f"wrote {out.resolve()}")
    return 0
