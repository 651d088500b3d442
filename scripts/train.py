#!/usr/bin/env python
"""Train the POP-3D student with the live teacher.

Single process:   python scripts/train.py --config configs/tiny.yaml
Multi-GPU/node:   accelerate launch --num_processes 8 scripts/train.py --config configs/pop3d_12ep.yaml
Several nodes:    see README "Several nodes (SLURM)" (one `accelerate launch` per node, --machine_rank)
Resume:           add --resume (continues exactly from the newest complete checkpoint in train.output_dir;
                  safetensors + JSON only, nothing unpickled; starts fresh when there is none)
Watch:            tensorboard --logdir <train.output_dir>/tensorboard
Override keys:    --set train.max_steps=20 --set data.shards=data/shards
"""
from __future__ import annotations

import argparse
import logging
import sys

from pop3d.config import add_config_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    from pop3d.training import TrainSetupError, train
    from shards.errors import DATA_ERRORS, one_line

    try:
        train(cfg, resume=args.resume)
    except TrainSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DATA_ERRORS as exc:  # a damaged / missing / old shard: named shard + sample key, no traceback
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
