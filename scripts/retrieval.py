#!/usr/bin/env python
"""Open-vocabulary 3D retrieval benchmark of POP-3D (pipeline.md §5): POP3D vs the live MaskCLIP+ teacher.

    python scripts/retrieval.py --config configs/pop3d_12ep.yaml --weights runs/pop3d/student.safetensors \
        --benchmark data/retrieval_benchmark --clip-weights open_clip_vit_b16.safetensors

The benchmark folder is the original release (``retrieval_anns_{train,val,test}.csv`` + ``annotations/``).
Samples are read by token from the shards of ``data.shards`` (every split is searched; the split reported
is the CSV's). Queries: ``--clip-weights`` (local open_clip ViT-B/16 file; 85 templates), or
``--query-embeddings`` (a .safetensors written by ``--save-query-embeddings``), or ``--random-queries``
(meaningless numbers; tests / quick start). Prints one table per split (train, val, test, valtest = val ∪ test)
and writes ``results_<stamp>.txt`` (per sample: split;token;query;mAP;mAP_visible;N/A;mAP_visible_maskclip),
``results_tables_<stamp>.txt`` and ``results_<stamp>.json`` under ``--out``.
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
    parser.add_argument("--benchmark", required=True, type=Path,
                        help="benchmark folder: retrieval_anns_<split>.csv + annotations/")
    q = parser.add_mutually_exclusive_group(required=True)
    q.add_argument("--clip-weights", help="LOCAL open_clip ViT-B-16 weight file for the query embeddings")
    q.add_argument("--query-embeddings", help=".safetensors of query embeddings (--save-query-embeddings)")
    q.add_argument("--random-queries", action="store_true",
                   help="random query vectors: the numbers mean nothing (tests / quick start)")
    parser.add_argument("--save-query-embeddings", metavar="FILE",
                        help="also write the query embeddings used to FILE (.safetensors)")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"])
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default ./results)")
    parser.add_argument("--no-maskclip", action="store_true", help="skip the MaskCLIP (live teacher) baseline")
    parser.add_argument("--allow-missing", action="store_true",
                        help="report benchmark samples missing from the shards instead of failing")
    parser.add_argument("--num-workers", type=int, help="loader workers (default: data.num_workers)")
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    from pop3d.cli_checks import user_errors

    try:
        entries = check_inputs(args, cfg)  # every check a user can fail comes before the work
        from pop3d.retrieval.cli_run import run_retrieval

        return run_retrieval(cfg, entries, weights=args.weights, config_path=args.config, benchmark=args.benchmark,
                             splits=args.splits, random_queries=args.random_queries,
                             query_embeddings_path=args.query_embeddings, clip_weights=args.clip_weights,
                             save_query_embeddings_path=args.save_query_embeddings, device=args.device,
                             out=args.out, maskclip=not args.no_maskclip, allow_missing=args.allow_missing,
                             num_workers=args.num_workers, progress=not args.no_progress)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def check_inputs(args, cfg):
    """Weights, query source, benchmark files and the shards of every split the benchmark lists."""
    from pop3d.cli_checks import (
        UserInputError,
        require_clip_weights,
        require_file,
        require_student_weights,
        shard_splits,
    )
    from pop3d.retrieval import read_benchmark

    require_student_weights(args.weights)
    if args.clip_weights:
        require_clip_weights(args.clip_weights)
    if args.query_embeddings:
        require_file(args.query_embeddings, "--query-embeddings", "write one with --save-query-embeddings FILE "
                     "on a run with --clip-weights")
    entries = read_benchmark(args.benchmark, args.splits)
    have = shard_splits(cfg.data.shards)
    if have is None and not Path(cfg.data.shards).exists():
        raise UserInputError(f"{cfg.data.shards} (data.shards): no such shard folder; build the shards with "
                             f"scripts/build_shards.py --out {cfg.data.shards} (or set data.shards=<shard folder>)")
    if have is not None:
        lacking = sorted({e.split for e in entries} - set(have))
        if lacking and not args.allow_missing:
            n = sum(e.split in lacking for e in entries)
            keep = [s for s in args.splits if s not in lacking]
            leave_out = f", leave them out with --splits {' '.join(keep)}" if keep else ""
            raise UserInputError(
                f"{cfg.data.shards} (data.shards) has no shards of split(s) {lacking} (has {have}), which hold {n} "
                f"of the {len(entries)} benchmark entries of {args.benchmark}: build them with "
                f"scripts/build_shards.py --splits {' '.join(lacking)} ...{leave_out}, or pass --allow-missing to "
                "report them as missing")
    return entries


if __name__ == "__main__":
    sys.exit(main())
