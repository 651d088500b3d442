#!/usr/bin/env python
"""Zero-shot 3D semantic segmentation mIoU of a trained student (pipeline.md §4).

    python scripts/eval.py --config configs/pop3d_12ep.yaml --weights runs/pop3d/student.safetensors \
        --text-embeddings data/nuscenes_text_embeddings.safetensors

Prints the per-class IoU table and writes JSON next to the weights (or --out). ``miou_official`` counts classes
absent from the GT as IoU 1 (the original's rule, comparable with the published 16.66 on the full val split);
``miou_present`` averages the classes present.

Several processes (each reads its own val shards; the confusion counts are summed, so the numbers are
exactly the one-process numbers): ``accelerate launch --num_processes N scripts/eval.py ...`` (on CPU-only
machines add ``--multi_gpu``).

``--protocol occ3d`` (or ``both``) scores on Occ3D-nuScenes instead (or as well); see pop3d/occ3d.py:

    python scripts/eval.py ... --protocol both --occ3d-gt /data/occ3d-nuscenes   # schema-2 shards: --nuscenes-dataroot
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pop3d.config import add_config_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--weights", required=True, help="student .safetensors (training output or converted)")
    parser.add_argument("--text-embeddings", help="text embeddings .safetensors (default: eval.text_embeddings)")
    parser.add_argument("--random-text-embeddings", action="store_true",
                        help="random prompt vectors (quick start without CLIP weights): the numbers mean nothing")
    parser.add_argument("--split", help="split to evaluate (default: data.val_split)")
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON results path")
    from pop3d.occ3d import add_occ3d_arguments  # Occ3D-nuScenes protocol (pop3d/occ3d.py)

    add_occ3d_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    from pop3d.cli_checks import require_student_inputs, user_errors

    split = args.split or cfg.data.val_split
    try:  # every check a user can fail comes before the work
        text_path = require_student_inputs(args, cfg, split, need_lidarseg=True)
        from pop3d.evaluate_run import run_evaluation

        return run_evaluation(cfg, split, weights=args.weights, config_path=args.config, text_path=text_path,
                              random_text=args.random_text_embeddings, device=args.device,
                              max_samples=args.max_samples, out=args.out, occ3d_options=args)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
