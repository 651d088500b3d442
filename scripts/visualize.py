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
        from pop3d.visualize_run import run_visualization

        return run_visualization(cfg, split, weights=args.weights, config_path=args.config, text_path=text_path,
                                 random_text=args.random_text_embeddings, device=args.device, index=args.index,
                                 token=args.token, teacher=args.teacher, show_3d=not args.no_3d, dpi=args.dpi,
                                 out=args.out)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
