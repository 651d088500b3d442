#!/usr/bin/env python
"""Train the POP-3D student with the live teacher.

Single process:   python scripts/train.py --config configs/tiny.yaml
Multi-GPU/node:   accelerate launch --num_processes 8 scripts/train.py --config configs/pop3d_12ep.yaml
Several nodes:    see README "Several nodes (SLURM)" (one `accelerate launch` per node, --machine_rank)
Resume:           add --resume (continues exactly from the newest complete checkpoint in train.output_dir;
                  safetensors + JSON only, nothing unpickled; starts fresh when there is none)
Start again:      add --overwrite (deletes the run files training wrote there: checkpoints/, log.jsonl, ...)
A train.output_dir that holds a run is refused without one of the two (exit 2).
Watch:            tensorboard --logdir <train.output_dir>/tensorboard
Override keys:    --set train.max_steps=20 --set data.shards=data/shards
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
    from pop3d.training import TrainSetupError, check_output_dir, train
    from shards.errors import DATA_ERRORS, one_line

    try:  # every check a user can fail comes before the work
        if not args.overwrite:  # a folder holding a run needs --resume or --overwrite (train() checks it again)
            check_output_dir(Path(cfg.train.output_dir), resume=args.resume)
        require_split(cfg.data.shards, cfg.data.train_split)
        if cfg.train.init_weights:
            require_file(cfg.train.init_weights, "train.init_weights", "convert the FCOS3D / POP-3D checkpoint "
                         "with scripts/convert_weights.py, or set train.init_weights=null")
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except DATA_ERRORS as exc:  # a damaged / missing / old shard: named shard + sample key, no traceback
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (TrainSetupError, *user_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
