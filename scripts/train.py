#!/usr/bin/env python
"""Train the POP-3D student with the live teacher.

Single process:   python scripts/train.py --config configs/tiny.yaml
Multi-GPU/node:   accelerate launch --num_processes 8 scripts/train.py --config configs/pop3d_12ep.yaml
Resume:           add --resume (continues from the newest complete checkpoint in train.output_dir)
Override keys:    --set train.max_steps=20 --set data.shards=data/shards
"""
from __future__ import annotations

import argparse
import logging
import sys

from pop3d.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from pop3d.training import train

    train(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
