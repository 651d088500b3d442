#!/usr/bin/env python
"""Picture of one sample: the six cameras, the student's zero-shot occupancy (top view and 3D) and the GT.

    python scripts/visualize.py --config configs/pop3d_12ep.yaml --weights runs/pop3d/student.safetensors \
        --text-embeddings data/nuscenes_text_embeddings.safetensors --index 0 --out sample0.png
    python scripts/visualize.py --config configs/tiny.yaml --weights runs/tiny/student.safetensors \
        --random-text-embeddings --teacher --token <sample token> --out /tmp/vis.png

The prediction is the evaluation's (pipeline.md §4.2): occupied voxels take the class of the best-matching text
prompt. The GT is the ray-cast evaluation GT when the split has lidarseg. ``--teacher`` also runs the live
teacher at the LiDAR projections and draws its targets on the images as dots coloured by a 3-component PCA
(similar colours = similar CLIP features). Top views: x to the right, y (forwards) up, ego car at the triangle.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pop3d.config import add_config_arguments, config_from_args


def save_figure_atomic(fig, out: Path, dpi: int) -> None:
    """Write ``fig`` as PNG to a temporary file next to ``out``, then rename it over ``out``."""
    from p3d_common.atomic import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--weights", required=True, help="student .safetensors (training output or converted)")
    parser.add_argument("--split", help="split to read (default: data.val_split)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, default=0, help="sample number in shard order (default 0)")
    which.add_argument("--token", help="sample token")
    parser.add_argument("--text-embeddings", help="text embeddings .safetensors (default: eval.text_embeddings)")
    parser.add_argument("--random-text-embeddings", action="store_true",
                        help="random prompt vectors (no CLIP weights needed): the colours mean nothing")
    parser.add_argument("--teacher", action="store_true",
                        help="also run the live teacher and draw its targets on the images (PCA colours)")
    parser.add_argument("--no-3d", action="store_true", help="leave out the 3D voxel view (faster)")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    if args.index < 0:
        parser.error("--index must be >= 0")
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    from pop3d.cli_checks import require_student_inputs, user_errors

    split = args.split or cfg.data.val_split
    try:  # every check a user can fail comes before the work
        text_path = require_student_inputs(args, cfg, split)
        return run(args, cfg, split, text_path)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args, cfg, split: str, text_path: str | None) -> int:
    import torch

    from pop3d.cli_checks import UserInputError, load_student
    from pop3d.config import config_to_dict
    from pop3d.evaluate import predict_sample, select_text_prompts
    from pop3d.factory import build_student, grid_spec_of
    from pop3d.metrics import voxel_prediction
    from pop3d.visualize import render_sample, teacher_pca_colors
    from shards.loader import read_sample

    device = torch.device(args.device)
    try:
        prompts = select_text_prompts(text_path, args.random_text_embeddings, cfg.model.feature_dim)
    except ValueError as exc:  # no embeddings given, or of another width
        raise UserInputError(str(exc)) from exc

    model = build_student(cfg)
    report = load_student(model, args.weights, args.config, config_to_dict(cfg.model))
    print(f"weights {args.weights}: {report}")
    grid = grid_spec_of(cfg)
    token = args.token
    try:
        batch = read_sample(cfg.data.shards, split, grid, index=None if token else args.index, token=token)
    except (LookupError, ValueError) as exc:
        raise UserInputError(str(exc)) from exc
    token = batch["tokens"][0]

    model.to(device).eval()
    with torch.no_grad():
        out = predict_sample(model, batch, device, cfg.data.student_image_hw)
        pred = voxel_prediction(out.logits_vox[0].float(), out.logits_vox_fts[0].float(),
                                prompts.embeddings.to(device), prompts.prompt_class.to(device),
                                cfg.eval.normalized_cosine).cpu()

    teacher_points = None
    if args.teacher:
        from teacher.live import build_teacher_from_config

        # build_teacher_from_config warns loudly itself when teacher.weights is null (random weights).
        teacher = build_teacher_from_config(cfg.teacher, device=device)
        feats = teacher(batch["images"].to(device), batch["proj_batch"].to(device), batch["proj_cam"].to(device),
                        batch["proj_rowcol"].to(device))
        teacher_points = (batch["proj_cam"], batch["proj_rowcol"], teacher_pca_colors(feats.float().cpu()))
        print(f"teacher: {feats.shape[0]} targets of {feats.shape[1]} dims")

    gt = batch["eval_gt"][0] if batch.get("eval_gt") is not None else None
    notes = []
    if args.random_text_embeddings:
        notes.append("RANDOM text embeddings")
    elif text_path:
        from teacher.checkpoint import load_text_embeddings

        if load_text_embeddings(text_path)[2].get("source") == "random":  # text_embeddings.py --random
            notes.append("RANDOM text tower")
    if args.teacher and cfg.teacher.weights is None:
        notes.append("RANDOM teacher")
    title = f"{split} sample {token}  |  weights {Path(args.weights).name}"
    if notes:
        title += "  |  " + ", ".join(notes) + " (meaningless colours)"
    fig = render_sample(batch["images"][0], pred, gt, teacher_points, title=title, grid=grid,
                        show_3d=not args.no_3d, dpi=args.dpi)
    save_figure_atomic(fig, args.out, args.dpi)
    print(f"wrote {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
