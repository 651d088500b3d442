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

    python scripts/eval.py ... --protocol both --occ3d-gt /data/occ3d-nuscenes --nuscenes-dataroot /data/nuscenes
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from pop3d.config import add_config_arguments, config_from_args


def meter_json(meter) -> dict:
    """A MeanIoU's summary and per-class IoUs as strict JSON: an undefined value (a class absent from the GT,
    or no class present) is null, and ``undefined`` counts the null IoUs."""
    def finite(v):
        return v if not isinstance(v, float) or math.isfinite(v) else None

    iou = {k: finite(v) for k, v in zip(meter.names, meter.iou().tolist())}
    return {**{k: finite(v) for k, v in meter.summary().items()}, "iou": iou,
            "undefined": sum(v is None for v in iou.values())}


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
        return run(args, cfg, split, text_path)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args, cfg, split: str, text_path: str | None) -> int:
    import os

    import torch

    from pop3d.cli_checks import UserInputError, load_student
    from p3d_common.atomic import atomic_path
    from pop3d.config import config_to_dict
    from pop3d.evaluate import evaluate, select_text_prompts
    from pop3d.factory import build_student, grid_spec_of
    from shards.loader import make_loader
    from shards.order import eval_loader

    try:
        prompts = select_text_prompts(text_path, args.random_text_embeddings, cfg.model.feature_dim)
    except ValueError as exc:  # no embeddings given, or of another width
        raise UserInputError(str(exc)) from exc
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by accelerate launch / torchrun
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        device = accelerator.device
    else:
        device = torch.device(args.device)
    is_main = accelerator is None or accelerator.is_main_process
    model = build_student(cfg)
    report = load_student(model, args.weights, args.config, config_to_dict(cfg.model))
    print(f"weights {args.weights}: {report}")
    model.to(device)
    occ3d = None
    if args.protocol != "pop3d":
        from pop3d.occ3d import Occ3DError, run_occ3d_protocol

        try:
            occ3d = run_occ3d_protocol(args, cfg, model, prompts, split, device)
        except (Occ3DError, FileNotFoundError) as exc:
            raise UserInputError(str(exc)) from exc
    if args.protocol == "occ3d":
        from pop3d.occ3d import write_occ3d_results

        return write_occ3d_results(args, split, occ3d)
    max_samples = args.max_samples or cfg.eval.max_samples
    from shards.errors import DATA_ERRORS, one_line

    try:  # a damaged / missing / old shard: named shard + sample key, exit 2, no traceback
        if accelerator is not None:  # this rank's shards; counts summed over ranks
            loader = eval_loader(cfg.data.shards, split, grid_spec_of(cfg), rank=accelerator.process_index,
                                 world=accelerator.num_processes, num_workers=cfg.data.num_workers,
                                 max_samples=max_samples)
        else:
            loader = make_loader(cfg.data.shards, split, batch_size=1, num_workers=cfg.data.num_workers,
                                 grid=grid_spec_of(cfg), shuffle=False, eval_gt=True)
        m = evaluate(model, loader, prompts, device=device, student_image_hw=cfg.data.student_image_hw,
                     normalized_cosine=cfg.eval.normalized_cosine, max_samples=max_samples,
                     progress=is_main, accelerator=accelerator)
    except DATA_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    if not is_main:
        return 0
    print(f"\nZero-shot semantic occupancy, voxels vs ray-cast GT, {split} ({m.samples} samples)\n"
          + m.semantic.table())
    print("\nOccupancy (free / occupied), voxels vs ray-cast GT\n" + m.occupancy.table())
    print("\nZero-shot semantic segmentation of the LiDAR points (16 classes)\n" + m.points.table())
    results = {"split": split, "samples": m.samples, "weights": str(args.weights),
               "random_text_embeddings": args.random_text_embeddings}
    for name in ("semantic", "occupancy", "points"):
        results[name] = meter_json(getattr(m, name))
    if occ3d is not None:
        results["occ3d"] = occ3d
    out = args.out or Path(args.weights).with_suffix(f".eval_{split}.json")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
