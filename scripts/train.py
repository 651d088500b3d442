#!/usr/bin/env python
"""Train the POP-3D student with the live teacher.

Single process:   python scripts/train.py --config configs/tiny.yaml
Multi-GPU/node:   accelerate launch --num_processes 8 scripts/train.py --config configs/pop3d_12ep.yaml
Resume:           add --resume (continues from the newest complete checkpoint in train.output_dir)
Start again:      add --overwrite (deletes the run files training wrote there: checkpoints/, log.jsonl, ...)
A train.output_dir that holds a run is refused without one of the two (exit 2).
Override keys:    --set train.max_steps=20 --set data.shards=data/shards
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from pop3d.config import add_config_arguments, config_from_args


RUN_FILES = ("checkpoints", "log.jsonl", "student.safetensors", "config.yaml")
"""What training writes into train.output_dir (pop3d/training.py); --overwrite deletes only these."""


def existing_run(out_dir: Path) -> list[str]:
    """The run files of an earlier training in ``out_dir``."""
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the run training wrote in train.output_dir and start again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    from pop3d.cli_checks import require_file, require_split, user_errors

    out_dir = Path(cfg.train.output_dir)
    found = existing_run(out_dir)
    try:  # every check a user can fail comes before the work
        if found and not (args.resume or args.overwrite):
            raise ValueError(f"{out_dir} already holds a training run ({', '.join(found)}): pass --resume to "
                             "continue it, --overwrite to start again, or set another train.output_dir")
        require_split(cfg.data.shards, cfg.data.train_split)
        if cfg.train.init_weights:
            require_file(cfg.train.init_weights, "train.init_weights", "convert the FCOS3D / POP-3D checkpoint "
                         "with scripts/convert_weights.py, or set train.init_weights=null")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if found and args.overwrite and int(os.environ.get("RANK", "0")) == 0:
        for name in found:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        print(f"--overwrite: deleted {', '.join(found)} in {out_dir}")
    from pop3d.training import train

    try:
        train(cfg, resume=args.resume)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
