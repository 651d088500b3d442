"""``scripts/eval.py``'s run: the student from its weights, the zero-shot scores, the tables and the JSON.

The script parses its arguments and runs the pre-work checks (pop3d/cli_checks.py); this module does the rest.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch


def meter_json(meter) -> dict:
    """A MeanIoU's summary and per-class IoUs as strict JSON: an undefined value (a class absent from the GT,
    or no class present) is null, and ``undefined`` counts the null IoUs."""
    def finite(v):
        return v if not isinstance(v, float) or math.isfinite(v) else None

    iou = {k: finite(v) for k, v in zip(meter.names, meter.iou().tolist())}
    return {**{k: finite(v) for k, v in meter.summary().items()}, "iou": iou,
            "undefined": sum(v is None for v in iou.values())}


def eval_device(device: str):
    """(accelerator or None, device): an Accelerator when started by ``accelerate launch`` / torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        return accelerator, accelerator.device
    return None, torch.device(device)


def load_reported_student(cfg, weights: str | os.PathLike, config_path: str | os.PathLike):
    """The student of ``cfg`` with its weights (checked against the config); prints what was loaded."""
    from pop3d.cli_checks import load_student

    model, report = load_student(cfg, weights, config_path)
    print(f"weights {weights}: {report}")
    return model


def score_pop3d(model, cfg, split: str, prompts, device, accelerator, max_samples: int | None, progress: bool):
    """The POP-3D protocol's meters over ``split`` (this rank's shards when ``accelerator``; counts summed)."""
    from pop3d.evaluate import evaluate
    from pop3d.factory import grid_spec_of
    from shards.loader import make_loader
    from shards.order import eval_loader

    if accelerator is not None:  # this rank's shards; counts summed over ranks
        loader = eval_loader(cfg.data.shards, split, grid_spec_of(cfg), rank=accelerator.process_index,
                             world=accelerator.num_processes, num_workers=cfg.data.num_workers,
                             max_samples=max_samples)
    else:
        loader = make_loader(cfg.data.shards, split, batch_size=1, num_workers=cfg.data.num_workers,
                             grid=grid_spec_of(cfg), shuffle=False, eval_gt=True)
    return evaluate(model, loader, prompts, device=device, student_image_hw=cfg.data.student_image_hw,
                    normalized_cosine=cfg.eval.normalized_cosine, max_samples=max_samples,
                    progress=progress, accelerator=accelerator)


def print_tables(m, split: str) -> None:
    """The three per-class tables: semantic voxels, occupancy, LiDAR points."""
    print(f"\nZero-shot semantic occupancy, voxels vs ray-cast GT, {split} ({m.samples} samples)\n"
          + m.semantic.table())
    print("\nOccupancy (free / occupied), voxels vs ray-cast GT\n" + m.occupancy.table())
    print("\nZero-shot semantic segmentation of the LiDAR points (16 classes)\n" + m.points.table())


def results_json(m, split: str, weights, random_text: bool, occ3d: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON results: split, samples, weights, and each meter (plus the Occ3D summary when scored)."""
    results = {"split": split, "samples": m.samples, "weights": str(weights),
               "random_text_embeddings": random_text}
    for name in ("semantic", "occupancy", "points"):
        results[name] = meter_json(getattr(m, name))
    if occ3d is not None:
        results["occ3d"] = occ3d
    return results


def run_evaluation(cfg, split: str, *, weights: str | os.PathLike, config_path: str | os.PathLike,
                   text_path: str | None, random_text: bool, device: str, max_samples: int | None,
                   out: Path | None, occ3d_options) -> int:
    """Score the student at ``weights`` on ``split``; print the tables and write the JSON (rank 0).

    ``occ3d_options``: the namespace of :func:`pop3d.occ3d.add_occ3d_arguments` (``protocol``, ``occ3d_gt``...).
    Returns the exit status: 0, or 2 after a one-line error for damaged / missing shard data. Raises
    :class:`pop3d.cli_checks.UserInputError` for text embeddings or Occ3D inputs a user can fix.
    """
    from p3d_common.atomic import atomic_path
    from pop3d.cli_checks import UserInputError
    from pop3d.evaluate import select_text_prompts

    try:
        prompts = select_text_prompts(text_path, random_text, cfg.model.feature_dim)
    except ValueError as exc:  # no embeddings given, or of another width
        raise UserInputError(str(exc)) from exc
    accelerator, dev = eval_device(device)
    is_main = accelerator is None or accelerator.is_main_process
    model = load_reported_student(cfg, weights, config_path)
    model.to(dev)
    protocol = occ3d_options.protocol
    occ3d = None
    if protocol != "pop3d":
        from pop3d.occ3d import Occ3DError, run_occ3d_protocol

        try:
            occ3d = run_occ3d_protocol(occ3d_options, cfg, model, prompts, split, dev)
        except (Occ3DError, FileNotFoundError) as exc:
            raise UserInputError(str(exc)) from exc
    if protocol == "occ3d":
        from pop3d.occ3d import write_occ3d_results

        return write_occ3d_results(occ3d_options, split, occ3d)
    max_samples = max_samples or cfg.eval.max_samples
    from shards.errors import DATA_ERRORS, one_line

    try:  # a damaged / missing / old shard: named shard + sample key, exit 2, no traceback
        m = score_pop3d(model, cfg, split, prompts, dev, accelerator, max_samples, progress=is_main)
    except DATA_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    if not is_main:
        return 0
    print_tables(m, split)
    results = results_json(m, split, weights, random_text, occ3d)
    out = out or Path(weights).with_suffix(f".eval_{split}.json")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    print(f"\nwrote {out}")
    return 0
